"""How precompute's driver-side cost grows: planning, resume and dataset construction at 10 k..10 M videos.

    python benchmarks/precompute_scale.py                      # 10k, 100k, 1M sources, writer MB/s, S3 listing of 100k
    python benchmarks/precompute_scale.py --sizes 10000000 --listing 0

No decoding: each size is a synthetic Parquet manifest of N sources (paths that need not exist)
and an output where 90% of the videos already have their 2 clips written (real latent shards of
1,024 rows, tiny tensors: planning reads only the identity columns) and 2% are recorded as bad
(error files of 10,000 rows, as the sinks batch them). Each size is measured in a fresh process:
  plan_seconds        pipelines.data.precompute.plan (sources, written clips, errors, the anti-joins)
  dataset_seconds     ray.data.from_arrow(plan_blocks(todo)): the Ray Data dataset the job runs
  peak_rss_mib        the process's peak RSS (VmHWM), Ray's own processes not included
Also printed: the Parquet writing rate of one ShardSink (MB/s, the 512x1024 preset's latents) and
the time to list and plan an s3:// prefix of --listing video objects on SeaweedFS (loopback).
One JSON line per figure.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CLIPS_PER_VIDEO = 2


def peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM). Not ru_maxrss: Linux carries that across execve, so a child
    started from a big parent would report the parent's peak."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def build_fixture(root: Path, n: int) -> tuple[str, str]:
    """A manifest of n sources and an output with 90% of them written and 2% failed."""
    from pipelines.data import latent_shards as shards
    from pipelines.data.video.schema import make_video_id

    root.mkdir(parents=True, exist_ok=True)
    paths = [f"/data/videos/{i // 1000:05d}/{i:08d}.mp4" for i in range(n)]
    manifest = root / "manifest.parquet"
    pq.write_table(pa.table({"path": paths, "caption": [f"video {i}" for i in range(n)]}), manifest)
    written = int(n * 0.9)
    ids = np.array([make_video_id(p) for p in paths[:written]], dtype=object)
    schema = shards.latent_schema((1,), (1,), {"preset": "scale-benchmark"})
    out = root / "out"
    rows_per_shard, per_file = 1024, 1024 // CLIPS_PER_VIDEO
    for start in range(0, written, per_file):
        vid = np.repeat(ids[start : start + per_file], CLIPS_PER_VIDEO)
        m = len(vid)
        batch = {
            "video_id": vid,
            "source": np.repeat(np.array(paths[start : min(start + per_file, written)], dtype=object), CLIPS_PER_VIDEO),
            "clip_index": np.tile(np.arange(CLIPS_PER_VIDEO, dtype=np.int32), m // CLIPS_PER_VIDEO),
            "num_clips": np.full(m, CLIPS_PER_VIDEO, np.int32),
            "start_frame": np.zeros(m, np.int32),
            "frame_stride": np.ones(m, np.int32),
            "fps": np.full(m, 24, np.float32),
            "caption": np.full(m, "c", dtype=object),
            "label": np.full(m, None, dtype=object),
            "content": np.zeros((m, 1), np.float16),
            "motion": np.zeros((m, 1), np.float16),
        }
        assert m <= rows_per_shard
        shards.write_atomic(shards.latent_table(batch, schema), str(out / shards.LATENTS_DIR))
    failed = paths[written : written + int(n * 0.02)]
    for start in range(0, len(failed), 10_000):
        shards.write_errors(
            [{"source": p, "stage": "decode", "reason": "corrupt: synthetic"} for p in failed[start : start + 10_000]],
            str(out),
        )
    return str(manifest), str(out)


def measure(manifest: str, out: str, with_dataset: bool = True) -> dict:
    """Runs in a fresh process: plan + dataset construction, and this process's peak RSS."""
    # Libraries loaded before the baseline, so that the RSS growth is the plan's, not their code's.
    import pyarrow.acero  # noqa: F401
    import pyarrow.compute  # noqa: F401
    import pyarrow.csv  # noqa: F401
    import pyarrow.dataset  # noqa: F401

    from cmd_model.presets import get_preset
    from pipelines.data.precompute import PrecomputeConfig, plan, plan_blocks

    cfg = PrecomputeConfig(input=manifest, output=out, autoencoder="", preset=get_preset("tiny"))
    rss_before = peak_rss_mib()  # after the imports
    began = time.perf_counter()
    todo, seen = plan(cfg)
    planned = time.perf_counter()
    plan_rss = peak_rss_mib() - rss_before
    row = {
        "sources": seen,
        "todo": todo.num_rows,
        "plan_seconds": round(planned - began, 2),
        "plan_peak_rss_growth_mib": round(plan_rss, 1),
    }
    if not with_dataset:
        return row
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    built = time.perf_counter()
    blocks = plan_blocks(todo, decoders=64)  # the block count a 64-decoder cluster gets
    ds = ray.data.from_arrow(blocks)
    dataset_seconds = time.perf_counter() - built
    ray.shutdown()
    return {
        **row,
        "dataset_seconds": round(dataset_seconds, 2),
        "blocks": len(blocks),
        "dataset": type(ds).__name__,
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }


def writer_rate(root: Path, shards_to_write: int = 8) -> dict:
    """MB/s of one ShardSink writing 1,024-row shards of webvid-sd21-512x1024 latents to local disk."""
    from cmd_model.presets import get_preset
    from pipelines.data.shard_sink import ShardSink

    p = get_preset("webvid-sd21-512x1024")
    sink = ShardSink(
        str(root / "writer"),
        p.content_shape,
        p.motion_shape,
        {"preset": p.name},
        rows_per_shard=1024,
        flush_seconds=1e9,
    )
    n = 64
    rng = np.random.default_rng(0)
    batch = lambda: {
        "video_id": np.array([f"{i:016x}" for i in range(n)], dtype=object),
        "source": np.full(n, "s", dtype=object),
        "clip_index": np.zeros(n, np.int32),
        "num_clips": np.ones(n, np.int32),
        "start_frame": np.zeros(n, np.int32),
        "frame_stride": np.ones(n, np.int32),
        "fps": np.full(n, 24, np.float32),
        "caption": np.full(n, "c", dtype=object),
        "label": np.full(n, -1, np.int32),
        "content": rng.standard_normal((n, *p.content_shape)).astype(np.float16),
        "motion": rng.standard_normal((n, *p.motion_shape)).astype(np.float16),
    }
    batches = [batch() for _ in range(1024 // n * shards_to_write)]
    clip_bytes = (np.prod(p.content_shape) + np.prod(p.motion_shape)) * 2
    began = time.perf_counter()
    for b in batches:
        sink.add(b)
    sink.flush()
    seconds = time.perf_counter() - began
    mb = len(batches) * n * clip_bytes / 1e6
    return {
        "figure": "shard_sink_write_rate",
        "preset": p.name,
        "kb_per_clip": round(float(clip_bytes) / 1e3, 1),
        "clips": len(batches) * n,
        "mb_per_s": round(float(mb) / seconds, 1),
        "clips_per_s": round(len(batches) * n / seconds, 1),
    }


def s3_listing(root: Path, objects: int) -> dict:
    """List and plan an s3:// prefix of `objects` (empty) video files on SeaweedFS."""
    from concurrent.futures import ThreadPoolExecutor

    # tests/ is not an installed package (pipelines, cmd_model and jobs are): its SeaweedFS fixture
    # is found in the checkout, also when this runs as `python benchmarks/precompute_scale.py`.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.fixtures_s3 import seaweedfs

    with seaweedfs(root / "seaweedfs") as server:
        os.environ.update(server.env())
        from pipelines.data.sources import source_table
        from pipelines.platform import storage

        bucket = "scale"
        storage.get_filesystem(f"s3://{bucket}")[0].mkdir(bucket)
        fs, _ = storage.pyarrow_filesystem(f"s3://{bucket}")
        began = time.perf_counter()

        def put(i):
            with fs.open_output_stream(f"{bucket}/videos/{i // 1000:04d}/{i:07d}.mp4") as f:
                f.write(b"")

        with ThreadPoolExecutor(32) as pool:
            list(pool.map(put, range(objects)))
        uploaded = time.perf_counter() - began
        began = time.perf_counter()
        table = source_table(f"s3://{bucket}/videos/")
        listed = time.perf_counter() - began
        assert table.num_rows == objects, table.num_rows
        return {
            "figure": "s3_listing",
            "objects": objects,
            "list_seconds": round(listed, 2),
            "upload_seconds": round(uploaded, 1),
            "store": "SeaweedFS on 127.0.0.1",
        }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--listing", type=int, default=100_000, help="objects in the S3 listing figure (0: skip)")
    p.add_argument("--measure", nargs=2, metavar=("MANIFEST", "OUTPUT"), help=argparse.SUPPRESS)  # the child process
    p.add_argument("--plan-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(*args.measure, with_dataset=not args.plan_only)))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for n in args.sizes:
            began = time.perf_counter()
            manifest, out = build_fixture(root / str(n), n)
            fixture_s = time.perf_counter() - began
            child = subprocess.run(
                [sys.executable, __file__, "--measure", manifest, out], capture_output=True, text=True, check=True
            )
            row = json.loads(child.stdout.strip().splitlines()[-1])
            files = {d: len(list((Path(out) / d).glob("*.parquet"))) for d in ("latents", "errors")}
            print(
                json.dumps(
                    {
                        "figure": "plan",
                        **row,
                        "already_written": int(n * 0.9),
                        "latent_files": files["latents"],
                        "error_files": files["errors"],
                        "fixture_seconds": round(fixture_s, 1),
                    }
                ),
                flush=True,
            )
        print(json.dumps(writer_rate(root)), flush=True)
        if args.listing:
            print(json.dumps(s3_listing(root, args.listing)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
