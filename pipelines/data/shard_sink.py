"""The write step of precompute: ShardSink actors turn latent rows and error rows into few atomic Parquet files.

Below both the encoders (pipelines.data.latent_encoder hands rows over with `to_sinks`) and the
driver (pipelines.data.precompute starts the sinks and flushes them), so neither imports the other.
"""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from pipelines.data import latent_shards as shards
from pipelines.data.video.schema import CLIP_INDEX, LABEL, NUM_CLIPS, VIDEO_ID
from pipelines.platform import storage


class ShardSink:
    """A Ray actor that turns latent rows and error rows into few, large, atomic Parquet files.

    Rows arrive in small batches (`add`, `add_errors`, `add_videos`); a shard is written once rows_per_shard
    rows are held or flush_seconds have passed since the oldest, and `flush` writes what is left
    when the job ends. Rows held and not yet written when a job is killed are simply decoded
    again by the rerun (resume works on written clips), so nothing is lost or duplicated.
    """

    def __init__(
        self,
        output: str,
        content_shape,
        motion_shape,
        metadata: dict,
        rows_per_shard: int = 1024,
        flush_seconds: float = 10.0,
        errors_per_file: int = 10_000,
    ):
        self.output = output
        self.directory = storage.join(output, shards.LATENTS_DIR)
        self.schema = shards.latent_schema(content_shape, motion_shape, metadata)
        self.rows_per_shard, self.flush_seconds, self.errors_per_file = rows_per_shard, flush_seconds, errors_per_file
        self.tables, self.rows, self.oldest = [], 0, None
        self.errors, self.oldest_error = [], None
        self.videos, self.oldest_video = [], None  # the report's per-video rows, batched as errors are
        self.written = 0
        # Clips this sink has taken, as (video id << 32 | clip index): a task that Ray runs again
        # after a lost node (or a retried actor call) hands some rows over twice; each is kept once.
        self.taken: set[int] = set()
        # Why the last write failed for want of space (the driver asks: Ray wraps the error)
        self.full: str | None = None

    def add(self, batch: dict[str, np.ndarray]) -> int:
        keys = [int(str(v), 16) << 32 | int(c) for v, c in zip(batch[VIDEO_ID], batch[CLIP_INDEX])]
        new = np.array([k not in self.taken for k in keys])
        if not new.any():
            return 0
        if not new.all():
            batch = {name: column[new] for name, column in batch.items()}
        self.taken.update(keys)
        for name in (LABEL, NUM_CLIPS):  # -1 in the numpy batch: null in the shard
            batch[name] = np.where(batch[name] < 0, None, batch[name]).astype(object)
        self.tables.append(shards.latent_table(batch, self.schema))
        self.rows += len(batch[VIDEO_ID])
        self.oldest = self.oldest or time.monotonic()
        if self.rows >= self.rows_per_shard or time.monotonic() - self.oldest >= self.flush_seconds:
            self._write_latents()
        if self.errors and time.monotonic() - self.oldest_error >= self.flush_seconds:
            self._write_errors()
        return len(batch[VIDEO_ID])

    def add_errors(self, rows: list[dict]) -> None:
        self.errors.extend(rows)
        self.oldest_error = self.oldest_error or time.monotonic()
        if len(self.errors) >= self.errors_per_file or time.monotonic() - self.oldest_error >= self.flush_seconds:
            self._write_errors()

    def add_videos(self, rows: list[dict]) -> None:
        self.videos.extend(rows)
        self.oldest_video = self.oldest_video or time.monotonic()
        if len(self.videos) >= self.errors_per_file or time.monotonic() - self.oldest_video >= self.flush_seconds:
            self._write_videos()

    def flush(self) -> int:
        """Write everything held; returns the clips this sink has written in all."""
        if self.tables:
            self._write_latents()
        if self.errors:
            self._write_errors()
        if self.videos:
            self._write_videos()
        return self.written

    def disk_full(self) -> str | None:
        return self.full

    def _write_latents(self) -> None:
        table = pa.concat_tables(self.tables)
        for start in range(0, table.num_rows, self.rows_per_shard):  # never more than rows_per_shard per file
            self._atomic(shards.write_atomic, table.slice(start, self.rows_per_shard), self.directory)
        self.written += table.num_rows
        self.tables, self.rows, self.oldest = [], 0, None

    def _write_errors(self) -> None:
        self._atomic(shards.write_errors, self.errors, self.output)
        self.errors, self.oldest_error = [], None

    def _write_videos(self) -> None:
        self._atomic(shards.write_videos, self.videos, self.output)
        self.videos, self.oldest_video = [], None

    def _atomic(self, write, *args) -> None:
        try:
            write(*args)
        except storage.StorageFull as exc:
            self.full = str(exc)
            raise


def to_sinks(batch: dict[str, np.ndarray], sinks: list) -> dict[str, np.ndarray]:
    """Hand encoded rows to a sink (waiting for it: backpressure); returns the count as a one-row batch."""
    import ray

    sink = sinks[int(str(batch[VIDEO_ID][0]), 16) % len(sinks)]  # spread by video id (hex), stable
    return {"rows": np.array([ray.get(sink.add.remote(batch))])}
