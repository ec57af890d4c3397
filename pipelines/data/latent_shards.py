"""The latent-shard contract: Parquet files of one row per clip, readable without this project.

OUTPUT/
  latents/part-*.parquet   identity columns + `content` [C, H, W] and `motion` [D, L, h+w]
                           as float16 arrow.fixed_shape_tensor columns (Arrow's canonical
                           tensor type: pyarrow, DuckDB and Ray Data read it as is)
  errors/*.parquet         one row per unusable video: source, stage, reason
  videos/*.parquet         one row per decoded video: header size, fps and duration, cuts and shots,
                           clips planned and delivered, the static clips --min-motion dropped
  _manifest.json           what produced the latents (the same keys as each file's metadata)
  summary.json             counts and timings of the last run
  report.json, report.html what the data holds (pipelines.data.report), rebuilt after every run

Each shard is written whole or not at all (temp name, then rename; an S3 PUT is atomic),
so a job killed mid-write leaves no half file behind and a rerun can trust every shard it sees.
"""

from __future__ import annotations

import contextlib
import json
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from pipelines.data.video.schema import (
    CAPTION,
    CLIP_INDEX,
    FPS,
    FRAME_STRIDE,
    LABEL,
    MOTION_SCORE,
    NUM_CLIPS,
    REASON,
    SOURCE,
    STAGE,
    START_FRAME,
    VIDEO_ID,
    make_video_id,
)
from pipelines.platform import storage

# 2: motion_score added; num_clips null on rows written before their video's end (video.decode)
SCHEMA_VERSION = "2"
CONTENT, MOTION = "content", "motion"
LATENTS_DIR, ERRORS_DIR, MANIFEST, SUMMARY = "latents", "errors", "_manifest.json", "summary.json"
VIDEOS_DIR, REPORT_JSON, REPORT_HTML = "videos", "report.json", "report.html"
META_PREFIX = "cmd."

IDENTITY_FIELDS = [
    pa.field(VIDEO_ID, pa.string()),
    pa.field(SOURCE, pa.string()),
    pa.field(CLIP_INDEX, pa.int32()),
    pa.field(NUM_CLIPS, pa.int32()),
    pa.field(START_FRAME, pa.int32()),
    pa.field(FRAME_STRIDE, pa.int32()),
    pa.field(FPS, pa.float32()),
    pa.field(CAPTION, pa.string()),
    pa.field(LABEL, pa.int32()),
    pa.field(MOTION_SCORE, pa.float32()),
]
ERROR_SCHEMA = pa.schema([pa.field(SOURCE, pa.string()), pa.field(STAGE, pa.string()), pa.field(REASON, pa.string())])
STATIC_CLIP = pa.struct(
    [pa.field(CLIP_INDEX, pa.int32()), pa.field(START_FRAME, pa.int32()), pa.field(MOTION_SCORE, pa.float32())]
)
# What decode_chunks learnt of a video (its stats); shot fields are null where scene cuts were off.
VIDEO_SCHEMA = pa.schema(
    [
        pa.field(SOURCE, pa.string()),
        pa.field(VIDEO_ID, pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("fps", pa.float32()),
        pa.field("duration_s", pa.float32()),
        pa.field("frames", pa.int32()),  # as the container's header says
        pa.field("frames_scanned", pa.int32()),  # decoded in order for scene cuts (up to the last frame a clip needs)
        pa.field("cuts", pa.list_(pa.int32())),  # first frame of each new shot
        pa.field("shots", pa.int32()),
        pa.field("short_shots", pa.int32()),  # shorter than a clip: they give none
        pa.field("shot_frames", pa.list_(pa.int32())),
        pa.field("clips_planned", pa.int32()),
        pa.field("clips", pa.int32()),  # delivered to the encoder
        pa.field("static_clips", pa.list_(STATIC_CLIP)),  # dropped by --min-motion
    ]
)


def latent_schema(content_shape: tuple[int, ...], motion_shape: tuple[int, ...], metadata: dict[str, str]) -> pa.Schema:
    fields = IDENTITY_FIELDS + [
        pa.field(CONTENT, pa.fixed_shape_tensor(pa.float16(), list(content_shape))),
        pa.field(MOTION, pa.fixed_shape_tensor(pa.float16(), list(motion_shape))),
    ]
    return pa.schema(fields, metadata={f"{META_PREFIX}{k}": str(v) for k, v in metadata.items()})


def latent_table(batch: dict[str, np.ndarray], schema: pa.Schema) -> pa.Table:
    """Numpy batch (identity columns + content/motion arrays) -> a table with `schema`. A batch
    without motion_score (made by a writer other than the decode stage: benchmarks, tests) gets nulls."""
    columns = []
    rows = len(batch[VIDEO_ID])
    for field in schema:
        if field.name == MOTION_SCORE and MOTION_SCORE not in batch:
            columns.append(pa.nulls(rows, field.type))
            continue
        values = batch[field.name]
        if isinstance(field.type, pa.FixedShapeTensorType):
            columns.append(pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(values, dtype=np.float16)))
        else:
            columns.append(
                pa.array(list(values) if values.dtype == object else values, type=field.type, from_pandas=True)
            )
    return pa.Table.from_arrays(columns, schema=schema)


def parquet_options(table: pa.Table) -> dict:
    """Dictionary encoding and statistics for the identity columns only: on the float16 tensor
    columns both cost time and buy nothing (near-random values), and leaving them off writes
    1,024 rows of 512x1024 latents ~4x faster and reads them ~3x faster (measured, 2 cores)."""
    identity = [f.name for f in IDENTITY_FIELDS if f.name in table.column_names]
    if len(identity) == len(table.column_names):
        return {}
    return {
        "use_dictionary": [c for c in identity if pa.types.is_string(table.schema.field(c).type)],
        "write_statistics": identity,
    }


def write_atomic(table: pa.Table, directory: str, prefix: str = "part") -> str:
    """Write `table` as DIRECTORY/PREFIX-<uuid>.parquet, visible only once complete."""
    options = parquet_options(table)
    name = f"{prefix}-{uuid.uuid4().hex}.parquet"
    final = storage.join(directory, name)
    if storage.is_s3(directory):
        with storage.open(final, "wb") as f:  # multipart upload completes only on close
            pq.write_table(table, f, **options)
        return final
    storage.makedirs(directory)
    tmp = storage.join(directory, f".{name}.tmp")
    fs = storage.get_filesystem(tmp)[0]
    try:
        pq.write_table(table, tmp, **options)
        fs.mv(tmp, final)
    except OSError as exc:
        with contextlib.suppress(OSError):
            fs.rm(tmp)  # a half-written file neither stays visible (it never had its final name) nor takes the space
        if storage.is_disk_full(exc):
            raise storage.StorageFull(
                f"no space left on device for {directory}: free some space (or choose another --output) "
                "and run the same command again; it finishes the missing videos only"
            ) from None
        raise
    return final


def write_errors(rows: list[dict], output: str) -> str | None:
    if not rows:
        return None
    table = pa.Table.from_pylist([{k: r[k] for k in (SOURCE, STAGE, REASON)} for r in rows], schema=ERROR_SCHEMA)
    return write_atomic(table, storage.join(output, ERRORS_DIR), prefix="errors")


def video_row(source: str, stats: dict) -> dict:
    """One VIDEO_SCHEMA row from decode_chunks' stats (fields it did not fill are null)."""
    row = {f.name: stats.get(f.name) for f in VIDEO_SCHEMA}
    row.update({SOURCE: source, VIDEO_ID: make_video_id(source)})
    return row


def write_videos(rows: list[dict], output: str) -> str | None:
    if not rows:
        return None
    table = pa.Table.from_pylist(rows, schema=VIDEO_SCHEMA)
    return write_atomic(table, storage.join(output, VIDEOS_DIR), prefix="videos")


def read_videos(output: str) -> pa.Table:
    """Every row under OUTPUT/videos; a video decoded again by a rerun keeps its last row only."""
    table = _read_columns(_shards(storage.join(output, VIDEOS_DIR)), VIDEO_SCHEMA.names, VIDEO_SCHEMA)
    if table.num_rows == 0:
        return table
    # The same video decoded twice gives the same row; keep one per source (the last one read).
    sources = table.column(SOURCE).to_numpy(zero_copy_only=False)
    _, last = np.unique(sources[::-1], return_index=True)
    return table.take(np.sort(len(sources) - 1 - last))


def _read_columns(files: list[str], columns: list[str], schema: pa.Schema) -> pa.Table:
    """These columns of every file, read by pyarrow's dataset scanner: files and column chunks in
    parallel threads (thousands of GETs at once on S3, not one after another), only the columns asked."""
    if not files:
        return schema.empty_table()
    fs, _ = storage.pyarrow_filesystem(files[0])
    paths = [storage.pyarrow_filesystem(f)[1] for f in files] if storage.is_s3(files[0]) else files
    dataset = pads.dataset(paths, format="parquet", filesystem=fs, schema=schema)
    return dataset.to_table(columns=columns, use_threads=True)


def _scan(files: list[str], columns: list[str], schema: pa.Schema):
    """These columns of every file as record batches, read as _read_columns reads them, held one at a time."""
    if not files:
        return iter(())
    fs, _ = storage.pyarrow_filesystem(files[0])
    paths = [storage.pyarrow_filesystem(f)[1] for f in files] if storage.is_s3(files[0]) else files
    return pads.dataset(paths, format="parquet", filesystem=fs, schema=schema).to_batches(
        columns=columns, use_threads=True
    )


def _shards(directory: str) -> list[str]:
    return storage.list_files(directory, extensions=[".parquet"]) if storage.exists(directory) else []


IDENTITY_SCHEMA = pa.schema([f for f in IDENTITY_FIELDS if f.name in (VIDEO_ID, CLIP_INDEX, NUM_CLIPS)])
VIDEO_NUMBER, DONE, PLANNED, INDICES = "video_number", "clips_written", "clips_planned", "clip_indices"


_HEX = np.full(256, 255, np.uint8)
_HEX[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16, dtype=np.uint8)


def id_numbers(ids) -> np.ndarray:
    """Video ids (16 hex digits, make_video_id) as uint64: 8 bytes each where the string takes
    ~20 plus its hash entry, and numpy sorts and searches them. Read straight from each chunk's
    string buffer, a chunk at a time (a scan's batches), never as Python strings."""
    chunks = ids.chunks if isinstance(ids, pa.ChunkedArray) else [ids]
    out = [np.zeros(0, np.uint64)]
    for chunk in chunks:
        if len(chunk) == 0:
            continue
        if chunk.null_count or not pa.types.is_string(chunk.type):
            raise ValueError("video ids must be non-null strings")
        offsets = np.frombuffer(chunk.buffers()[1], np.int32)[chunk.offset : chunk.offset + len(chunk) + 1]
        if not (np.diff(offsets) == 16).all():
            raise ValueError("video ids must be 16 hex digits (make_video_id)")
        digits = _HEX[np.frombuffer(chunk.buffers()[2], np.uint8)[offsets[0] : offsets[-1]]].reshape(-1, 16)
        if (digits == 255).any():
            raise ValueError("video ids must be 16 lower-case hex digits (make_video_id)")
        value = np.zeros(len(chunk), np.uint64)
        for k in range(16):
            value = (value << np.uint64(4)) | digits[:, k]
        out.append(value)
    return np.concatenate(out)


def written_index(output: str) -> pa.Table:
    """One row per video with latents in OUTPUT/latents, sorted by video: video_number (the id
    as uint64, id_numbers), clips_written (distinct clip indices), clips_planned (the largest
    num_clips of its rows; -1 when every row has it null: the run that wrote them stopped before
    the video's end), and clip_indices (a list) for the videos not complete yet (null for the
    rest: a killed run leaves only a few).

    The identity columns are scanned a batch at a time into integer arrays (id 8 bytes, clip and
    planned count 4 each), then one sort finds the distinct (video, clip) pairs and each video's
    run of them. Arrow's group_by with count_distinct over the string ids needed ~3x as much
    memory at 10 M videos (benchmarks/precompute_scale.py)."""
    numbers, clips, planned_of = [np.zeros(0, np.uint64)], [np.zeros(0, np.int32)], [np.zeros(0, np.int32)]
    for batch in _scan(_shards(storage.join(output, LATENTS_DIR)), [VIDEO_ID, CLIP_INDEX, NUM_CLIPS], IDENTITY_SCHEMA):
        numbers.append(id_numbers(batch.column(VIDEO_ID)))
        clips.append(batch.column(CLIP_INDEX).to_numpy().astype(np.int32))
        planned_of.append(pc.fill_null(batch.column(NUM_CLIPS), -1).to_numpy().astype(np.int32))
    numbers, clips, planned_of = np.concatenate(numbers), np.concatenate(clips), np.concatenate(planned_of)
    order = np.lexsort((clips, numbers))
    numbers, clips, planned_of = numbers[order], clips[order], planned_of[order]
    del order
    new_pair = np.ones(len(numbers), bool)
    new_pair[1:] = (numbers[1:] != numbers[:-1]) | (clips[1:] != clips[:-1])
    numbers, clips, planned_of = numbers[new_pair], clips[new_pair], planned_of[new_pair]
    starts = np.flatnonzero(np.r_[True, numbers[1:] != numbers[:-1]]) if len(numbers) else np.zeros(0, np.int64)
    done = np.diff(np.r_[starts, len(numbers)]).astype(np.int64)
    planned = np.maximum.reduceat(planned_of, starts) if len(starts) else np.zeros(0, np.int32)
    partial = (done < planned) | (planned < 0)
    indices = pa.nulls(len(starts), pa.list_(pa.int32()))
    if partial.any():
        rows = np.repeat(partial, done)  # the distinct pairs of the partial videos: few
        offsets = np.r_[0, np.cumsum(np.where(partial, done, 0))].astype(np.int32)
        indices = pa.ListArray.from_arrays(pa.array(offsets), pa.array(clips[rows]), mask=pa.array(~partial))
    return pa.table(
        {
            VIDEO_NUMBER: pa.array(numbers[starts], pa.uint64()),
            DONE: pa.array(done),
            PLANNED: pa.array(planned, pa.int32()),
            INDICES: indices,
        }
    )


def read_identity(output: str, columns: list[str]) -> pa.Table:
    """These identity columns (IDENTITY_FIELDS) of every shard under OUTPUT/latents; never the latents."""
    schema = pa.schema([f for f in IDENTITY_FIELDS if f.name in columns])
    return _read_columns(_shards(storage.join(output, LATENTS_DIR)), columns, schema)


def failed_sources(output: str) -> pa.Array:
    """Sources already recorded in OUTPUT/errors (a rerun skips them: a known-bad file stays quarantined)."""
    return pc.unique(read_errors(output).column(SOURCE))


def read_errors(output: str) -> pa.Table:
    """Every error row under OUTPUT/errors (source, stage, reason)."""
    return _read_columns(_shards(storage.join(output, ERRORS_DIR)), [SOURCE, STAGE, REASON], ERROR_SCHEMA)


def read_manifest(output: str) -> dict | None:
    path = storage.join(output, MANIFEST)
    return json.loads(storage.read_text(path)) if storage.exists(path) else None


def write_manifest(output: str, manifest: dict) -> None:
    storage.write_text(storage.join(output, MANIFEST), json.dumps(manifest, indent=2, sort_keys=True))


def file_metadata(path: str) -> dict[str, str]:
    """The cmd.* key-value metadata of one shard."""
    with storage.open(path, "rb") as f:
        meta = pq.read_schema(f).metadata or {}
    return {k.decode()[len(META_PREFIX) :]: v.decode() for k, v in meta.items() if k.decode().startswith(META_PREFIX)}
