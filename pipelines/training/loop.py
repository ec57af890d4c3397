"""The training loop every Ray Train worker runs, the same for all stages.

1. set up   device from Ray Train (bf16 autocast + TF32 on CUDA only), the stage's model,
            EMA, AdamW; weights, EMA, optimizer and step from ray.train.get_checkpoint()
            when resuming (after a worker failure or a rerun with the same name), else
            the weights of --init-from when given (retraining from the registered model),
            read by rank 0 alone and broadcast by DDP
2. train    batches from this worker's dataset shard, DDP (prepare_model: NCCL on GPU, gloo
            on CPU; gradients in its buckets), each batch in --grad-accum-steps micro-batches,
            --grad-checkpointing, gradient clipping, linear warm-up, EMA after every step
3. log      rank 0, every log_every steps: loss and grad norm (means over those steps), lr,
            steps/s, samples/s into the job's MLflow run;
            evaluation (sample videos, reconstructions, validation loss) every eval_every steps
4. save     every checkpoint_every steps: ray.train.report from every rank, the checkpoint
            (safetensors) from rank 0 only (in Ray Train's local mode, --num-workers 0, which keeps
            no checkpoints, rank 0 writes it to <storage>/<name>/step_N itself); at the last step
            rank 0 exports the model (save_pretrained) to MLflow and to <storage>/<name>/model
"""

from __future__ import annotations

import contextlib
import logging
import re
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import ray.train
import ray.train.torch
import torch
from torch.nn.parallel import DistributedDataParallel

from cmd_model.layers import checkpointed
from pipelines.platform import storage, tracking
from pipelines.training import checkpoint
from pipelines.training.config import TrainConfig
from pipelines.training.inputs import inputs_on_this_node
from pipelines.training.optim import make_ema, make_optimizer, set_lr, update_ema, warmup_lr
from pipelines.training.stage import get_stage, to_device

log = logging.getLogger(__name__)  # Ray Train sends worker logs to the job's output (print would show twice)
MODEL_DIR = "model"  # <storage>/<name>/model: the final save_pretrained folder
UNLOGGED_DIR = "unlogged"  # <storage>/<name>/unlogged: metrics and artifacts the tracking server never took
UNLOGGED = "unlogged"  # the final report's key saying what was not logged and where it is kept
CHECKPOINTS_KEPT = 3  # the newest few: enough to fall back past a bad one, bounded on disk
CHECKPOINT_NAME = re.compile(r"step_\d{8}")  # checkpoint_dir_name's
THROUGHPUT_WINDOW = 20  # steps averaged into steps/s: one step alone is too noisy to read


def checkpoint_dir_name(step: int) -> str:
    """<storage>/<name>/step_00001000: a checkpoint's folder, named by its step."""
    return f"step_{step:08d}"


def model_uri(cfg: TrainConfig) -> str:
    return storage.join(cfg.storage, cfg.name, MODEL_DIR)


def batches(shard, batch_size: int, collate, device: torch.device, seed: int, rows_per_fetch: int = 0):
    """This worker's batches, epoch after epoch, forever (the loop stops at max_steps).

    Ray Data is asked for `rows_per_fetch` rows at a time (rounded to whole batches), which are
    cut into training batches here. Its per-batch work (slicing, the shuffle buffer, collating)
    runs in its threads and holds the GIL; once per step it slowed a short step's Python-bound
    dispatch by 40% on the tiny motion DiT (benchmarks/train.py). Once per fetch it is noise.
    """
    per_fetch = max(1, rows_per_fetch // batch_size) * batch_size
    epoch = 0
    while True:
        count, carry = 0, None
        for fetched in shard.iter_torch_batches(
            batch_size=per_fetch,
            collate_fn=collate,
            prefetch_batches=2,  # the next fetches are read and collated while these steps run
            # Shards hold one video's clips side by side; a buffer of a few batches mixes them.
            local_shuffle_buffer_size=max(per_fetch, batch_size * 4),
            local_shuffle_seed=seed + epoch,
        ):
            fetched = to_device(fetched, device)  # one host->device copy per fetch; batches are views
            if carry is not None:
                fetched = {
                    k: torch.cat([carry[k], v]) if torch.is_tensor(v) else carry[k] + v for k, v in fetched.items()
                }
            rows = len(next(iter(fetched.values())))
            full = rows - rows % batch_size
            for i in range(0, full, batch_size):
                count += 1
                yield {k: v[i : i + batch_size] for k, v in fetched.items()}
            # Rows short of a batch wait for the next fetch; the epoch's last ones are dropped, so
            # every rank (whose shards have equal rows) takes the same number of steps, as DDP needs.
            carry = {k: v[full:] for k, v in fetched.items()} if full < rows else None
        if count == 0:
            raise RuntimeError(f"this worker's data shard gave no full batch of {batch_size}: too few clips per worker")
        epoch += 1


@dataclass
class Trainee:
    """What one rank trains: the stage, its model (DDP-wrapped when there are several ranks), the
    unwrapped module, the EMA copy (None when not kept), the optimizer and the step it starts at."""

    stage: object
    model: torch.nn.Module
    raw: torch.nn.Module
    ema: torch.nn.Module | None
    ema_decay: float
    optimizer: torch.optim.Optimizer
    state: checkpoint.TrainState

    @property
    def evaluated_model(self) -> torch.nn.Module:
        """What is evaluated and exported: the EMA weights where kept, else the trained ones."""
        return self.raw if self.ema is None else self.ema


def train_loop(loop_config: dict) -> None:
    """Ray Train's train_loop_per_worker. loop_config: config (TrainConfig fields), plan, run_id, tracking_uri."""
    rank = ray.train.get_context().get_world_rank()
    cfg = inputs_on_this_node(TrainConfig(**loop_config["config"]), rank)
    device = ray.train.torch.get_device()
    if device.type == "cuda":
        # TF32 matmuls: DiT's train.py notes this "makes A100 training a lot faster".
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    trainee = build_trainee(cfg, loop_config, device, rank)
    start = trainee.state.step
    torch.manual_seed(cfg.seed + 1000 * rank + 7919 * start)  # fresh noise per rank, and after a resume
    logger = start_logger(cfg, loop_config, start, device) if rank == 0 else None  # only rank 0 logs
    shard = ray.train.get_dataset_shard("train")
    data = batches(
        shard,
        cfg.worker_batch,
        trainee.stage.collate(),
        device,
        seed=cfg.seed + 1000 * rank + start,
        rows_per_fetch=trainee.stage.rows_per_fetch,
    )
    times = deque([time.perf_counter()], maxlen=THROUGHPUT_WINDOW + 1)
    logged, reported = Means(), Means()  # on the device: read once per log / per checkpoint, not per step
    evaluated: dict[str, float] = {}  # the latest evaluation, reported with each checkpoint (Tune reads eval/loss)
    trainee.model.train()
    for step in range(start + 1, cfg.max_steps + 1):
        lr = warmup_lr(cfg.learning_rate, step - 1, cfg.warmup_steps)
        loss, grad_norm = train_step(trainee, next(data), lr, step - 1)
        if logger:
            logged.add(loss=loss, grad_norm=grad_norm)
        reported.add(loss=loss)
        times.append(time.perf_counter())
        last = step == cfg.max_steps
        if logger and (step % cfg.log_every == 0 or last):
            steps_per_s = (len(times) - 1) / (times[-1] - times[0])
            logger.metrics(
                {
                    **logged.read(),
                    "lr": lr,
                    "steps_per_s": steps_per_s,
                    "samples_per_s": steps_per_s * cfg.global_batch,
                },
                step=step,
            )
        paused = False
        if logger and (step % cfg.eval_every == 0 or last):
            evaluated = evaluate(trainee.stage, trainee.evaluated_model, step, logger)
            paused = True
        if step % cfg.checkpoint_every == 0 or last:
            unlogged = finish(trainee, cfg, logger) if last and logger else None
            save_checkpoint(
                trainee,
                step,
                reported.read().get("loss", 0.0),
                {**evaluated, **({UNLOGGED: unlogged} if unlogged else {})},
                rank,
                cfg,
                logger,
            )
            paused = True
        if paused:  # evaluation and checkpoint time is not training throughput
            times.clear()
            times.append(time.perf_counter())


def build_trainee(cfg: TrainConfig, loop_config: dict, device: torch.device, rank: int) -> Trainee:
    """The stage's model, EMA and optimizer: from ray.train.get_checkpoint() when resuming, else
    from --init-from when given (read on rank 0 only), else freshly initialised (the same weights
    on every rank)."""
    stage_cls = get_stage(cfg.stage)
    spec = stage_cls.optimizer
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    stage = stage_cls(cfg, loop_config["plan"], device)
    raw = stage.model
    if cfg.grad_checkpointing:  # diffusers' switch: the SD UNet's own blocks, our DiTs' and autoencoder's
        raw.enable_gradient_checkpointing(checkpointed)
    ema_decay = cfg.ema_decay if cfg.ema_decay is not None else spec.ema_decay
    state = checkpoint.TrainState(run_id=loop_config["run_id"], config=loop_config["config"])
    with resume_from(cfg) as resume_dir:
        if cfg.init_from and not resume_dir and rank == 0:
            # One read of a file that may hold gigabytes: the other ranks get the weights from DDP's broadcast.
            init_weights(raw, cfg.init_from)
        # To the device; DDP when there are several workers, whose construction broadcasts rank 0's
        # parameters and buffers to every rank. Gradients as views of DDP's buckets: no second copy
        # of them (4 bytes a parameter: 3.2 GiB for SD 2.1's UNet).
        model = ray.train.torch.prepare_model(raw, parallel_strategy_kwargs={"gradient_as_bucket_view": True})
        ema = make_ema(raw) if ema_decay else None  # after the broadcast: rank 0's weights on every rank
        if resume_dir:
            state.step = checkpoint.load_weights(resume_dir, raw, ema).step
        optimizer = make_optimizer(raw.parameters(), cfg.learning_rate, spec)
        if resume_dir:
            checkpoint.load_optimizer_state(resume_dir, optimizer)
    return Trainee(stage, model, raw, ema, ema_decay, optimizer, state)


def start_logger(cfg: TrainConfig, loop_config: dict, start: int, device: torch.device) -> tracking.RunLogger:
    logger = tracking.RunLogger(loop_config["tracking_uri"], loop_config["run_id"])
    logger.metrics({"resumed_from_step": start, "torch_threads": torch.get_num_threads()}, step=start)
    logger.send()
    log.info(
        "[%s] %s: step %d -> %d, %d worker(s) on %s", cfg.name, cfg.stage, start, cfg.max_steps, cfg.num_workers, device
    )
    return logger


def finish(trainee: Trainee, cfg: TrainConfig, logger) -> str | None:
    """Rank 0, before the last report (under Tune a scheduler may stop the trial as soon as it sees it):
    export the model, then flush the metrics; returns where what the tracking server never took is kept."""
    export(trainee.stage, trainee.evaluated_model, cfg, logger)
    # A tracking server away for longer than CMD_TRACKING_OUTAGE_S: what it missed is kept beside
    # the checkpoints, and the driver fails the job with one line saying so.
    return logger.flush(keep_unsent_at=storage.join(cfg.storage, cfg.name, UNLOGGED_DIR))


def save_checkpoint(
    trainee: Trainee, step: int, mean_loss: float, metrics: dict, rank: int, cfg: TrainConfig, logger
) -> None:
    trainee.state.step = step
    report(step, mean_loss, metrics, trainee, rank, cfg)
    if logger:
        logger.send()  # metrics up to a checkpoint survive a crash after it
        log.info("[%s] step %d/%d loss %.4f", cfg.name, step, cfg.max_steps, mean_loss)


def micro_batches(batch: dict, count: int) -> list[dict]:
    """The batch cut into `count` equal micro-batches (tensors and caption lists alike)."""
    rows = len(next(iter(batch.values())))
    size = rows // count
    return [{k: v[i * size : (i + 1) * size] for k, v in batch.items()} for i in range(count)]


def train_step(trainee: Trainee, batch: dict, lr: float, step: int):
    """One optimizer step over this worker's batch, in --grad-accum-steps micro-batches whose
    gradients add up to the whole batch's (each loss over their count); returns the loss and the
    gradient norm as device tensors (no sync)."""
    stage, model, optimizer, ema = trainee.stage, trainee.model, trainee.optimizer, trainee.ema
    set_lr(optimizer, lr)
    device_type = stage.device.type
    parts = micro_batches(batch, stage.cfg.grad_accum_steps)
    # Before the forward: the last step's gradients are not kept through this one's activations.
    optimizer.zero_grad(set_to_none=True)
    loss = None
    for i, part in enumerate(parts):
        # DDP all-reduces in the backward pass: once a step, on the last micro-batch, over the gradients
        # the others left (no_sync wraps their forward and backward).
        last = i == len(parts) - 1
        sync = model.no_sync() if not last and isinstance(model, DistributedDataParallel) else contextlib.nullcontext()
        with sync:
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=device_type == "cuda"):
                part_loss = stage.loss(model, part) / len(parts)
            part_loss.backward()
        loss = part_loss.detach() if loss is None else loss + part_loss.detach()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), stage.cfg.grad_clip)
    optimizer.step()
    if ema is not None:
        update_ema(ema, trainee.raw, trainee.ema_decay, step)
    return loss, grad_norm.detach()


class Means:
    """Running means of scalar tensors, summed on their device; read() syncs once and starts over.

    Reading a CUDA value (.item(), float()) waits for the GPU to finish; once per step that keeps
    the host from queueing the next step while this one runs.
    """

    def __init__(self):
        self._sums: dict[str, torch.Tensor] = {}
        self._count = 0

    def add(self, **values: torch.Tensor) -> None:
        for key, value in values.items():
            value = value.float()
            self._sums[key] = self._sums[key] + value if key in self._sums else value
        self._count += 1

    def read(self) -> dict[str, float]:
        totals = torch.stack(list(self._sums.values())).tolist() if self._sums else []  # one sync for all keys
        means = {key: total / self._count for key, total in zip(self._sums, totals)}
        self._sums, self._count = {}, 0
        return means


def init_weights(model: torch.nn.Module, uri: str) -> None:
    """Load the weights of the save_pretrained folder (or URI) at `uri`; the architectures must match."""
    from pipelines.platform.model_store import fetch_model

    # The stage built `model` from its config; from_pretrained of the same class reads the folder's.
    loaded = type(model).from_pretrained(str(fetch_model(uri)))
    model.load_state_dict(loaded.state_dict())
    log.info("weights initialised from %s", uri)


def evaluate(stage, model: torch.nn.Module, step: int, logger) -> dict[str, float]:
    logger.send()  # the training curve reaches MLflow before the (slower) samples
    was_training = model.training
    model.eval()
    try:
        metrics = stage.evaluate(model, step, logger)
    finally:
        model.train(was_training)
    logger.metrics(metrics, step=step)
    return metrics


def report(step: int, loss: float, evaluated: dict[str, float], trainee: Trainee, rank: int, cfg: TrainConfig) -> None:
    """Every rank reports (it is a barrier); only rank 0 attaches the checkpoint and the evaluation."""
    metrics = {"step": step, "loss": loss, **evaluated}
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    model = trainee.model
    raw = model.module if isinstance(model, DistributedDataParallel) else model
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint.save(tmp, raw, trainee.optimizer, trainee.state, trainee.ema)
        if cfg.local_mode:  # Ray Train's local mode keeps no checkpoint: keep it where Ray Train would
            keep_checkpoint(tmp, cfg, step)
            ray.train.report(metrics)
            return
        ray.train.report(
            metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=checkpoint_dir_name(step)
        )


def kept_checkpoints(cfg: TrainConfig) -> list[str]:
    """The run's complete checkpoints in storage (<storage>/<name>/step_*), oldest first."""
    run_dir = storage.join(cfg.storage, cfg.name)
    fs, path = storage.get_filesystem(run_dir)
    if not fs.exists(path):
        return []
    names = sorted(n.rstrip("/").rsplit("/", 1)[-1] for n in fs.ls(path, detail=False))
    steps = [storage.join(run_dir, n) for n in names if CHECKPOINT_NAME.fullmatch(n)]
    return [s for s in steps if storage.exists(storage.join(s, checkpoint.STATE))]


def keep_checkpoint(local_dir: str, cfg: TrainConfig, step: int) -> None:
    """Local mode: the checkpoint to <storage>/<name>/step_N, the newest CHECKPOINTS_KEPT kept, as
    Ray Train keeps its workers' (state.json last: a checkpoint without it is incomplete)."""
    target = storage.join(cfg.storage, cfg.name, checkpoint_dir_name(step))
    storage.remove(target, recursive=True)
    state_file = Path(local_dir) / checkpoint.STATE
    state = state_file.read_bytes()
    state_file.unlink()
    storage.upload_dir(local_dir, target)
    storage.write_bytes(storage.join(target, checkpoint.STATE), state)
    for old in kept_checkpoints(cfg)[:-CHECKPOINTS_KEPT]:
        storage.remove(old, recursive=True)


@contextlib.contextmanager
def resume_from(cfg: TrainConfig):
    """The checkpoint folder this rank resumes from, or None: Ray Train's when it has one; in local
    mode (where Ray Train keeps none) the run's newest in storage."""
    resume = ray.train.get_checkpoint()
    if resume is not None:
        with resume.as_directory() as folder:
            yield folder
        return
    newest = kept_checkpoints(cfg)[-1:] if cfg.local_mode else []
    if not newest or not storage.is_s3(newest[0]):
        yield newest[0] if newest else None
        return
    with tempfile.TemporaryDirectory() as folder:
        storage.download_dir(newest[0], folder)
        yield folder


def export(stage, model: torch.nn.Module, cfg: TrainConfig, logger) -> None:
    """The final (EMA) model in save_pretrained layout: to MLflow and to <storage>/<name>/model."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / MODEL_DIR
        stage.export(model, folder)
        logger.model(folder, stage.artifact)
        storage.remove(model_uri(cfg), recursive=True)
        storage.upload_dir(folder, model_uri(cfg))
