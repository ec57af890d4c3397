"""Driver side of a training job: check, open the MLflow run, build the TorchTrainer, fit.

Steps:
1. prepare  the stage checks its inputs (latents and manifest, videos, models) and the
            tracking server answers, all before Ray starts; one line on failure
2. lease    <storage>/<name>/lease.json: a second job on the same run refuses (pipelines.training.lease)
3. run      the job's MLflow run: found again by (name, storage) on a rerun, else created
4. ray      connect to RAY_ADDRESS (`ray job submit` sets it) or start a local Ray on loopback
5. fit      TorchTrainer(train_loop, ScalingConfig, RunConfig(name, storage)) with the
            stage's dataset; Ray Train V2 resumes from <storage>/<name> when it holds a run.
            --num-workers 0 is Ray Train's local mode: the loop runs in this process, and keeps
            its checkpoints in the same place itself (loop.keep_checkpoint)
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

from pipelines.platform import cluster, storage, tracking
from pipelines.training import checkpoint, data
from pipelines.training.config import TrainConfig, with_absolute_paths
from pipelines.training.gpu_memory import check_gpu_memory
from pipelines.training.inputs import ship_inputs
from pipelines.training.lease import Lease
from pipelines.training.loop import (
    CHECKPOINTS_KEPT,
    UNLOGGED,
    UNLOGGED_DIR,
    checkpoint_dir_name,
    kept_checkpoints,
    model_uri,
    train_loop,
)
from pipelines.training.stage import check_init_from, get_stage


@dataclass(frozen=True)
class FitResult:
    run_id: str  # MLflow run
    step: int
    model: str  # <storage>/<name>/model (save_pretrained folder)
    model_uri: str  # runs:/<run_id>/<artifact>, what model_store.fetch_model reads
    checkpoint: str | None  # the last checkpoint's path in storage
    metrics: dict


def prepare(cfg: TrainConfig) -> tuple[dict, str]:
    """Every check that needs no Ray; returns (the stage's plan, the tracking URI)."""
    check_gpu_memory(cfg)  # first: a batch no GPU can hold needs no look at the data
    plan = get_stage(cfg.stage).prepare(cfg)
    if cfg.init_from:
        check_init_from(cfg)
    storage.check_writable(cfg.storage, "--storage")
    uri = tracking.tracking_uri()
    tracking.check_reachable(uri)
    return plan, uri


def params(cfg: TrainConfig) -> dict[str, str]:
    """All flags plus the resolved preset, as MLflow params."""
    values = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("name", "storage")}
    values.update(global_batch=cfg.global_batch, learning_rate=cfg.learning_rate)
    if cfg.stage == "autoencoder":
        values["reconstruction_loss"] = cfg.reconstruction_loss
    return {**tracking.flatten("", values), **tracking.flatten("preset", cfg.model_preset)}


def ensure_ray(cfg: TrainConfig, env: dict[str, str]) -> None:
    """pipelines.platform.cluster.ensure_ray, reserving the CPUs of this job's training workers."""
    cluster.ensure_ray(env, reserve_cpus=cfg.num_workers * cfg.cpus_per_worker)


def run_config(cfg: TrainConfig, env: dict[str, str], callbacks=()):
    import ray.train

    path, fs = cfg.storage, None
    if storage.is_s3(cfg.storage):
        fs, path = storage.pyarrow_filesystem(cfg.storage)  # the endpoint and keys of our storage layer
    return ray.train.RunConfig(
        name=cfg.name,
        storage_path=path,
        storage_filesystem=fs,
        failure_config=ray.train.FailureConfig(max_failures=cfg.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(num_to_keep=CHECKPOINTS_KEPT),
        # Workers reach the same MLflow server and S3 store as this driver, on any node.
        worker_runtime_env={"env_vars": env},
        callbacks=list(callbacks),
    )


def build_trainer(cfg: TrainConfig, plan: dict, run_id: str, uri: str, callbacks=()):
    """The TorchTrainer for one job (Ray Tune calls this from its trial driver with its own callbacks)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    env = {**tracking.env_vars(uri), **storage.s3_env_vars()}
    workers = {}
    if not cfg.local_mode:  # local mode (0 workers): the loop runs in this process, nothing reserved
        workers = dict(
            use_gpu=cfg.use_gpu,  # one GPU per worker
            # CPU per worker: 1 by default; on GPU nodes raise it so each worker has cores to feed its GPU.
            resources_per_worker={"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})},
        )
    scaling = ray.train.ScalingConfig(num_workers=cfg.num_workers, **workers)
    loop_config = {"config": dataclasses.asdict(cfg), "plan": plan, "run_id": run_id, "tracking_uri": uri}
    return TorchTrainer(
        train_loop,
        train_loop_config=loop_config,
        scaling_config=scaling,
        run_config=run_config(cfg, env, callbacks),
        datasets={"train": get_stage(cfg.stage).dataset(cfg, plan)},
        dataset_config=data.held_data_config() if plan.get("cache") else None,
    )


def finished_checkpoint(cfg: TrainConfig) -> str | None:
    """The run's checkpoint at max_steps when it has one and its exported model, else None.

    Starting Ray Train for such a run would resume at max_steps and do nothing, for about 15 s.
    """
    final = storage.join(cfg.storage, cfg.name, checkpoint_dir_name(cfg.max_steps))
    exported = storage.exists(storage.join(model_uri(cfg), "config.json"))
    return final if exported and storage.exists(storage.join(final, checkpoint.STATE)) else None


def fit(cfg: TrainConfig, tags: dict[str, str] | None = None) -> FitResult:
    """The whole job: one MLflow run, one Ray Train run named cfg.name under cfg.storage."""
    cfg = with_absolute_paths(cfg)
    plan, uri = prepare(cfg)
    # One job per run: a second one with the same name and storage refuses here, before MLflow and Ray.
    with Lease(cfg.storage, cfg.name):
        return _fit(cfg, plan, uri, tags)


def _fit(cfg: TrainConfig, plan: dict, uri: str, tags: dict[str, str] | None) -> FitResult:
    stage = get_stage(cfg.stage)
    run_id = tracking.open_run(uri, cfg.experiment_name, cfg.name, cfg.storage, cfg.stage, params(cfg), tags=tags)
    final = finished_checkpoint(cfg)
    if final is not None:  # a rerun of a finished job (a retraining round finished by the next run)
        tracking.end_run(uri, run_id, "FINISHED")
        print(f"[{cfg.name}] already finished at step {cfg.max_steps}: {model_uri(cfg)}", flush=True)
        return FitResult(
            run_id=run_id,
            step=cfg.max_steps,
            model=model_uri(cfg),
            model_uri=f"runs:/{run_id}/{stage.artifact}",
            checkpoint=final,
            metrics={},
        )
    try:
        tracking.log_data_version(uri, run_id, plan["data_version"])
        cfg = ship_inputs(cfg)  # nodes share nothing but the storage
        ensure_ray(cfg, {**tracking.env_vars(uri), **storage.s3_env_vars()})
        result = build_trainer(cfg, plan, run_id, uri).fit()
    except BaseException:
        with contextlib.suppress(Exception):  # the training error is the one to show
            tracking.end_run(uri, run_id, "FAILED")
        raise
    metrics = dict(result.metrics or {})
    fitted = FitResult(
        run_id=run_id,
        step=int(metrics.get("step", cfg.max_steps)),
        model=model_uri(cfg),
        model_uri=f"runs:/{run_id}/{stage.artifact}",
        checkpoint=result.checkpoint.path if result.checkpoint else (kept_checkpoints(cfg) or [None])[-1],
        metrics=metrics,
    )
    unlogged = metrics.pop(UNLOGGED, None)
    kept = storage.join(cfg.storage, cfg.name, UNLOGGED_DIR)
    problems = [f"not logged: {unlogged} (send it with: python jobs/upload_unlogged.py {kept})"] if unlogged else []
    try:
        tracking.end_run(uri, run_id, "FINISHED")
    except tracking.TrackingError as exc:
        problems.append(str(exc))
    if problems:
        raise tracking.TrackingError(
            f"[{cfg.name}] training finished at step {fitted.step} (checkpoint {fitted.checkpoint}), "
            f"but the tracking server was away: {'; '.join(problems)}"
        )
    return fitted
