"""Ray Train harness for the three CMD stages (autoencoder, content, motion).

Public API:
    TrainConfig                     every flag of a training job (pipelines.training.config)
    fit(cfg) -> FitResult           check, open the MLflow run, train, export (trainer)
    with_absolute_paths(cfg)        local paths made absolute for workers (fit does it first)
    prepare(cfg) -> (plan, uri)     the checks alone, before any Ray work
    params(cfg) -> dict             the MLflow params of a run (flags + preset)
    build_trainer(cfg, plan, run_id, uri, callbacks) -> TorchTrainer   for Ray Tune trial drivers
    train_loop                      the per-worker loop (loop)
    get_stage(name)                 a stage class (stage)

Also here: the stages (vae, autoencoder, content, motion), their data (data), checkpoints, the
preemption lease, the driver's GPU memory check (gpu_memory), and Ray Tune sweeps over any stage
(tune, sweep_file).

Imports: cmd_model, pipelines.platform, pipelines.data
"""

from pipelines.training.config import STAGES, ConfigError, TrainConfig, with_absolute_paths
from pipelines.training.stage import get_stage
from pipelines.training.trainer import FitResult, build_trainer, fit, params, prepare

__all__ = [
    "STAGES",
    "ConfigError",
    "TrainConfig",
    "FitResult",
    "build_trainer",
    "fit",
    "get_stage",
    "params",
    "prepare",
    "with_absolute_paths",
]
