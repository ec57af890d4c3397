"""A Ray dataset of Arrow tables the driver holds: `ray.data.from_arrow` against `from_blocks`
(pipelines.platform.cluster.dataset_of_tables), one JSON line per (way, tables).

    python benchmarks/driver_tables.py                   # 4, 16 and 64 tables, 3 repeats
    python benchmarks/driver_tables.py --tables 4 --repeats 5

The training jobs hold their latents this way (one table per shard) and precompute and the
autoencoder stage their decode plan (8 blocks a decoder). Each measurement is a fresh local Ray
(4 CPUs, no dashboard) that makes the dataset and reads it through once, as a job does:
1. wall_s      ray.init to the last batch read (Ray's start included: the same for both ways)
2. core_s      CPU time of the whole machine over the same span (psutil; run it on a quiet machine)
3. workers     worker processes the raylet started (its log's "Started worker process" lines)
Medians over --repeats, the two ways alternating.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa


def busy_core_seconds() -> float:
    """CPU time of the whole machine so far, not idle and not waiting on disk (psutil's /proc/stat)."""
    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


def tables_like_latents(count: int, rows: int = 16) -> list[pa.Table]:
    """count tables of `rows` float16 content/motion rows each (the tiny preset's shard sizes)."""
    rng = np.random.default_rng(0)
    return [
        pa.table(
            {
                "content": pa.FixedShapeTensorArray.from_numpy_ndarray(
                    rng.standard_normal((rows, 4, 8, 8), np.float32).astype(np.float16)
                ),
                "motion": pa.FixedShapeTensorArray.from_numpy_ndarray(
                    rng.standard_normal((rows, 8, 16, 16), np.float32).astype(np.float16)
                ),
                "label": pa.array(rng.integers(0, 16, rows)),
            }
        )
        for _ in range(count)
    ]


def measure(way: str, tables: list[pa.Table]) -> dict:
    import ray

    from pipelines.platform.cluster import dataset_of_tables

    start_wall, start_cpu = time.monotonic(), busy_core_seconds()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        ds = ray.data.from_arrow(tables) if way == "from_arrow" else dataset_of_tables(tables)
        rows = sum(len(batch["label"]) for batch in ds.iter_batches(batch_size=None))
        wall, cpu = time.monotonic() - start_wall, busy_core_seconds() - start_cpu
        # Ray has no public call for its session folder; the raylet logs each worker it starts there.
        log = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs" / "raylet.out"
        workers = log.read_text(errors="replace").count("Started worker process")
    finally:
        ray.shutdown()
    assert rows == sum(t.num_rows for t in tables)
    return {"wall_s": wall, "core_s": cpu, "workers": workers}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tables", type=int, nargs="+", default=[4, 16, 64])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    for count in args.tables:
        tables = tables_like_latents(count)
        runs = {"from_arrow": [], "from_blocks": []}
        for _ in range(args.repeats):
            for way in runs:
                runs[way].append(measure(way, tables))
        for way, measured in runs.items():
            line = {"way": way, "tables": count, "repeats": args.repeats}
            line.update({k: round(statistics.median(m[k] for m in measured), 2) for k in measured[0]})
            print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
