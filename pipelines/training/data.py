"""Training inputs as Ray Data datasets, and the batch collation that runs in Ray Data's threads.

- Latents (content, motion stages): the precompute output's Parquet shards, read with
  `shuffle="files"` (a new file order every epoch; clips of one video sit together in a
  shard, so the iterator's local shuffle buffer mixes them) and only the columns a stage needs.
- Clips (autoencoder): video sources -> decode tasks (the precompute stage: each keeps one killable
  decoder process, bad videos become rows in <run>/errors) -> uint8 frames.
Ray Train splits either dataset over the workers (streaming_split, equal shares).
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from pipelines.data import latent_shards as shards
from pipelines.data.video.schema import CAPTION, FRAMES, LABEL, ClipSpec
from pipelines.platform import storage
from pipelines.platform.cluster import dataset_of_tables

NULL_LABEL = -1  # a clip without a class; stages map it to the model's null class


def latent_files(latents: str) -> list[str]:
    return storage.list_files(storage.join(latents, shards.LATENTS_DIR), extensions=[".parquet"])


def shard_stats(files: list[str]) -> tuple[int, int]:
    """(rows, uncompressed bytes) over all shards, from the Parquet footers only."""
    rows = size = 0
    for file in files:
        with storage.open(file, "rb") as f:
            meta = pq.ParquetFile(f).metadata
        rows += meta.num_rows
        size += sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
    return rows, size


def label_count(files: list[str]) -> int:
    """1 + the largest class label over all shards (0 when none), from the Parquet footers' statistics."""
    from pipelines.data.video.schema import LABEL

    top = -1
    for file in files:
        with storage.open(file, "rb") as f:
            meta = pq.ParquetFile(f).metadata
        index = meta.schema.names.index(LABEL) if LABEL in meta.schema.names else None
        for i in range(meta.num_row_groups if index is not None else 0):
            stats = meta.row_group(i).column(index).statistics
            if stats is not None and stats.has_min_max:
                top = max(top, int(stats.max))
    return top + 1


def latent_dataset(latents: str, columns: list[str], cache: bool = False):
    """The latent shards as a Ray dataset; `cache`: read once and keep the blocks in Ray's object store."""
    import ray

    if cache:
        # Small enough to hold: read here with pyarrow (one block per shard, only these columns)
        # and put the tables in the object store. ray.data.read_parquet would start read tasks in
        # fresh worker processes for the same bytes (~5 s on 2 cores); every epoch of a streaming
        # read would list and read the files again. Blocks come in a new order each epoch.
        tables = []
        for file in latent_files(latents):
            fs, path = storage.pyarrow_filesystem(file)
            tables.append(pq.read_table(path, columns=columns, filesystem=fs))
        return dataset_of_tables(tables)
    fs, path = storage.pyarrow_filesystem(storage.join(latents, shards.LATENTS_DIR))
    # select_columns right after the read is pushed down into it: only these columns are read.
    return ray.data.read_parquet(path, filesystem=fs, shuffle="files").select_columns(columns)


def held_data_config():
    """Ray Train's DataConfig for a dataset already held in the object store (`latent_dataset(cache=True)`).

    The default config gives every worker a share of one streaming_split, run by a
    SplitCoordinator actor: one more process to start per run (~5-10 s on 2 cores) to stream
    blocks that are already in memory. Here the held blocks are split once (equal shares, as
    streaming_split), and each worker iterates its own share, in a new block order every epoch.
    """
    import ray.train

    class HeldDataConfig(ray.train.DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            shares = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                parts = ds.split(world_size, equal=True) if world_size > 1 else [ds]
                for rank, part in enumerate(parts):
                    share = part.randomize_block_order()
                    # Each epoch runs in the worker: Ray Data's bars would interleave with the job's output.
                    share.context.enable_progress_bars = False
                    shares[rank][name] = share.iterator()
            return shares

    return HeldDataConfig()


def read_latent_rows(latents: str, columns: list[str], n: int) -> dict[str, np.ndarray]:
    """The first `n` rows in shard-name order (the fixed evaluation batch), as numpy columns."""
    tables, have = [], 0
    for file in sorted(latent_files(latents)):
        with storage.open(file, "rb") as f:
            table = pq.read_table(f, columns=columns)
        tables.append(table.slice(0, n - have))
        have += tables[-1].num_rows
        if have >= n:
            break
    return table_to_numpy(pa.concat_tables(tables))


def table_to_numpy(table: pa.Table) -> dict[str, np.ndarray]:
    out = {}
    for name in table.column_names:
        column = table.column(name).combine_chunks()
        if isinstance(column.type, pa.FixedShapeTensorType):
            out[name] = column.to_numpy_ndarray()
        else:
            out[name] = np.array(column.to_pylist(), dtype=object)
    return out


def collate_latents(batch: dict[str, np.ndarray]) -> dict:
    """Numpy batch -> float32 tensors for tensor columns; captions as a list of str, labels as long.

    Ray's default collation turns every column into a tensor and fails on strings; captions
    have to reach the worker, whose frozen text encoder turns them into features.
    """
    out = {}
    for name, values in batch.items():
        if name == CAPTION:
            out[name] = ["" if c is None or c != c else str(c) for c in values]  # None / NaN: unconditional
        elif name == LABEL:
            out[name] = torch.as_tensor(
                np.array([NULL_LABEL if v is None or v != v else int(v) for v in values]), dtype=torch.long
            )
        else:
            # Ray hands columns as read-only views of its blocks: a float32 copy only where they are not
            # already writable float32 (torch warned of a tensor sharing a read-only buffer).
            out[name] = torch.from_numpy(np.require(values, np.float32, ["C", "W"]))
    return out


def collate_frames(batch: dict[str, np.ndarray]) -> dict:
    """uint8 frames [B, L, H, W, 3] stay uint8 until the worker: 4x less to copy than float."""
    return {FRAMES: torch.as_tensor(np.ascontiguousarray(batch[FRAMES]))}


class LatentCollate(NumpyBatchCollateFn):
    """collate_latents as the callable class iter_torch_batches expects (it runs in Ray Data's threads)."""

    def __call__(self, batch):
        return collate_latents(batch)


class FrameCollate(NumpyBatchCollateFn):
    def __call__(self, batch):
        return collate_frames(batch)


def clip_dataset(sources: pa.Table, spec: ClipSpec, errors_to: str, decoders: int):
    """Sources (an Arrow table, as precompute plans them) -> clip rows with uint8 frames
    [L, H, W, 3], decoded by precompute's decode step, in precompute's blocks (a few per decoder,
    not one per video)."""

    from pipelines.data.decode_stage import SKIP_CLIPS, decode_stage, plan_blocks

    todo = sources.append_column(SKIP_CLIPS, pa.array(["[]"] * sources.num_rows, pa.string()))
    ds = dataset_of_tables(plan_blocks(todo, decoders))
    return decode_stage(ds, spec, decoders, errors_to).select_columns([FRAMES])
