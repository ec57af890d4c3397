"""Training throughput: the Ray Train harness against a plain PyTorch loop, one JSON line per stage.

    python benchmarks/train.py                      # tiny preset, CPU, stages motion and content
    python benchmarks/train.py --stages motion --steps 300

1. data     random latents of the preset, written as precompute writes them (Parquet shards)
2. ray      the harness (pipelines.training.fit) with 1 worker; samples/s is the median of the
            per-step figure it logs to MLflow, after the warm-up steps
3. plain    the same stage (model, loss, AdamW, clipping, EMA) over the same rows, pre-batched
            in memory, in this process with as many torch threads as the Ray worker has
4. repeat   steps 2-3 --repeats times, alternating; medians of each side and of the pairs' overheads
5. report   {"stage", "ray_train_samples_per_s", "plain_samples_per_s", "overhead_pct", ...}
Seconds per step and peak GPU memory of each model at the paper's sizes (Table 8) are
benchmarks/train_step.py's job.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

WARMUP_STEPS = 20  # first steps compile kernels, fill the prefetch queue and warm the allocator


def write_random_latents(output: Path, preset_name: str, clips: int, seed: int = 0) -> Path:
    from cmd_model.presets import get_preset
    from pipelines.data import latent_shards as shards
    from pipelines.data.video.schema import (
        CAPTION,
        CLIP_INDEX,
        FPS,
        FRAME_STRIDE,
        LABEL,
        NUM_CLIPS,
        SOURCE,
        START_FRAME,
        VIDEO_ID,
    )

    p = get_preset(preset_name)
    rng = np.random.default_rng(seed)
    batch = {
        VIDEO_ID: np.array([f"v{i}" for i in range(clips)], dtype=object),
        SOURCE: np.array([f"/v{i}.mp4" for i in range(clips)], dtype=object),
        CLIP_INDEX: np.zeros(clips, np.int32),
        NUM_CLIPS: np.ones(clips, np.int32),
        START_FRAME: np.zeros(clips, np.int32),
        FRAME_STRIDE: np.ones(clips, np.int32),
        FPS: np.full(clips, 24, np.float32),
        CAPTION: np.array([f"caption {i % 7}" for i in range(clips)], dtype=object),
        LABEL: np.array([i % 5 for i in range(clips)], dtype=object),
        shards.CONTENT: rng.normal(size=(clips, *p.content_shape)).astype(np.float32),
        shards.MOTION: np.tanh(rng.normal(size=(clips, *p.motion_shape))).astype(np.float32),
    }
    manifest = {"schema_version": shards.SCHEMA_VERSION, "autoencoder_digest": "", "preset": preset_name}
    schema = shards.latent_schema(p.content_shape, p.motion_shape, manifest)
    for part in np.array_split(np.arange(clips), 8):
        shards.write_atomic(
            shards.latent_table({k: v[part] for k, v in batch.items()}, schema), str(output / shards.LATENTS_DIR)
        )
    shards.write_manifest(str(output), manifest)
    return output


def ray_samples_per_s(cfg) -> tuple[float, int]:
    """Median samples/s the harness logged after warm-up, and the worker's torch threads."""
    from mlflow import MlflowClient

    from pipelines.platform import tracking
    from pipelines.training import fit

    result = fit(cfg)
    client = MlflowClient(tracking.tracking_uri())
    values = [m.value for m in client.get_metric_history(result.run_id, "samples_per_s") if m.step > WARMUP_STEPS]
    threads = int(client.get_run(result.run_id).data.metrics.get("torch_threads", 0))
    return statistics.median(values), threads


def plain_samples_per_s(cfg, threads: int) -> float:
    """The same stage, optimiser and batches in this process, no Ray."""
    from pipelines.training import get_stage
    from pipelines.training.data import collate_latents, read_latent_rows
    from pipelines.training.optim import make_ema, make_optimizer, update_ema

    torch.set_num_threads(max(1, threads))
    stage_cls = get_stage(cfg.stage)
    device = torch.device("cuda" if cfg.use_gpu else "cpu")
    torch.manual_seed(cfg.seed)
    stage = stage_cls(cfg, stage_cls.prepare(cfg), device)
    model = stage.model.to(device).train()
    ema = make_ema(model) if stage_cls.optimizer.ema_decay else None
    optimizer = make_optimizer(model.parameters(), cfg.learning_rate, stage_cls.optimizer)
    rows = read_latent_rows(cfg.latents, stage_cls.columns(cfg), cfg.max_steps * cfg.global_batch)
    b = cfg.global_batch
    batches = [
        collate_latents({k: v[i : i + b] for k, v in rows.items()}) for i in range(0, len(rows["content"]) - b + 1, b)
    ]
    times = []
    for step in range(cfg.max_steps):
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batches[step % len(batches)].items()}
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = stage.loss(model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        if ema is not None:
            update_ema(ema, model, stage_cls.optimizer.ema_decay, step)
        if (step + 1) % cfg.log_every == 0:
            loss.item()  # the harness reads the loss (a device sync) once per --log-every steps too
        times.append(time.perf_counter() - start)
    return b / statistics.median(times[WARMUP_STEPS:])


def compare(stage: str, preset: str, steps: int, batch: int, repeats: int, root: Path, sd: str | None) -> dict:
    """Both sides `repeats` times, alternating (this machine's speed drifts); medians of each."""
    from pipelines.training import TrainConfig

    latents = write_random_latents(root / f"latents-{preset}", preset, clips=max(4096, batch * 64))
    ray_rates, plain_rates, overheads = [], [], []
    for repeat in range(repeats):
        cfg = TrainConfig(
            stage=stage,
            preset=preset,
            name=f"bench-{stage}-{int(time.time())}-{repeat}",
            storage=str(root / "runs"),
            max_steps=steps,
            batch_size=batch,
            num_workers=1,
            eval_every=10**9,
            checkpoint_every=10**9,
            latents=str(latents),
            stable_diffusion=sd,
            experiment="cmd-benchmarks",
        )
        ray_rate, threads = ray_samples_per_s(cfg)
        plain_rate = plain_samples_per_s(cfg, threads)
        ray_rates.append(ray_rate)
        plain_rates.append(plain_rate)
        overheads.append(100 * (plain_rate - ray_rate) / plain_rate)
    return {
        "stage": stage,
        "preset": preset,
        "workers": 1,
        "batch": batch,
        "steps": steps,
        "device": "cpu",
        "repeats": repeats,
        "log_every": cfg.log_every,
        "torch_threads": threads,
        "ray_train_samples_per_s": round(statistics.median(ray_rates), 2),
        "plain_samples_per_s": round(statistics.median(plain_rates), 2),
        "overhead_pct": round(statistics.median(overheads), 1),  # median of the side-by-side pairs
        "overhead_pct_each": [round(o, 1) for o in overheads],
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stages", nargs="+", default=["motion", "content"], choices=["motion", "content"])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3, help="side-by-side pairs per stage; the figures are medians")
    args = ap.parse_args(argv)
    from cmd_model.content import build_tiny_sd
    from cmd_model.presets import get_preset

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        os.chdir(root)  # MLflow's SQLite store puts artifacts in ./mlruns: keep them in the temp folder
        sd = (
            str(build_tiny_sd(root / "sd", text_dim=get_preset(args.preset).motion.text_dim))
            if args.preset == "tiny"
            else None
        )
        for stage in args.stages:
            print(
                json.dumps(compare(stage, args.preset, args.steps, args.batch_size, args.repeats, root, sd)), flush=True
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
