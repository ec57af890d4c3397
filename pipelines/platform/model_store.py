"""Where trained models come from: local folders, s3:// prefixes or MLflow URIs, made local and fingerprinted.

A model folder is what `save_pretrained` writes (config.json + *.safetensors). Its digest
(sha256 over the weight and config files) identifies the exact weights, so latents made by one
autoencoder are never mixed with another's.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from pipelines.platform import storage

MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")


class ModelNotFound(ValueError):
    """A model location that does not hold a save_pretrained folder (one readable line)."""


def download(uri: str, into: str | None = None) -> Path:
    """Copy the folder at an MLflow URI or s3:// prefix to `into`, or to a scratch folder that is
    removed when this process exits (each actor or job keeps its copy only while it runs)."""
    if into is None:
        into = tempfile.mkdtemp(prefix="cmd-model-")
        atexit.register(shutil.rmtree, into, True)
    if uri.startswith(MLFLOW_SCHEMES):
        import mlflow

        try:
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=into))
        except Exception as exc:  # noqa: BLE001 - MLflow raises many types; the user needs one line
            raise ModelNotFound(f"cannot fetch model {uri}: {str(exc).splitlines()[0]}") from None
    if not storage.exists(uri):
        raise ModelNotFound(f"model not found: {uri}")
    storage.download_dir(uri, into)
    return Path(into)


def fetch_model(uri: str, into: str | None = None) -> Path:
    """A local save_pretrained folder holding the model at `uri`: a local folder as it is, a
    remote one downloaded (see `download`)."""
    path = download(uri, into) if uri.startswith((*MLFLOW_SCHEMES, "s3://")) else Path(uri)
    check_model_dir(path, uri)
    return path


def check_model_dir(path: Path, uri: str | None = None) -> None:
    where = uri or str(path)
    if not path.is_dir():
        raise ModelNotFound(f"model not found: {where}")
    if not (path / "config.json").is_file() or not list(path.glob("*.safetensors")):
        raise ModelNotFound(f"{where} is not a save_pretrained folder (config.json + *.safetensors)")


def model_digest(path: str | Path) -> str:
    """sha256 (first 16 hex) over config.json and the safetensors weights, in name order."""
    path = Path(path)
    digest = hashlib.sha256()
    for file in sorted([path / "config.json", *path.glob("*.safetensors")]):
        digest.update(file.name.encode())
        with open(file, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def model_config(path: str | Path) -> dict:
    return json.loads((Path(path) / "config.json").read_text())


AUTOENCODER_SHAPE_FIELDS = ("in_channels", "num_frames", "height", "width", "patch_size", "motion_channels")


def autoencoder_mismatch(directory: str | Path, want) -> list[str]:
    """How a saved autoencoder's shape differs from a preset's AutoencoderConfig `want`:
    ["height=8 (preset 16)", ...]."""
    have = model_config(directory)
    return [
        f"{k}={have.get(k)} (preset {getattr(want, k)})"
        for k in AUTOENCODER_SHAPE_FIELDS
        if have.get(k) != getattr(want, k)
    ]


def is_hub_id(path: str) -> bool:
    """`org/name`: a Hugging Face Hub id, which diffusers resolves where the cluster has network.
    A URI, an absolute or relative path (./x, ~/x) or a bare name is never one."""
    return "://" not in path and not path.startswith((".", "/", "~")) and path.count("/") == 1
