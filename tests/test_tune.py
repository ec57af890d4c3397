"""Ray Tune sweeps (jobs/tune.py) and run comparison (jobs/compare_runs.py) on a real MLflow server and Ray head.

A 4-trial ASHA sweep of the tiny motion DiT runs as users run it (`python jobs/tune.py ...` with
RAY_ADDRESS set); the runs are read back through the MLflow client and the REST API. Wrong sweep
files and an unreachable server fail in one line before any trial.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from cmd_model.dit import DiT
from pipelines.platform.model_store import fetch_model, model_digest
from tests.test_train import ROOT, artifact_paths, history, kill_a_training_worker, mlflow_client, write_latents

SWEEP_TIMEOUT_S = 400
# Four reports per trial (12 steps, a checkpoint every 3); ASHA's one rung is the third report.
# The worker killed below belongs to one of the first two trials, near their first report, so that
# trial never records a value at that rung: the first trial to reach it always goes on to finish
# (ASHA keeps the first arrival), and later ones may be stopped early. A grace period of 1 let the
# killed trial's first value stop every other trial at that rung: no finished trial, one run in ten.
SWEEP = """\
metric: eval/loss
mode: min
scheduler: {grace_period: 3, reduction_factor: 2}
space:
  lr: {loguniform: [3.0e-4, 3.0e-3]}
  batch_size: {choice: [4, 8]}
  ema_decay: {choice: [0.9, 0.99]}
  model.depth: {randint: [1, 2]}
  model.cond_dropout: {uniform: [0.0, 0.2]}
"""
MAX_STEPS, CHECKPOINT_EVERY = 12, 3
MODEL_NAME = "cmd-motion-tune-test"
EXPERIMENT = "tune-test"


@pytest.fixture(scope="module")
def sweep_latents(tmp_path_factory, tiny_autoencoder_dir):
    return write_latents(
        tmp_path_factory.mktemp("latents") / "tiny", "tiny", model_digest(tiny_autoencoder_dir), clips=64
    )


def tune_args(search: Path, name: str, storage: Path, latents: Path, sd: Path, *extra: str) -> list[str]:
    return [
        "--stage",
        "motion",
        "--search",
        str(search),
        "--name",
        name,
        *extra,
        "--preset",
        "tiny",
        "--latents",
        str(latents),
        "--stable-diffusion",
        str(sd),
        "--storage",
        str(storage),
        "--max-steps",
        str(MAX_STEPS),
        "--checkpoint-every",
        str(CHECKPOINT_EVERY),
        "--eval-samples",
        "1",
        "--log-every",
        str(CHECKPOINT_EVERY),
    ]  # training metrics as means over 3 steps, as users get them (default 10)


@pytest.fixture(scope="module")
def sweep(sweep_latents, tiny_sd_dir, ray_head, mlflow_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sweep")
    search = tmp / "sweep.yaml"
    search.write_text(SWEEP)
    env = {**os.environ, **ray_head.env(), "MLFLOW_TRACKING_URI": mlflow_server.url, "PYTHONUNBUFFERED": "1"}
    args = tune_args(
        search,
        "sweep-a",
        tmp / "runs",
        sweep_latents,
        tiny_sd_dir,
        "--num-samples",
        "4",
        "--max-concurrent",
        "2",
        "--model-name",
        MODEL_NAME,
        "--experiment",
        EXPERIMENT,
    )
    log = tmp / "tune.log"
    start = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "jobs" / "tune.py"), *args],
            cwd=tmp,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            # One trial loses its training worker after its first checkpoint: it fails, the sweep goes on.
            while not any(
                "step_00000003" in p.read_text(errors="replace")
                for p in (tmp / "runs").glob("sweep-a-trial-*/checkpoint_manager_snapshot.json")
            ):
                assert proc.poll() is None, log.read_text(errors="replace")[-8000:]
                assert time.monotonic() - start < SWEEP_TIMEOUT_S, "no trial reached its first checkpoint"
                time.sleep(0.2)
            kill_a_training_worker(ray_head)
            proc.wait(timeout=SWEEP_TIMEOUT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, text[-8000:]
    # The summary line; Ray's progress bars may leave cursor codes in front of it on the same line.
    result = json.loads(text[text.rindex('{"parent_run_id"') :].splitlines()[0])
    print(f"4-trial sweep took {time.monotonic() - start:.0f} s")
    return {**result, "tmp": tmp, "storage": tmp / "runs", "args": args, "env": env}


def children(client, parent_id: str):
    experiment = client.get_experiment_by_name(EXPERIMENT)
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")


def test_sweep_is_one_parent_run_with_a_child_per_trial(sweep, mlflow_server):
    assert sweep["trials"] == 4 and sweep["failed"] == 1
    client = mlflow_client(mlflow_server.url)
    parent = client.get_run(sweep["parent_run_id"])
    assert parent.info.run_name == "sweep-a" and parent.info.status == "FINISHED"
    assert client.get_experiment(parent.info.experiment_id).name == EXPERIMENT
    runs = children(client, parent.info.run_id)
    assert len(runs) == 4
    assert {r.data.tags["cmd.trial_id"] for r in runs} == {r.info.run_name.split("-trial-")[1] for r in runs}
    failed = [r for r in runs if r.info.status == "FAILED"]
    assert len(failed) == 1
    for run in runs:
        assert run.info.run_name.startswith("sweep-a-trial-")
        assert run.info.status in ("FINISHED", "KILLED", "FAILED"), run.info.status  # KILLED: stopped early by ASHA
        params = run.data.params
        assert {
            "learning_rate",
            "batch_size",
            "ema_decay",
            "model_overrides.depth",
            "model_overrides.cond_dropout",
        } <= set(params)
        assert params["preset.motion.depth"] == params["model_overrides.depth"]  # the override reached the model
        assert run.data.tags["data.latents"].endswith("tiny")
        if run.info.status == "FAILED":  # its worker was killed, maybe before its first metrics
            continue
        steps = [step for step, _ in history(client, run.info.run_id, "loss")]
        # One point per --log-every
        assert steps and steps == list(range(CHECKPOINT_EVERY, max(steps) + 1, CHECKPOINT_EVERY))
        assert len(history(client, run.info.run_id, "eval/loss")) >= 1
        files = artifact_paths(client, run.info.run_id)
        assert any(f.startswith("checkpoint/step_") and f.endswith("/model.safetensors") for f in files), files
        if run.info.status == "FINISHED":
            assert max(steps) == MAX_STEPS and "motion/config.json" in files
        else:
            # Tune's stop reaches the trial asynchronously: a 3-step stretch may still run (and log)
            # after the report ASHA stopped it on, so its last logged step can be MAX_STEPS.
            assert run.data.tags["cmd.stopped_early"] == "true" and max(steps) <= MAX_STEPS

    # The parent names the best trial, its config and value, and keeps the sweep file.
    best = next(r for r in runs if r.data.tags["cmd.trial_id"] == sweep["best_trial"])
    assert (
        parent.data.tags["best.trial_id"] == sweep["best_trial"] and parent.data.tags["best.run_id"] == best.info.run_id
    )
    assert json.loads(parent.data.tags["best.config"]) == sweep["best_config"]
    assert parent.data.metrics["best/eval/loss"] == pytest.approx(sweep["best_value"])
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert best in finished
    assert sweep["best_value"] == pytest.approx(min(r.data.metrics["eval/loss"] for r in finished))
    files = artifact_paths(client, parent.info.run_id)
    assert {"sweep/sweep.yaml", "best_trial.json"} <= files


def rest(url: str, path: str, body: dict | None = None, **query) -> dict:
    full = f"{url}/api/2.0/mlflow/{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(full, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_sweep_reads_back_through_the_rest_api(sweep, mlflow_server):
    url = mlflow_server.url
    experiment = rest(url, "experiments/get-by-name", experiment_name=EXPERIMENT)["experiment"]
    found = rest(
        url,
        "runs/search",
        {
            "experiment_ids": [experiment["experiment_id"]],
            "filter": f"tags.`mlflow.parentRunId` = '{sweep['parent_run_id']}'",
        },
    )["runs"]
    assert len(found) == 4
    assert sorted(run["info"]["status"] for run in found).count("FAILED") == 1
    for run in (r for r in found if r["info"]["status"] != "FAILED"):
        metrics = {m["key"] for m in run["data"]["metrics"]}
        assert {"loss", "eval/loss", "steps_per_s"} <= metrics
        curve = rest(url, "metrics/get-history", run_id=run["info"]["run_id"], metric_key="loss")["metrics"]
        assert len(curve) >= CHECKPOINT_EVERY
        listed = rest(url, "artifacts/list", run_id=run["info"]["run_id"])["files"]
        assert "checkpoint" in {f["path"] for f in listed}
    parent = rest(url, "runs/get", run_id=sweep["parent_run_id"])["run"]
    tags = {t["key"]: t["value"] for t in parent["data"]["tags"]}
    assert tags["best.trial_id"] == sweep["best_trial"]


def test_best_trial_model_is_registered_and_loads(sweep, mlflow_server, mlflow_env, tmp_path):
    version = sweep["registered_version"]
    assert version is not None
    client = mlflow_client(mlflow_server.url)
    registered = client.get_model_version(MODEL_NAME, version)
    assert registered.run_id == sweep["best_run_id"]
    assert registered.tags["eval/loss"] == str(sweep["best_value"]) and registered.tags["metric"] == "eval/loss"
    assert registered.tags["data.latents"].endswith("tiny") and registered.tags["data.autoencoder_digest"]
    folder = fetch_model(f"models:/{MODEL_NAME}/{version}", str(tmp_path / "dl"))
    model = DiT.from_pretrained(str(folder))
    assert model.config.depth == sweep["best_config"]["model"]["depth"]


def test_compare_runs_prints_a_table_and_plots_the_curves(sweep, mlflow_env, tmp_path, capsys):
    from jobs import compare_runs

    png = tmp_path / "curves.png"
    assert (
        compare_runs.main(["--experiment", EXPERIMENT, "--metric", "eval/loss", "--top", "3", "--plot", str(png)]) == 0
    )
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["run", "stage"] and "best eval/loss" in lines[0] and "steps/s" in lines[0]
    rows = [line for line in lines[2:5]]
    assert len(rows) == 3 and all(line.startswith("sweep-a-trial-") and " motion " in line for line in rows)
    # Sorted by the best value over each run's curve (the sweep ranks by the last one).
    assert f"sweep-a-trial-{sweep['best_trial']}" in [row.split()[0] for row in rows]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_a_finished_sweep_run_again_reports_it_and_registers_its_best(sweep, mlflow_server):
    """Last of the sweep's tests: the same command again (same --name and --storage) restores the
    experiment. Tune resumes the trial whose worker was killed from its checkpoint; the others
    are done. The summary is the whole sweep's, and the best is registered (once per run)."""
    log = sweep["tmp"] / "tune-again.log"
    with open(log, "wb") as out:
        proc = subprocess.run(
            [sys.executable, str(ROOT / "jobs" / "tune.py"), *sweep["args"]],
            cwd=sweep["tmp"],
            env=sweep["env"],
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=SWEEP_TIMEOUT_S,
        )
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, text[-8000:]
    again = json.loads(text[text.rindex('{"parent_run_id"') :].splitlines()[0])
    assert again["parent_run_id"] == sweep["parent_run_id"]  # the same MLflow parent run, not a new one
    assert again["trials"] == 4 and again["failed"] == 0, again
    client = mlflow_client(mlflow_server.url)
    runs = children(client, again["parent_run_id"])
    assert len(runs) == 4 and again["best_trial"] in {r.data.tags["cmd.trial_id"] for r in runs}
    finished = [r for r in runs if r.info.status == "FINISHED"]
    assert again["best_value"] == pytest.approx(min(r.data.metrics["eval/loss"] for r in finished))
    version = client.get_model_version(MODEL_NAME, again["registered_version"])
    assert version.run_id == again["best_run_id"]
    if again["best_run_id"] == sweep["best_run_id"]:
        assert again["registered_version"] == sweep["registered_version"]  # found again, not registered twice


# ---------------------------------------------------------------------------------------
# Bad input fails in one line, before any trial
# ---------------------------------------------------------------------------------------


def run_tune_main(argv: list[str], capsys) -> tuple[int, str]:
    from jobs import tune as tune_job

    try:
        code = tune_job.main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    return code, capsys.readouterr().err.strip()


@pytest.mark.parametrize(
    "text, message",
    [
        (SWEEP.replace("model.depth", "model.width"), "unknown parameter 'model.width'; valid: lr, batch_size"),
        (SWEEP.replace("lr: {loguniform", "learning_rat: {loguniform"), "unknown parameter 'learning_rat'"),
        (
            SWEEP.replace("batch_size: {choice: [4, 8]}", "batch_size: {choice: [4, eight]}"),
            "batch_size takes integers, got 'eight'",
        ),
        (
            SWEEP.replace("model.depth: {randint: [1, 2]}", "model.depth: {uniform: [1, 2]}"),
            "model.depth is an integer: use randint",
        ),
        (
            SWEEP.replace("batch_size: {choice: [4, 8]}", "batch_size: {choice: []}"),
            "space.batch_size.choice needs a non-empty list",
        ),
        (
            SWEEP.replace("batch_size: {choice: [4, 8]}", "batch_size: {choice: [4, 1000]}"),
            "holds 64 clips, fewer than one batch",
        ),
        (SWEEP.split("space:")[0] + "space: {}\n", "space is empty"),
        (
            SWEEP.replace("metric: eval/loss", "metric: eval/psnr"),
            "metric 'eval/psnr' is not reported by the motion stage",
        ),
        (
            SWEEP.replace("ema_decay: {choice: [0.9, 0.99]}", "ema_decay: {choice: [0.9, 1.5]}"),
            "--ema-decay must be a number between 0 and 1",
        ),
        ("space: [lr\n", "not valid YAML"),
    ],
)
def test_bad_sweep_file_fails_in_one_line_before_any_trial(
    text, message, sweep_latents, tiny_sd_dir, mlflow_env, tmp_path, capsys
):
    search = tmp_path / "bad.yaml"
    search.write_text(text)
    start = time.monotonic()
    code, err = run_tune_main(tune_args(search, "bad", tmp_path / "runs", sweep_latents, tiny_sd_dir), capsys)
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
    assert time.monotonic() - start < 20
    assert not (tmp_path / "runs" / "bad").exists()


def test_sweep_flags_fail_in_one_line(sweep_latents, tiny_sd_dir, mlflow_env, tmp_path, capsys):
    search = tmp_path / "sweep.yaml"
    search.write_text(SWEEP)
    code, err = run_tune_main(
        tune_args(search, "bad", tmp_path / "runs", sweep_latents, tiny_sd_dir, "--num-samples", "0"), capsys
    )
    assert code == 2 and len(err.splitlines()) == 1 and "--num-samples must be a positive integer" in err, err
    code, err = run_tune_main(
        tune_args(search, "bad", tmp_path / "runs", sweep_latents, tiny_sd_dir, "--max-stepz", "3"), capsys
    )
    assert code == 2 and len(err.splitlines()) == 1 and "unrecognized arguments: --max-stepz" in err, err


def test_unreachable_tracking_server_fails_fast_with_the_uri(sweep_latents, tiny_sd_dir, tmp_path, monkeypatch, capsys):
    from tests.fixtures_s3 import _free_ports

    url = f"http://127.0.0.1:{_free_ports(1)[0]}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    search = tmp_path / "sweep.yaml"
    search.write_text(SWEEP)
    start = time.monotonic()
    code, err = run_tune_main(tune_args(search, "nowhere", tmp_path / "runs", sweep_latents, tiny_sd_dir), capsys)
    assert code == 2 and len(err.splitlines()) == 1 and f"cannot reach MLflow tracking server {url}" in err, err
    assert time.monotonic() - start < 10
    assert not (tmp_path / "runs" / "nowhere").exists()
