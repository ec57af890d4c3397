"""The training loop every Ray Train worker runs, the same for all stages.

1. set up   device from Ray Train (bf16 autocast + TF32 on CUDA only), the stage's model,
            EMA, AdamW; weights, EMA, optimizer and step from ray.train.get_checkpoint()
            when resuming (after a worker failure or a rerun with the same name), else
            the weights of --init-from when given (retraining from the registered model)
2. train    batches from this worker's dataset shard, DDP (prepare_model: NCCL on GPU, gloo
            on CPU), gradient clipping, linear warm-up, EMA after every step
3. log      rank 0: loss, lr, grad norm, steps/s, samples/s per step into the job's MLflow run;
            evaluation (sample videos, reconstructions, validation loss) every eval_every steps
4. save     every checkpoint_every steps: ray.train.report from every rank, the checkpoint
            (safetensors) from rank 0 only; at the last step rank 0 exports the model
            (save_pretrained) to MLflow and to <storage>/<name>/model
"""
from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from collections import deque
from pathlib import Path

import ray.train
import ray.train.torch
import torch
from torch.nn.parallel import DistributedDataParallel

from pipelines import storage, tracking
from pipelines.training import checkpoint
from pipelines.training.config import TrainConfig
from pipelines.training.optim import make_ema, make_optimizer, set_lr, update_ema, warmup_lr
from pipelines.training.stage import get_stage, to_device

log = logging.getLogger(__name__)  # Ray Train sends worker logs to the job's output (print would show twice)
MODEL_DIR = "model"  # <storage>/<name>/model: the final save_pretrained folder
UNLOGGED_DIR = "unlogged"  # <storage>/<name>/unlogged: metrics and artifacts the tracking server never took
UNLOGGED = "unlogged"  # the final report's key saying what was not logged and where it is kept
THROUGHPUT_WINDOW = 20  # steps averaged into steps/s: one step alone is too noisy to read


def checkpoint_dir_name(step: int) -> str:
    """<storage>/<name>/step_00001000: a checkpoint's folder, named by its step."""
    return f"step_{step:08d}"


def model_uri(cfg: TrainConfig) -> str:
    return storage.join(cfg.storage, cfg.name, MODEL_DIR)


def batches(shard, batch_size: int, collate, device: torch.device, seed: int):
    """This worker's batches, epoch after epoch, forever (the loop stops at max_steps)."""
    epoch = 0
    while True:
        count = 0
        for batch in shard.iter_torch_batches(
            batch_size=batch_size,
            collate_fn=collate,
            drop_last=True,  # equal batches on every rank: DDP needs the same number of steps everywhere
            prefetch_batches=2,  # the next batches are read and collated while this step runs
            # Shards hold one video's clips side by side; a buffer of a few batches mixes them.
            local_shuffle_buffer_size=batch_size * 4,
            local_shuffle_seed=seed + epoch,
        ):
            count += 1
            yield to_device(batch, device)
        if count == 0:
            raise RuntimeError(f"this worker's data shard gave no full batch of {batch_size}: too few clips per worker")
        epoch += 1


def train_loop(loop_config: dict) -> None:
    """Ray Train's train_loop_per_worker. loop_config: config (TrainConfig fields), plan, run_id, tracking_uri."""
    cfg = TrainConfig(**loop_config["config"])
    stage_cls = get_stage(cfg.stage)
    spec = stage_cls.optimizer
    rank = ray.train.get_context().get_world_rank()
    device = ray.train.torch.get_device()
    cuda = device.type == "cuda"
    if cuda:
        # TF32 matmuls: DiT's train.py notes this "makes A100 training a lot faster".
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    stage = stage_cls(cfg, loop_config["plan"], device)
    raw = stage.model
    resume = ray.train.get_checkpoint()
    if cfg.init_from and not resume:
        init_weights(raw, cfg.init_from)  # before the EMA copy: both start from the given model
    ema_decay = cfg.ema_decay if cfg.ema_decay is not None else spec.ema_decay
    ema = make_ema(raw) if ema_decay else None
    best = raw if ema is None else ema  # what is evaluated and exported: the EMA weights where kept
    state = checkpoint.TrainState(run_id=loop_config["run_id"], config=loop_config["config"])
    with resume.as_directory() if resume else contextlib.nullcontext() as resume_dir:
        if resume_dir:
            state.step = checkpoint.load_weights(resume_dir, raw, ema).step
        model = ray.train.torch.prepare_model(raw)  # to the device; DDP when there are several workers
        if ema is not None:
            ema.to(device)
        optimizer = make_optimizer(raw.parameters(), cfg.learning_rate, spec)
        if resume_dir:
            checkpoint.load_optimizer_state(resume_dir, optimizer)
    start = state.step
    torch.manual_seed(cfg.seed + 1000 * rank + 7919 * start)  # fresh noise per rank, and after a resume

    logger = tracking.RunLogger(loop_config["tracking_uri"], loop_config["run_id"]) if rank == 0 else None
    if logger:
        logger.metrics({"resumed_from_step": start, "torch_threads": torch.get_num_threads()}, step=start)
        logger.send()
        log.info("[%s] %s: step %d -> %d, %d worker(s) on %s", cfg.name, cfg.stage, start, cfg.max_steps, cfg.num_workers, device)

    shard = ray.train.get_dataset_shard("train")
    data = batches(shard, cfg.worker_batch, stage.collate(), device, seed=cfg.seed + 1000 * rank + start)
    times, losses = deque([time.perf_counter()], maxlen=THROUGHPUT_WINDOW + 1), []
    evaluated: dict[str, float] = {}  # the latest evaluation, reported with each checkpoint (Tune reads eval/loss)
    step = start
    model.train()
    while step < cfg.max_steps:
        batch = next(data)
        lr = warmup_lr(cfg.learning_rate, step, cfg.warmup_steps)
        set_lr(optimizer, lr)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            loss = stage.loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        if ema is not None:
            update_ema(ema, raw, ema_decay, step)
        step += 1
        losses.append(loss.item())
        times.append(time.perf_counter())

        if logger:
            steps_per_s = (len(times) - 1) / (times[-1] - times[0])
            logger.metrics({"loss": losses[-1], "lr": lr, "grad_norm": float(grad_norm), "steps_per_s": steps_per_s,
                            "samples_per_s": steps_per_s * cfg.global_batch}, step=step)
        last = step == cfg.max_steps
        paused = False
        if logger and (step % cfg.eval_every == 0 or last):
            evaluated = evaluate(stage, best, step, logger)
            paused = True
        unlogged = None
        if last and logger:
            # Before the last report: under Tune a scheduler may stop the trial as soon as it sees it.
            export(stage, best, cfg, logger)
            # A tracking server away for longer than CMD_TRACKING_OUTAGE_S: what it missed is kept
            # beside the checkpoints, and the driver fails the job with one line saying so.
            unlogged = logger.flush(keep_unsent_at=storage.join(cfg.storage, cfg.name, UNLOGGED_DIR))
        if step % cfg.checkpoint_every == 0 or last:
            state.step = step
            report(step, losses, {**evaluated, **({UNLOGGED: unlogged} if unlogged else {})}, model, optimizer, state, ema, rank)
            if logger:
                logger.send()  # metrics up to a checkpoint survive a crash after it
                log.info("[%s] step %d/%d loss %.4f", cfg.name, step, cfg.max_steps, sum(losses) / len(losses))
            losses, paused = [], True
        if paused:  # evaluation and checkpoint time is not training throughput
            times.clear()
            times.append(time.perf_counter())


def init_weights(model: torch.nn.Module, uri: str) -> None:
    """Load the weights of the save_pretrained folder (or URI) at `uri`; the architectures must match."""
    from pipelines.model_store import localize

    # The stage built `model` from its config; from_pretrained of the same class reads the folder's.
    loaded = type(model).from_pretrained(str(localize(uri)))
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


def report(step: int, losses: list[float], evaluated: dict[str, float], model, optimizer, state, ema, rank: int) -> None:
    """Every rank reports (it is a barrier); only rank 0 attaches the checkpoint and the evaluation."""
    metrics = {"step": step, "loss": sum(losses) / max(1, len(losses)), **evaluated}
    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    raw = model.module if isinstance(model, DistributedDataParallel) else model
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint.save(tmp, raw, optimizer, state, ema)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp), checkpoint_dir_name=checkpoint_dir_name(step))


def export(stage, model: torch.nn.Module, cfg: TrainConfig, logger) -> None:
    """The final (EMA) model in save_pretrained layout: to MLflow and to <storage>/<name>/model."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / MODEL_DIR
        stage.export(model, folder)
        logger.model(folder, stage.artifact)
        storage.remove(model_uri(cfg), recursive=True)
        storage.upload_dir(folder, model_uri(cfg))
