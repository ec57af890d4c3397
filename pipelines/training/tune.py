"""Hyperparameter sweeps of one training stage with Ray Tune, one MLflow run per trial under a parent.

Steps:
1. check     the sweep file (parameters, types, ranges) and every trial config it can produce,
             the stage's inputs and the tracking server, all before Ray starts; one line on error
2. parent    the sweep's MLflow run (found again by name + storage on a rerun), with the sweep file
3. tune      Tuner(trial driver, space, ASHA on the reports, max_concurrent_trials); each trial is
             the stage's real harness: its own MLflow child run (mlflow.parentRunId) and a
             TorchTrainer run named <sweep>-trial-<trial id> that reports through
             TuneReportCallback; a rerun with the same name and storage resumes the sweep
4. settle    every child gets its final status (FAILED, or KILLED when ASHA stopped it early)
             and its last checkpoint's weights; the parent records the best trial, its config and
             value; the best trial's model becomes a new version of --model-name

The sweep file's format and checks: pipelines.training.sweep_file.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from ray import tune

from pipelines.platform import storage, tracking
from pipelines.training.config import TrainConfig, with_absolute_paths
from pipelines.training.lease import Lease
from pipelines.training.sweep_file import (
    MODEL_PREFIX,
    Search,
    SweepError,
    largest_point,
    load_search,
    probe_points,
    trial_config,
)

# What a trial's driver reserves: memory for its own process, no CPU. It only waits on its
# TorchTrainer, whose workers reserve the CPUs and GPUs; a CPU share here could leave Ray Data's
# readers (one CPU each) no room on a small machine. Tune refuses a trial that reserves nothing.
TRIAL_DRIVER_RESOURCES = {"memory": 512 * 2**20}
SWEEP_TAG, TRIAL_TAG, PARENT_TAG = "cmd.sweep", "cmd.trial_id", "mlflow.parentRunId"
CHECKPOINT_ARTIFACT = "checkpoint"
# The weights of a checkpoint, copied into the trial's MLflow run; the optimizer state (twice the
# model's size with Adam) stays in storage with the resumable checkpoint.
CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "state.json")


@dataclass(frozen=True)
class SweepConfig:
    stage: str
    name: str  # with train["storage"], identifies the sweep: the same pair resumes it
    search: str  # path to the sweep YAML
    num_samples: int = 4
    max_concurrent: int | None = None  # None: cluster GPUs // GPUs per trial (CPUs on a CPU cluster), at least 1
    # TrainConfig fields shared by every trial (preset, storage, max_steps, latents, ...)
    train: dict = field(default_factory=dict)
    model_name: str | None = None  # register the best trial's model under this name
    experiment: str | None = None  # MLflow experiment; None: cmd-<stage>-sweeps

    @property
    def experiment_name(self) -> str:
        return self.experiment or f"cmd-{self.stage}-sweeps"


# ---------------------------------------------------------------------------------------
# 1. The sweep file (pipelines.training.sweep_file)
# ---------------------------------------------------------------------------------------


def tune_space(search: Search) -> dict:
    """The Tune search space: {"lr": ..., "model": {"depth": ...}} (model.* nested)."""
    make = {
        "choice": lambda a: tune.choice(a),
        "uniform": lambda a: tune.uniform(*a),
        "loguniform": lambda a: tune.loguniform(*a),
        "randint": lambda a: tune.randint(a[0], a[1] + 1),
    }  # Tune's high is exclusive
    space: dict = {}
    for param, (dist, args) in search.space.items():
        if param.startswith(MODEL_PREFIX):
            space.setdefault("model", {})[param[len(MODEL_PREFIX) :]] = make[dist](args)
        else:
            space[param] = make[dist](args)
    return space


# ---------------------------------------------------------------------------------------
# 2-4. The sweep
# ---------------------------------------------------------------------------------------


def base_config(cfg: SweepConfig) -> TrainConfig:
    if "name" in cfg.train:
        raise SweepError(f"train: 'name' is set per trial ({cfg.name}-trial-<trial id>); leave it out")
    if "experiment" in cfg.train or "stage" in cfg.train:
        raise SweepError(
            "train: set the stage and the MLflow experiment on the sweep (SweepConfig.stage, .experiment), not in train"
        )
    unknown = sorted(set(cfg.train) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise SweepError(f"train: unknown field(s) {', '.join(unknown)}")
    if not isinstance(cfg.num_samples, int) or cfg.num_samples < 1:
        raise SweepError(f"--num-samples must be a positive integer, got {cfg.num_samples!r}")
    if cfg.max_concurrent is not None and (not isinstance(cfg.max_concurrent, int) or cfg.max_concurrent < 1):
        raise SweepError(f"--max-concurrent must be a positive integer, got {cfg.max_concurrent!r}")
    # The sweep name also names the Tune experiment folder and the parent run.
    base = TrainConfig(stage=cfg.stage, name=cfg.name, experiment=cfg.experiment_name, **cfg.train)
    return with_absolute_paths(base)


def run_sweep(cfg: SweepConfig) -> dict:
    """Check everything, run the trials, settle MLflow; returns the sweep's summary."""
    from pipelines.training.gpu_memory import check_gpu_memory
    from pipelines.training.trainer import prepare

    base = base_config(cfg)
    if base.local_mode:  # Tune reads each trial's reports from its Ray Train workers; local mode has none
        raise SweepError("a sweep trains each trial on Ray Train workers: --num-workers must be 1 or more, got 0")
    search = load_search(cfg.search, base)
    if search.metric.startswith("eval/"):
        # Every report (one per checkpoint) then carries a fresh validation value for ASHA.
        base = base.replace(eval_every=base.checkpoint_every)
    # GPU memory: the trial needing the most must fit (probe points vary one parameter at a time).
    check_gpu_memory(trial_config(base, largest_point(search), base.name))
    largest = max(probe_points(search), key=lambda v: trial_config(base, v, "probe").global_batch)
    plan, uri = prepare(trial_config(base, largest, base.name))  # data, storage, tracking server: before any trial
    with Lease(base.storage, cfg.name):  # one job per sweep: a second one with the same name refuses here
        return _run_sweep(cfg, base, search, plan, uri)


def _run_sweep(cfg: SweepConfig, base: TrainConfig, search: Search, plan: dict, uri: str) -> dict:
    from pipelines.training.inputs import ship_inputs
    from pipelines.training.trainer import ensure_ray

    parent = tracking.open_run(
        uri,
        cfg.experiment_name,
        cfg.name,
        base.storage,
        cfg.stage,
        sweep_params(cfg, base, search),
        tags={"cmd.kind": "sweep"},
    )
    status = "FAILED"
    try:
        tracking.log_data_version(uri, parent, plan["data_version"])
        log_text(uri, parent, search.text, f"sweep/{Path(cfg.search).name}")
        env = {**tracking.env_vars(uri), **storage.s3_env_vars()}
        base = ship_inputs(base)  # nodes share nothing but the storage
        ensure_ray(base, env)  # runtime_env env_vars: every trial process reaches the same MLflow and S3
        trials = tune_trials(cfg, base, search, plan, parent, uri)
        summary = settle(cfg, base, search, plan, parent, uri, trials)
        status = "FINISHED" if summary["best_trial"] else "FAILED"
    finally:
        tracking.end_run(uri, parent, status)
    return summary


def sweep_params(cfg: SweepConfig, base: TrainConfig, search: Search) -> dict[str, str]:
    values = {
        "stage": cfg.stage,
        "num_samples": cfg.num_samples,
        "max_concurrent": cfg.max_concurrent,
        "metric": search.metric,
        "mode": search.mode,
        "grace_period": search.grace_period,
        "reduction_factor": search.reduction_factor,
        "search": cfg.search,
        "space": {p: {d: a} for p, (d, a) in search.space.items()},
    }
    shared = {k: v for k, v in dataclasses.asdict(base).items() if k not in ("name", "storage", "stage")}
    return {**tracking.flatten("", values), **tracking.flatten("train", shared)}


def max_concurrent_trials(base: TrainConfig, num_samples: int) -> int:
    """Trials at once: as many as the cluster fits now (a Tune trial reserves nothing itself, its
    training workers do). A GPU cluster scaling from zero has no GPU up when the sweep starts: all
    trials then ask at once, and the autoscaler adds nodes up to its maximum (--max-concurrent caps it)."""
    from pipelines.platform.cluster import resources_now

    gpus, cpus = resources_now()
    if base.use_gpu:
        return gpus // base.num_workers or num_samples
    # CPU: each trial's workers, and one CPU left for Ray Data's readers (see trainer.ensure_ray).
    return max(1, int((cpus - 1) // (base.num_workers * base.cpus_per_worker)))


def tune_trials(cfg: SweepConfig, base: TrainConfig, search: Search, plan: dict, parent: str, uri: str) -> list:
    """Run (or resume, or read back when finished) the Tune experiment; returns every trial's outcome."""
    from ray.tune.schedulers import ASHAScheduler

    reports = math.ceil(base.max_steps / base.checkpoint_every)  # one Tune result per checkpoint (and the last step)
    # ASHA stops every trial at max_t; one past the last report lets a trial end by itself (its
    # driver then closes its MLflow run and its Train run shuts down cleanly).
    scheduler = ASHAScheduler(
        time_attr="training_iteration",
        max_t=reports + 1,
        grace_period=min(search.grace_period, reports),
        reduction_factor=search.reduction_factor,
        brackets=search.brackets,
    )
    driver = tune.with_parameters(
        run_trial, base=dataclasses.asdict(base), plan=plan, parent=parent, uri=uri, sweep=cfg.name
    )
    driver = tune.with_resources(driver, TRIAL_DRIVER_RESOURCES)
    path, fs = base.storage, None
    if storage.is_s3(base.storage):
        fs, path = storage.pyarrow_filesystem(base.storage)
    run_config = tune.RunConfig(
        name=cfg.name,
        storage_path=path,
        storage_filesystem=fs,
        # A failed trial is recorded and the sweep goes on; its Train run has its own --max-failures.
        failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
    )
    tune_config = tune.TuneConfig(
        metric=search.metric,
        mode=search.mode,
        scheduler=scheduler,
        num_samples=cfg.num_samples,
        max_concurrent_trials=cfg.max_concurrent or max_concurrent_trials(base, cfg.num_samples),
    )
    experiment = os.path.join(path, cfg.name)  # a local path, or the bucket path inside `fs`
    if tune.Tuner.can_restore(experiment, storage_filesystem=fs):
        # Same name and storage: finished trials stay, unfinished and failed ones resume from their checkpoints.
        tuner = tune.Tuner.restore(
            experiment,
            driver,
            resume_unfinished=True,
            resume_errored=True,
            param_space=tune_space(search),
            storage_filesystem=fs,
        )
    else:
        tuner = tune.Tuner(driver, param_space=tune_space(search), tune_config=tune_config, run_config=run_config)
    return outcomes_of(tuner.fit())


def trial_name(sweep: str, trial_id: str) -> str:
    return f"{sweep}-trial-{trial_id}"


def run_trial(config: dict, base: dict, plan: dict, parent: str, uri: str, sweep: str) -> None:
    """Tune's trial driver: one MLflow child run and one TorchTrainer run of the stage's harness."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from pipelines.training.trainer import build_trainer, params

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(TrainConfig(**base), config, trial_name(sweep, trial_id))
    run_id = tracking.open_run(
        uri,
        cfg.experiment_name,
        cfg.name,
        cfg.storage,
        cfg.stage,
        params(cfg),
        tags={PARENT_TAG: parent, SWEEP_TAG: sweep, TRIAL_TAG: trial_id},
    )
    tracking.log_data_version(uri, run_id, plan["data_version"])
    build_trainer(cfg, plan, run_id, uri, callbacks=[TuneReportCallback()]).fit()
    # Only success is recorded here. An exception may be an error or ASHA stopping the trial
    # (Tune's stop interrupts fit()); Tune knows which, so settle() sets FAILED or KILLED.
    tracking.end_run(uri, run_id, "FINISHED")


@dataclasses.dataclass(frozen=True)
class TrialOutcome:
    """One trial as Tune's results left it, restored trials included."""

    trial_id: str
    config: dict
    last_result: dict
    failed: bool


def outcomes_of(results) -> list[TrialOutcome]:
    """Tune's ResultGrid -> one TrialOutcome per trial.

    The ResultGrid of a restored experiment holds every trial, the ones finished before the
    restore too; a callback sees only the trials this run drives (none, for a finished sweep).
    """
    out = []
    for result in results:
        metrics = dict(result.metrics or {})
        # Tune sets trial_id in every trial's last result, even one that never reported.
        out.append(
            TrialOutcome(
                trial_id=str(metrics["trial_id"]),
                config=dict(result.config or {}),
                last_result=metrics,
                failed=result.error is not None,
            )
        )
    return sorted(out, key=lambda o: o.trial_id)


def settle(
    cfg: SweepConfig, base: TrainConfig, search: Search, plan: dict, parent: str, uri: str, trials: list
) -> dict:
    """Final status and checkpoint of every child run; the best trial on the parent; registration."""
    client = tracking.client(uri)
    outcomes = [settle_trial(client, cfg, base, search, parent, trial) for trial in trials]

    def rank(o):
        return o["value"] if search.mode == "min" else -o["value"]

    scored = [o for o in outcomes if o["value"] is not None and not o["failed"]]
    complete = [o for o in scored if o["finished"]]
    best = min(complete or scored, key=rank) if scored else None  # a model exists only for trials that finished
    summary = {
        "parent_run_id": parent,
        "experiment": cfg.experiment_name,
        "metric": search.metric,
        "mode": search.mode,
        "trials": len(outcomes),
        "failed": sum(o["failed"] for o in outcomes),
        "stopped_early": sum(not o["finished"] and not o["failed"] for o in outcomes),
        "best_trial": best["trial"] if best else None,
        "best_run_id": best["run_id"] if best else None,
        "best_config": best["config"] if best else None,
        "best_value": best["value"] if best else None,
        "registered_version": None,
    }
    log_sweep_outcome(client, uri, parent, search, summary, best)
    if best and cfg.model_name and best["finished"] and best["run_id"]:
        summary["registered_version"] = register(uri, cfg, base, plan, search, best)
    return summary


def settle_trial(client, cfg: SweepConfig, base: TrainConfig, search: Search, parent: str, trial) -> dict:
    """Close one trial's child run as Tune saw the trial end (and log its checkpoint); returns its outcome."""
    name = trial_name(cfg.name, trial.trial_id)
    run = find_run(client, parent, name, base.storage)
    result = trial.last_result
    failed = trial.failed
    finished = not failed and result.get("step") == base.max_steps
    if run is not None:  # Tune's view of the trial decides the child run's final status
        if failed:
            client.set_terminated(run.info.run_id, status="FAILED")
        elif finished:  # it may have been stopped by ASHA at its last report, after the model was exported
            if run.info.status != "FINISHED":
                client.set_terminated(run.info.run_id, status="FINISHED")
        else:  # stopped by ASHA before its last step
            client.set_tag(run.info.run_id, "cmd.stopped_early", "true")
            client.set_terminated(run.info.run_id, status="KILLED")
        if result.get("checkpoint_path"):
            checkpoint = storage.join(base.storage, name, os.path.basename(result["checkpoint_path"].rstrip("/")))
            log_checkpoint(client, run.info.run_id, checkpoint)
    return {
        "trial": trial.trial_id,
        "run_id": run.info.run_id if run else None,
        "config": trial.config,
        "value": result.get(search.metric),
        "finished": finished,
        "failed": failed,
    }


def log_sweep_outcome(client, uri: str, parent: str, search: Search, summary: dict, best: dict | None) -> None:
    """The parent run's trial counts, and the best trial as tags, a metric and best_trial.json."""
    from mlflow.entities import Metric, RunTag

    tags = [RunTag("cmd.trials", str(summary["trials"])), RunTag("cmd.failed_trials", str(summary["failed"]))]
    metrics = [Metric("trials", summary["trials"], 0, 0), Metric("failed_trials", summary["failed"], 0, 0)]
    if best:
        tags += [
            RunTag("best.trial_id", best["trial"]),
            RunTag("best.run_id", best["run_id"] or ""),
            RunTag("best.config", json.dumps(best["config"], sort_keys=True)),
        ]
        metrics.append(Metric(f"best/{search.metric}", best["value"], 0, 0))
        best_trial = {
            "trial": best["trial"],
            "run_id": best["run_id"],
            "config": best["config"],
            search.metric: best["value"],
        }
        log_text(uri, parent, json.dumps(best_trial, indent=2), "best_trial.json")
    client.log_batch(parent, metrics=metrics, tags=tags)


def find_run(client, parent: str, name: str, storage_uri: str):
    found = client.search_runs(
        [client.get_run(parent).info.experiment_id],
        filter_string=tracking.tag_filter(**{tracking.NAME_TAG: name, tracking.STORAGE_TAG: storage_uri}),
        max_results=1,
    )
    return found[0] if found else None


def log_checkpoint(client, run_id: str, checkpoint: str) -> None:
    """The checkpoint's weights and state (not the optimizer) as artifacts `checkpoint/<step dir>/`."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / os.path.basename(checkpoint)
        folder.mkdir()
        for name in CHECKPOINT_FILES:
            if storage.exists(storage.join(checkpoint, name)):
                with storage.local_copy(storage.join(checkpoint, name)) as path:
                    (folder / name).write_bytes(Path(path).read_bytes())
        client.log_artifacts(run_id, str(folder), f"{CHECKPOINT_ARTIFACT}/{folder.name}")


def log_text(uri: str, run_id: str, text: str, artifact_file: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        path.write_text(text)
        tracking.client(uri).log_artifact(
            run_id, str(path), str(Path(artifact_file).parent) if "/" in artifact_file else None
        )


def register(uri: str, cfg: SweepConfig, base: TrainConfig, plan: dict, search: Search, best: dict) -> str:
    """The best trial's exported model as a version of `cfg.model_name`; returns the version.

    A rerun of a finished sweep finds the version it registered before (same run, same sweep).
    """
    from pipelines.platform.registry import find_version
    from pipelines.training.stage import get_stage

    earlier = find_version(uri, cfg.model_name, {"sweep": cfg.name, "trial_id": best["trial"]})
    if earlier is not None:
        return str(earlier.version)
    client = tracking.client(uri)
    tracking.ensure_registered_model(client, cfg.model_name, f"CMD {cfg.stage} model from Ray Tune sweeps")
    artifact = get_stage(cfg.stage).artifact
    tags = {
        **{f"data.{k}": str(v) for k, v in plan["data_version"].items()},
        search.metric: str(best["value"]),
        "metric": search.metric,
        "sweep": cfg.name,
        "trial_id": best["trial"],
        "stage": cfg.stage,
        "preset": base.preset,
    }
    version = client.create_model_version(
        cfg.model_name, f"runs:/{best['run_id']}/{artifact}", run_id=best["run_id"], tags=tags
    )
    return str(version.version)
