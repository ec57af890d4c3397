"""CMD bundles in the MLflow Model Registry: the three trained parts registered as one version.

A bundle folder holds `autoencoder/`, `content/` and `motion/` (save_pretrained folders) and
`cmd.json` ({preset, stable_diffusion}); a version's tags carry the data version and the metric
it was chosen on. `models:/NAME@production` (or `models:/NAME/3`) loads back with `load_bundle`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipelines.platform import storage, tracking
from pipelines.platform.model_store import download, fetch_model

PARTS = ("autoencoder", "content", "motion")
PRODUCTION = "production"
BUNDLE_ARTIFACT = "bundle"


def make_bundle(directory: str | Path, preset: str, stable_diffusion: str | None, **parts: str) -> Path:
    """Copy the three models (folders or URIs) into one bundle folder."""
    directory = Path(directory)
    for name in PARTS:
        shutil.copytree(fetch_model(parts[name]), directory / name, dirs_exist_ok=True)
    (directory / "cmd.json").write_text(json.dumps({"preset": preset, "stable_diffusion": stable_diffusion}, indent=2))
    return directory


def register_bundle(uri: str, model_name: str, run_id: str, bundle: str | Path, tags: dict[str, str]) -> str:
    """Log the bundle to `run_id` and register it as a new version of `model_name`; returns the version."""
    client = tracking.client(uri)
    client.log_artifacts(run_id, str(bundle), BUNDLE_ARTIFACT)
    tracking.ensure_registered_model(client, model_name, "CMD: video autoencoder + content model + motion DiT")
    version = client.create_model_version(
        model_name, f"runs:/{run_id}/{BUNDLE_ARTIFACT}", run_id=run_id, tags={k: str(v) for k, v in tags.items()}
    )
    return str(version.version)


def find_version(uri: str, model_name: str, tags: dict[str, str]):
    """The latest version of `model_name` carrying every tag in `tags`, or None."""
    query = " and ".join([f"name = '{tracking.quote(model_name)}'"] + ([tracking.tag_filter(**tags)] if tags else []))
    found = tracking.client(uri).search_model_versions(query)
    return max(found, key=lambda v: int(v.version)) if found else None


def production(uri: str, model_name: str):
    """The version behind the `production` alias, or None."""
    client = tracking.client(uri)
    try:
        return client.get_model_version_by_alias(model_name, PRODUCTION)
    except Exception:  # noqa: BLE001 - MLflow raises RestException for a missing model or alias
        return None


def promote(uri: str, model_name: str, version: str) -> None:
    tracking.client(uri).set_registered_model_alias(model_name, PRODUCTION, version)


def load_bundle(model_uri: str) -> tuple[Path, dict]:
    """A registered bundle (`models:/NAME@production`, `runs:/...`, or a folder) -> (local folder, cmd.json)."""
    folder = Path(model_uri) if Path(model_uri).is_dir() else download(model_uri)
    if not (folder / "cmd.json").is_file():
        raise ValueError(f"{model_uri} is not a CMD bundle (no cmd.json)")
    return folder, json.loads((folder / "cmd.json").read_text())


def bundle_parts(model_uri: str) -> tuple[dict[str, str], dict]:
    """A registered bundle's three models as URIs each node fetches itself ({part: uri}), and its
    cmd.json, without downloading the models here: a folder on this machine would exist on no
    other node. `models:/NAME@ALIAS`, `models:/NAME/VERSION`, `runs:/...`, s3:// or a local folder."""
    if Path(model_uri).is_dir():
        folder, meta = load_bundle(model_uri)
        return {part: str(folder / part) for part in PARTS}, meta
    base = model_uri.rstrip("/")
    if base.startswith("models:/"):
        name, _, version = base.removeprefix("models:/").replace("@", "/@").partition("/")
        client = tracking.client(tracking.tracking_uri())
        try:
            found = (
                client.get_model_version_by_alias(name, version[1:])
                if version.startswith("@")
                else client.get_model_version(name, version)
            )
        except Exception as exc:  # noqa: BLE001 - MLflow raises RestException; the user needs one line
            raise ValueError(f"no registered model {model_uri}: {str(exc).splitlines()[0]}") from None
        base = (
            found.source
            if found.source.startswith("runs:/")
            else client.get_model_version_download_uri(name, found.version)
        )
    try:
        if storage.is_s3(base):
            meta = json.loads(storage.read_text(f"{base}/cmd.json"))
        else:
            import mlflow

            meta = json.loads(mlflow.artifacts.load_text(f"{base}/cmd.json"))
    except Exception as exc:  # noqa: BLE001 - a missing file or server: one line
        reason = str(exc).splitlines()[0]
        raise ValueError(f"{model_uri} is not a CMD bundle (no readable cmd.json: {reason})") from None
    return {part: f"{base}/{part}" for part in PARTS}, meta
