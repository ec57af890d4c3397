"""The decode step of every job that reads videos: a video -> clip rows, in a killable decoder process.

Used by precompute (pipelines.data.precompute) and by the autoencoder's training data
(pipelines.training.data), so both cut clips the same way.
"""

from __future__ import annotations

import atexit
import json
import math

import numpy as np
import pyarrow as pa

from pipelines.data import latent_shards as shards
from pipelines.data.video.isolated import IsolatedDecoder
from pipelines.data.video.schema import (
    CAPTION,
    CLIP_INDEX,
    FPS,
    FRAME_STRIDE,
    FRAMES,
    LABEL,
    MOTION_SCORE,
    NUM_CLIPS,
    SOURCE,
    START_FRAME,
    VIDEO_ID,
    ClipSpec,
)
from pipelines.platform import storage

SKIP_CLIPS = "skip_clips"  # clip indices a previous run already wrote for this video


class DecodeClips:
    """Batch of videos (source, caption, label, skip_clips) -> clip rows, with one killable decoder process.

    A video that fails becomes an error row: sent to `error_sink` (a ShardSink actor, which
    batches them into few files) when given, else written to ERRORS_TO/errors at once. With a
    sink, what the decoder learnt of each video (size, fps, shots, static clips) goes to it too,
    for the data report (latent_shards.VIDEOS_DIR); without one (training) it is not kept.
    """

    def __init__(self, spec: ClipSpec, errors_to: str, error_sink=None):
        self.spec, self.errors_to, self.error_sink = spec, errors_to, error_sink
        self.decoder = IsolatedDecoder(spec)

    def __call__(self, batch: dict[str, np.ndarray]):
        for i, source in enumerate(batch[SOURCE]):
            skip = set(json.loads(batch[SKIP_CLIPS][i]))
            with storage.local_copy(source) as path:
                # Yield per chunk of a few clips, as the decoder streams them: memory stays the same
                # for a 10-second or a 2-hour video (ray#32746). A video that fails part way keeps
                # the clips already yielded and gets an error row (a rerun then skips it).
                for rows, error in self.decoder.decode_chunks(source, open_file=lambda _: path):
                    if error:
                        self.record_error(error)
                        continue
                    keep = [r for r in rows if r[CLIP_INDEX] not in skip]
                    if keep:
                        yield clip_batch(keep, batch[CAPTION][i], batch[LABEL][i])
            if self.decoder.last_video is not None and self.error_sink is not None:
                self.record_video(shards.video_row(source, self.decoder.last_video))

    def record_error(self, error: dict) -> None:
        import ray

        if self.error_sink is None:
            shards.write_errors([error], self.errors_to)
        else:  # waits for the sink to hold it: the driver's final flush then cannot miss it
            ray.get(self.error_sink.add_errors.remote([error]))

    def record_video(self, row: dict) -> None:
        import ray

        ray.get(self.error_sink.add_videos.remote([row]))  # waits, as record_error does

    def close(self) -> None:
        self.decoder.close()


# One DecodeClips per Ray worker process and clip spec: Ray runs a stage's tasks in the same few
# worker processes, so each keeps its decoder process from task to task instead of starting one per block.
_decoders: dict[tuple, DecodeClips] = {}


def decode_videos(batch: dict[str, np.ndarray], spec: ClipSpec, errors_to: str, error_sink=None):
    """The decode stage's task function: DecodeClips, kept for the life of this worker process."""
    key = (spec, errors_to)
    if key not in _decoders:
        _decoders[key] = DecodeClips(spec, errors_to, error_sink)
        atexit.register(_decoders[key].close)
    decoder = _decoders[key]
    decoder.error_sink = error_sink  # this job's sink (a worker process may outlive a job)
    yield from decoder(batch)


def decode_stage(ds, spec: ClipSpec, decoders: int, errors_to: str, error_sink=None, env: dict | None = None):
    """The decode step of every job that reads videos (precompute, the autoencoder's training data, benchmarks).

    Tasks, not actors: when a node is lost, Ray rebuilds the decoded blocks that were on it by
    running their tasks again on any node with a free CPU. An actor's output can only be rebuilt by
    that same actor, which Ray Data has already stopped once decoding is done (the job then hung).
    """
    from ray.data import TaskPoolStrategy

    clip_mib = spec.num_frames * spec.height * spec.width * 3 / 2**20
    return ds.map_batches(
        decode_videos,
        fn_kwargs=dict(spec=spec, errors_to=errors_to, error_sink=error_sink),
        batch_size=1,  # one video per call: a hang or crash costs only that video
        compute=TaskPoolStrategy(size=decoders),  # at most this many decoder processes at once
        num_cpus=1,  # decoding is CPU-bound; one core per decoder process
        # Two chunks of clips in flight (decode streams 8 clips at a time) plus the decoder's own
        # buffers (decord#208): Ray Data cannot prevent OOMs when a UDF's memory is left unset.
        memory=int(2**30 + 2 * 8 * clip_mib * 2**20),
        **(env or {}),
    )


def clip_batch(rows: list[dict], caption, label) -> dict[str, np.ndarray]:
    n = len(rows)
    return {
        VIDEO_ID: np.array([r[VIDEO_ID] for r in rows], dtype=object),
        SOURCE: np.array([r[SOURCE] for r in rows], dtype=object),
        CLIP_INDEX: np.array([r[CLIP_INDEX] for r in rows], dtype=np.int32),
        # -1: not known when the row was decoded (the sink writes null; decode.decode_chunks says when)
        NUM_CLIPS: np.array([-1 if r[NUM_CLIPS] is None else r[NUM_CLIPS] for r in rows], dtype=np.int32),
        START_FRAME: np.array([r[START_FRAME] for r in rows], dtype=np.int32),
        FRAME_STRIDE: np.array([r[FRAME_STRIDE] for r in rows], dtype=np.int32),
        FPS: np.array([r[FPS] for r in rows], dtype=np.float32),
        MOTION_SCORE: np.array([r[MOTION_SCORE] for r in rows], dtype=np.float32),
        CAPTION: np.array([caption] * n, dtype=object),
        LABEL: np.array([-1 if label is None or label != label else int(label)] * n, dtype=np.int32),
        FRAMES: np.stack([r[FRAMES] for r in rows]),  # uint8 [N, L, H, W, 3]
    }


def plan_blocks(todo: pa.Table, decoders: int) -> list[pa.Table]:
    """The plan cut into Ray Data blocks: enough blocks to keep every decoder busy (8 each), and at
    most 256 videos per block, so a million videos make ~4,000 blocks, not a million."""
    per_block = max(1, min(256, math.ceil(todo.num_rows / (8 * decoders))))
    return [todo.slice(start, per_block) for start in range(0, todo.num_rows, per_block)]
