"""Training flags for sweeps and retraining: --model-overrides, --ema-decay and --init-from.

A tiny motion run with a wider, shallower DiT than the preset's; a second run starts from its
exported weights (as scheduled retraining starts from the registered model) and, with a learning
rate too small to move them, exports the same weights.
"""

from __future__ import annotations

import dataclasses
import json
import os

import pytest
import torch

from cmd_model.dit import DiT
from cmd_model.presets import get_preset
from pipelines.training import cli
from tests.test_train import common_args, history, mlflow_client, run_job

OVERRIDES = {"hidden_size": 64, "depth": 1}


@pytest.fixture(scope="module")
def small_latents(tmp_path_factory, tiny_autoencoder_dir):
    from pipelines.platform.model_store import model_digest
    from tests.test_train import write_latents

    return write_latents(
        tmp_path_factory.mktemp("latents") / "tiny", "tiny", model_digest(tiny_autoencoder_dir), clips=32
    )


def args(name, storage, steps, latents, sd, **extra):
    return common_args(
        name,
        storage,
        steps,
        **{
            "--latents": latents,
            "--stable-diffusion": sd,
            "--num-workers": 0,  # Ray Train's local mode: the subject is the flags, not the workers
            "--batch-size": 4,
            "--checkpoint-every": steps,
            **extra,
        },
    )


def test_overrides_and_init_from(small_latents, tiny_sd_dir, ray_head, mlflow_server, tmp_path):
    env = {**os.environ, **ray_head.env(), "MLFLOW_TRACKING_URI": mlflow_server.url, "PYTHONUNBUFFERED": "1"}
    first = run_job(
        "motion",
        args(
            "wide",
            tmp_path / "runs",
            4,
            small_latents,
            tiny_sd_dir,
            **{"--model-overrides": json.dumps(OVERRIDES), "--ema-decay": 0.9},
        ),
        env,
        tmp_path,
        "-wide",
    )
    wide = DiT.from_pretrained(first["model"])
    assert (wide.config.hidden_size, wide.config.depth) == (64, 1)
    run = mlflow_client(mlflow_server.url).get_run(first["run_id"])
    assert (
        run.data.params["model_overrides.hidden_size"] == "64" and run.data.params["preset.motion.hidden_size"] == "64"
    )
    assert run.data.params["ema_decay"] == "0.9"

    second = run_job(
        "motion",
        args(
            "wide-again",
            tmp_path / "runs",
            1,
            small_latents,
            tiny_sd_dir,
            **{"--model-overrides": json.dumps(OVERRIDES), "--init-from": first["model"], "--lr": 1e-12},
        ),
        env,
        tmp_path,
        "-again",
    )
    again = DiT.from_pretrained(second["model"])
    for (key, a), b in zip(wide.state_dict().items(), again.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=key)
    assert [v for _, v in history(mlflow_client(mlflow_server.url), second["run_id"], "resumed_from_step")] == [0]


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"--model-overrides": '{"width": 64}'}, "unknown motion model field(s) width; valid: hidden_size, depth"),
        ({"--model-overrides": '{"depth": "3"}'}, "motion depth must be a positive integer, got '3'"),
        ({"--model-overrides": "{depth: 3}"}, "argument --model-overrides: not JSON"),
        ({"--ema-decay": 1.5}, "--ema-decay must be a number between 0 and 1"),
        ({"--init-from": "/does/not/exist"}, "--init-from: model not found: /does/not/exist"),
        ({"--init-from": "WRONG"}, "has hidden_size=64, this run's motion model has 32"),
    ],
)
def test_bad_override_flags_fail_in_one_line(extra, message, small_latents, tiny_sd_dir, mlflow_env, tmp_path, capsys):
    if extra.get("--init-from") == "WRONG":
        folder = tmp_path / "wide"
        DiT.from_preset_config(dataclasses.replace(get_preset("tiny").motion, **OVERRIDES)).save_pretrained(folder)
        extra = {"--init-from": folder}
    try:
        code = cli.main("motion", args("bad", tmp_path / "runs", 2, small_latents, tiny_sd_dir, **extra))
    except SystemExit as exc:  # argparse
        code = exc.code
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
