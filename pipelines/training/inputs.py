"""Model inputs reach every node: a cluster's nodes share nothing but the run's storage.

A training job names its models (--stable-diffusion, --autoencoder, --init-from, --lpips-vgg) as
local paths, s3:// prefixes, MLflow URIs or hub ids. A local path exists only where the driver
runs, so with --storage on s3:// the driver sends each local input to <storage>/<name>/inputs/
once (`ship_inputs`), and every worker reads its inputs from its node's model cache
(`inputs_on_this_node`, model_store.node_copy: one download per node, not per worker; --init-from
only where rank 0 runs, the other ranks get its weights from rank 0). With a local
--storage the nodes share a disk (one machine, or a shared file system), and paths stay as given.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from pipelines.platform import model_store, storage
from pipelines.training.config import TrainConfig

MODEL_INPUTS = ("stable_diffusion", "autoencoder", "init_from", "lpips_vgg")


def ship_inputs(cfg: TrainConfig, say=print) -> TrainConfig:
    """On the driver: with --storage on s3://, each local model input uploaded beside the run."""
    to = storage.join(cfg.storage, cfg.name, "inputs")
    changes = {
        field: model_store.for_every_node(
            getattr(cfg, field), cfg.storage, to, f"[{cfg.name}] --{field.replace('_', '-')}", say
        )
        for field in MODEL_INPUTS
    }
    return cfg.replace(**{k: v for k, v in changes.items() if v != getattr(cfg, k)})


def inputs_on_this_node(cfg: TrainConfig, rank: int) -> TrainConfig:
    """On the worker of rank `rank`: remote model inputs as folders in this node's model cache
    (--init-from on rank 0 only: the others take its weights from rank 0, loop.build_trainee)."""
    changes = {}
    sd = cfg.sd_path
    if sd and sd.startswith(model_store.REMOTE):
        changes["stable_diffusion"] = model_store.node_copy(sd)
    for field in ("autoencoder", "init_from") if rank == 0 else ("autoencoder",):
        value = getattr(cfg, field)
        if value and value.startswith(model_store.REMOTE):
            changes[field] = model_store.node_copy(value)
    if cfg.lpips_vgg and cfg.lpips_vgg.startswith(model_store.REMOTE):  # a file: its folder is fetched
        folder, name = cfg.lpips_vgg.rsplit("/", 1)
        changes["lpips_vgg"] = str(PurePosixPath(model_store.node_copy(folder)) / name)
    return cfg.replace(**changes) if changes else cfg
