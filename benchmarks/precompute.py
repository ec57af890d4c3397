"""Clips/s of the precompute job against decode + clip alone, and peak memory at N and 10N videos.

    python benchmarks/precompute.py                  # N = 50 videos (10N: 2,000 clips), one repeat
    python benchmarks/precompute.py --videos 8 --repeats 3

Tiny preset on CPU: generated videos (64 frames of 320x240 H.264 by default, 4 clips each; one file
copied N and 10N times), a tiny random Stable Diffusion VAE (cmd_model.content.build_tiny_sd) and a
random VideoAutoencoder saved with save_pretrained. Every Ray run starts its own local Ray on
loopback, so its memory figures hold a whole cluster's start-up and nothing from the run before.

Prints ONE JSON line (figures are medians over --repeats):
- job.N / job.10N: pipelines.data.precompute.run.
  - clips_per_s_total: clips / the job's own `seconds` (checks, Ray Data and actor start-up, stages).
  - clips_per_s_first_to_last_shard: start-up left out: clips written after the first shard over the
    time from the first shard's mtime to the last one's (shards of --rows-per-shard rows). Optimistic
    if the decoder ran ahead while the encoder was still starting;
    clips_per_s_first_decode_to_last_shard is the conservative twin (from the first decoder process).
  - cpu_seconds: CPU time of the whole process tree (see below) during the run.
  - peak_rss_mib: peak, sampled every 0.2 s, of the summed RSS of this process and all its
    descendants: Ray's GCS, raylet and workers, and each decode task's decoder child. Pages shared
    between processes (libraries, Ray's object store) count once per process: an upper bound.
    rss_at_peak_mib breaks it down by process name.
- decode_only: the same videos decoded and clipped with nothing after it:
  isolated_1proc (one IsolatedDecoder driven from this process: one decode process, as the job has
  on 2 CPUs), isolated_all_cores (one per CPU, in threads: the machine's decode bound) and
  ray_decode_stage (the job's own decode stage: the same tasks and resources, output dropped).
- ratio: the one steady-state figure (see ratio_basis): from the first decode to the last shard,
  over decode-only in one process; ratio_other relates other pairs.
- stage_cpu_ms_per_clip: CPU ms per clip of decode + clip and of encode, each on one thread in this
  process. CPU time barely moves when other work shares the machine, so this gives the job's ceiling
  on idle cores: decode and encode side by side, the slower one setting the pace.
- memory_growth: job peak RSS at 10N over N.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import psutil
import torch

from cmd_model.autoencoder import VideoAutoencoder
from cmd_model.content import build_tiny_sd
from cmd_model.generate import write_video
from cmd_model.presets import get_preset
from pipelines.data import latent_shards as shards
from pipelines.data.decode_stage import decode_stage
from pipelines.data.precompute import PrecomputeConfig, actor_counts, plan, plan_blocks, run
from pipelines.data.video.isolated import IsolatedDecoder

ROOT = Path(__file__).resolve().parents[1]
PRESET = get_preset("tiny")
TARGET_RATIO, TARGET_GROWTH = 0.8, 1.3


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------


def textured_frame(index: int, width: int, height: int) -> np.ndarray:
    """Moving colour gradients, a moving square and mild noise: costs the decoder like footage does,
    unlike flat test frames. The square bounces between the edges: one that jumped back to the left
    edge would be a hard cut to a scene-cut detector (benchmarks/scene_cuts.py), and split clips."""
    yy, xx = np.mgrid[0:height, 0:width]
    frame = np.stack([(xx * 2 + index * 3) % 256, (yy * 2 + index * 2) % 256, ((xx + yy) // 2 + index) % 256], -1)
    travel = width - width // 4
    x = (index * 4) % (2 * travel)
    x = x if x < travel else 2 * travel - x
    frame[height // 3 : height // 3 + height // 4, x : x + width // 4] = 255
    noise = np.random.default_rng(index).integers(-6, 7, frame.shape)
    return np.clip(frame + noise, 0, 255).astype(np.uint8)


def make_videos(directory: Path, count: int, template: str) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = directory / f"video_{i:04d}.mp4"
        shutil.copy(template, path)
        paths.append(str(path))
    return paths


def make_models(directory: Path) -> tuple[str, str]:
    sd = build_tiny_sd(directory / "tiny-sd", text_dim=PRESET.motion.text_dim)
    torch.manual_seed(0)
    ae = directory / "autoencoder"
    VideoAutoencoder.from_preset_config(PRESET.autoencoder).save_pretrained(ae)
    return str(ae), str(sd)


# ---------------------------------------------------------------------------------------------
# Measurement helpers
# ---------------------------------------------------------------------------------------------


class TreeMonitor:
    """Samples this process and all its descendants every `interval_s` in a thread: the peak of their
    summed RSS (with a per-name breakdown at the peak), the CPU seconds they used (per pid, the last
    reading minus the reading when first seen or at start), and when a decoder child first appeared."""

    def __init__(self, interval_s: float = 0.2):
        self.interval_s, self.peak, self.samples = interval_s, 0, 0
        self.at_peak: dict[str, float] = {}  # process name -> MiB, summed per name, at the peak
        # time.time() when a `pipelines.data.video.isolated --serve` child showed up
        self.first_decoder: float | None = None
        self._cpu: dict[int, list[float]] = {}  # pid -> [first reading, last reading]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    @property
    def cpu_seconds(self) -> float:
        return sum(last - first for first, last in self._cpu.values())

    def sample(self) -> None:
        me = psutil.Process()
        total, names = 0, {}
        for proc in [me, *me.children(recursive=True)]:  # Ray's processes descend from ray.init here
            try:
                with proc.oneshot():
                    rss, cpu = proc.memory_info().rss, proc.cpu_times()
                    name = "driver" if proc.pid == me.pid else proc.name()
                    if self.first_decoder is None and "pipelines.data.video.isolated" in " ".join(proc.cmdline()):
                        self.first_decoder = time.time()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            used = cpu.user + cpu.system
            # A process born after the start counts from zero, one alive before from its first reading.
            self._cpu.setdefault(proc.pid, [used if not self.samples else 0.0, used])[1] = used
            total += rss
            names[name] = names.get(name, 0) + rss / 2**20
        if total > self.peak:
            self.peak, self.at_peak = total, names
        self.samples += 1

    def _loop(self):
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self.sample()  # baseline readings of the processes alive now
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def start_ray(num_cpus: int):
    import ray
    from ray.data import DataContext

    ray.init(
        address="local",
        num_cpus=num_cpus,
        include_dashboard=False,
        log_to_driver=False,
        # Ray's env_vars replace a worker's PYTHONPATH: keep the driver's (packages installed off the venv)
        runtime_env={
            "env_vars": {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        },
    )
    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    return ray


def steady_rate(events: list[tuple[float, int]]) -> float | None:
    """(time, rows) per output, in order -> rows after the first output / time from first to last."""
    if len(events) < 2 or events[-1][0] <= events[0][0]:
        return None
    return sum(n for _, n in events[1:]) / (events[-1][0] - events[0][0])


def job_once(videos_dir: Path, out: Path, ae: str, sd: str, rows_per_shard: int, num_cpus: int) -> dict:
    import pyarrow.parquet as pq

    ray = None
    with TreeMonitor() as tree:
        try:
            began = time.time()  # wall clock, like the shards' mtimes
            ray = start_ray(num_cpus)
            summary = run(
                PrecomputeConfig(
                    input=str(videos_dir),
                    output=str(out),
                    autoencoder=ae,
                    preset=PRESET,
                    stable_diffusion=sd,
                    rows_per_shard=rows_per_shard,
                    overwrite=True,
                )
            )
            tree.sample()  # CPU readings of the Ray workers before shutdown ends them
        finally:
            if ray is not None:
                ray.shutdown()
    assert summary["videos_failed"] == 0, shards.read_errors(str(out)).to_pylist()
    files = sorted((out / shards.LATENTS_DIR).glob("*.parquet"), key=lambda p: p.stat().st_mtime_ns)
    events = [(p.stat().st_mtime_ns / 1e9, pq.read_metadata(p).num_rows) for p in files]
    clips = summary["clips_written_this_run"]
    return {
        "clips": clips,
        "shards": len(files),
        "seconds_total": summary["seconds"],  # run(): checks, Ray Data and actor start-up, all stages
        "clips_per_s_total": clips / summary["seconds"],
        "seconds_to_first_shard": events[0][0] - began,  # ray.init + actor start-up + the first batch
        "clips_per_s_first_to_last_shard": steady_rate(events),
        # Conservative: from the moment the first decoder process started; includes any wait for the encoder.
        "clips_per_s_first_decode_to_last_shard": clips / (events[-1][0] - tree.first_decoder)
        if tree.first_decoder
        else None,
        # How long the decoder ran before the first shard: near 0 when all stages start together; when
        # large, the decoder ran ahead while the encoder started, and first-to-last-shard is optimistic.
        "seconds_first_decode_to_first_shard": events[0][0] - tree.first_decoder if tree.first_decoder else None,
        "cpu_seconds": tree.cpu_seconds,
        "peak_rss_mib": tree.peak / 2**20,
        "rss_at_peak_mib": {k: round(v) for k, v in sorted(tree.at_peak.items(), key=lambda kv: -kv[1])},
    }


def decode_isolated(paths: list[str], workers: int) -> dict:
    """Decode + clip with `workers` IsolatedDecoders (children started before the clock), in threads."""
    spec = PrecomputeConfig(input="", output="", autoencoder="", preset=PRESET).clip_spec()
    decoders = [IsolatedDecoder(spec).__enter__() for _ in range(workers)]
    counts = [0] * workers

    def work(k: int) -> None:
        for path in paths[k::workers]:
            for rows, error in decoders[k].decode_chunks(path):
                assert error is None, error
                counts[k] += len(rows)

    try:
        with TreeMonitor() as tree:
            began = time.monotonic()
            with ThreadPoolExecutor(workers) as pool:
                list(pool.map(work, range(workers)))
            seconds = time.monotonic() - began
            tree.sample()
    finally:
        for d in decoders:
            d.close()
    clips = sum(counts)
    return {
        "clips": clips,
        "seconds": seconds,
        "clips_per_s": clips / seconds,
        "workers": workers,
        "cpu_seconds": tree.cpu_seconds,
    }


def decode_ray_stage(videos_dir: Path, out: Path, num_cpus: int) -> dict:
    """The job's decode stage alone (decode_stage.decode_stage on the job's plan blocks); rows dropped."""
    cfg = PrecomputeConfig(input=str(videos_dir), output=str(out), autoencoder="", preset=PRESET)
    with TreeMonitor() as tree:
        ray = start_ray(num_cpus)
        try:
            began = time.monotonic()
            out.mkdir(parents=True, exist_ok=True)
            todo, _ = plan(cfg)
            res = actor_counts(None)
            ds = decode_stage(
                ray.data.from_arrow(plan_blocks(todo, res["decoders"])), cfg.clip_spec(), res["decoders"], cfg.output
            )
            events = []
            for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
                events.append((time.monotonic(), len(batch["clip_index"])))
            seconds = time.monotonic() - began
            tree.sample()
        finally:
            ray.shutdown()
    clips = sum(n for _, n in events)
    return {
        "clips": clips,
        "seconds_total": seconds,
        "clips_per_s_total": clips / seconds,
        "clips_per_s_first_to_last": steady_rate(events),
        "decoders": res["decoders"],
        "cpu_seconds": tree.cpu_seconds,
    }


def median_dict(runs: list[dict]) -> dict:
    out = {}
    for key, value in runs[0].items():
        values = [r[key] for r in runs if r[key] is not None]
        if isinstance(value, (int, float)) and not isinstance(value, bool) and values:
            out[key] = round(statistics.median(values), 3)
        else:
            out[key] = value
    return out


def stage_costs(template: str, ae: str, sd: str, repeats: int = 3) -> dict:
    """CPU ms per clip of decode + clip and of encode alone, in this process with one thread each, as
    the job's actors run them (Ray sets OMP_NUM_THREADS=1 for them); CPU time, so other work on a
    shared machine changes it little."""
    from pipelines.data.latent_encoder import EncodeLatents
    from pipelines.data.video.decode import decode_clips

    spec = PrecomputeConfig(input="", output="", autoencoder="", preset=PRESET).clip_spec()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        decode_clips(template, spec)  # warm-up
        began = time.process_time()
        clips = [row for _ in range(repeats * 4) for row in decode_clips(template, spec)]
        decode_ms = 1e3 * (time.process_time() - began) / len(clips)
        encoder = EncodeLatents(PRESET, ae, sd)
        batch = np.stack([row["frames"] for row in clips[:16]])  # the job's encode batch: 16 clips
        encoder.encode(batch)
        began = time.process_time()
        for _ in range(repeats):
            encoder.encode(batch)
        encode_ms = 1e3 * (time.process_time() - began) / (repeats * len(batch))
    finally:
        torch.set_num_threads(threads)
    return {"decode_ms": decode_ms, "encode_ms": encode_ms}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--videos", type=int, default=50, help="N: the small run; the big run has 10N (50: 2,000 clips, start-up <10%%)"
    )
    p.add_argument("--repeats", type=int, default=1, help="figures are medians over the repeats")
    p.add_argument("--frames", type=int, default=64)
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--height", type=int, default=240)
    p.add_argument(
        "--rows-per-shard", type=int, default=1024, help="shard size (the job's default; shards also flush every 10 s)"
    )
    p.add_argument(
        "--num-cpus",
        type=int,
        default=len(os.sched_getaffinity(0)),
        help="CPUs of each local Ray and decoders of isolated_all_cores (default: the CPUs this process may use)",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = p.parse_args(argv)
    if args.videos < 1 or args.repeats < 1 or args.num_cpus < 1:
        p.error("--videos, --repeats and --num-cpus must be at least 1")
    return args


def measure_all(args: argparse.Namespace, tmp: Path) -> dict[str, dict]:
    """Every measurement, interleaved over --repeats; returns the median of each, by name."""
    cpus = args.num_cpus
    frames = np.stack([textured_frame(i, args.width, args.height) for i in range(args.frames)])
    template = str(write_video(frames, tmp / "template.mp4", fps=24, crf=12, x264_preset="ultrafast"))
    ae, sd = make_models(tmp / "models")
    sizes = {"N": args.videos, "10N": 10 * args.videos}
    dirs = {k: tmp / f"videos_{k}" for k in sizes}
    paths = {k: make_videos(dirs[k], n, template) for k, n in sizes.items()}
    runs: dict[str, list[dict]] = {}
    # Warm-up, discarded: the first Ray start in a process pays for cold caches, which would land on N.
    job_once(dirs["N"], tmp / "out_warmup", ae, sd, args.rows_per_shard, cpus)
    for r in range(args.repeats):
        # Interleaved, so slow spells of a shared machine hit all kinds alike
        runs.setdefault("stage_costs", []).append(stage_costs(template, ae, sd))
        for k in sizes:
            runs.setdefault(f"job.{k}", []).append(
                job_once(dirs[k], tmp / f"out_{k}_{r}", ae, sd, args.rows_per_shard, cpus)
            )
            runs.setdefault(f"isolated_1proc.{k}", []).append(decode_isolated(paths[k], 1))
            runs.setdefault(f"isolated_all_cores.{k}", []).append(decode_isolated(paths[k], cpus))
            runs.setdefault(f"ray_decode_stage.{k}", []).append(decode_ray_stage(dirs[k], tmp / f"dec_{k}_{r}", cpus))
    return {name: median_dict(values) for name, values in runs.items()}


def report(args: argparse.Namespace, med: dict[str, dict], load_before: tuple[float, ...]) -> dict:
    """The one JSON line: figures, the steady-state ratio and the targets."""
    cpus = args.num_cpus
    sizes = {"N": args.videos, "10N": 10 * args.videos}
    job = {k: med[f"job.{k}"] for k in sizes}
    decode_only = {
        way: {k: med[f"{way}.{k}"] for k in sizes}
        for way in ("isolated_1proc", "isolated_all_cores", "ray_decode_stage")
    }
    big = job["10N"]
    one, every = (decode_only[w]["10N"] for w in ("isolated_1proc", "isolated_all_cores"))
    cost = med["stage_costs"]
    # On idle cores, decode (1 process) and encode (1 thread) run side by side: the slower one sets the pace.
    projected = 1e3 / max(cost["decode_ms"], cost["encode_ms"])

    def ratio(a, b):
        return round(a / b, 3) if a and b else None

    result = {
        "benchmark": "precompute",
        "preset": PRESET.name,
        "machine": {
            "cpus": cpus,
            "gpu": torch.cuda.is_available(),
            "load_avg_1m_before_after": [round(load_before[0], 1), round(os.getloadavg()[0], 1)],
        },
        "videos": {
            "N": args.videos,
            "10N": 10 * args.videos,
            "frames": args.frames,
            "size": f"{args.width}x{args.height}",
            "codec": "h264 (libx264 ultrafast, crf 12)",
            "clips_per_video": args.frames // PRESET.clips.num_frames,
        },
        "repeats": args.repeats,
        "job": job,
        "decode_only": decode_only,
        "ratio": ratio(big["clips_per_s_first_decode_to_last_shard"], one["clips_per_s"]),
        "ratio_basis": "10N videos: job clips/s from its first decode (the first decoder process) to its last "
        "shard, so Ray and actor start-up are left out but every wait inside the job counts / "
        "decode_only.isolated_1proc clips/s (one IsolatedDecoder in one process: the job's "
        "decode parallelism here, where Ray gives the one decode task 1 of the 2 CPUs)",
        "ratio_other": {
            "first_to_last_shard_vs_all_cores": ratio(big["clips_per_s_first_to_last_shard"], every["clips_per_s"]),
            "first_to_last_shard_vs_ray_decode_stage": ratio(
                big["clips_per_s_first_to_last_shard"],
                decode_only["ray_decode_stage"]["10N"]["clips_per_s_first_to_last"],
            ),
            "total_vs_1proc": ratio(big["clips_per_s_total"], one["clips_per_s"]),
            "total_vs_ray_decode_stage_total": ratio(
                big["clips_per_s_total"], decode_only["ray_decode_stage"]["10N"]["clips_per_s_total"]
            ),
        },
        # CPU time hardly depends on what else runs on the machine: the job's ceiling on idle cores.
        "stage_cpu_ms_per_clip": {
            "decode_and_clip": round(cost["decode_ms"], 2),
            "encode_vae_and_autoencoder": round(cost["encode_ms"], 2),
            "projected_job_clips_per_s_on_2_idle_cores": round(projected, 1),
            "projected_ratio_vs_1proc": ratio(projected, 1e3 / cost["decode_ms"]),
            "projected_ratio_vs_all_cores": ratio(projected, cpus * 1e3 / cost["decode_ms"]),
        },
        "memory_growth": ratio(job["10N"]["peak_rss_mib"], job["N"]["peak_rss_mib"]),
        "targets": {"ratio_min": TARGET_RATIO, "memory_growth_max": TARGET_GROWTH},
    }
    result["meets_targets"] = {
        "ratio": result["ratio"] is not None and result["ratio"] >= TARGET_RATIO,
        "memory_growth": result["memory_growth"] is not None and result["memory_growth"] < TARGET_GROWTH,
    }
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="bench-precompute-"))
    try:
        print(json.dumps(report(args, measure_all(args, tmp), load_before)))
    finally:
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
