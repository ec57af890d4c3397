"""Which videos a job reads: a folder or s3:// prefix, or a CSV/Parquet manifest.

Each source is {source: URI, caption: str | None, label: int | None}.
- Folder / prefix: every file with a video extension, recursively, in name order.
  `labels="folder"` (the UCF-101 layout: CLASS/v_CLASS_g01_c01.avi) numbers the class folders
  in sorted order; `split_list` (UCF's trainlist01.txt: "CLASS/file.avi [index]" per line)
  keeps only the listed files.
- Manifest (.csv or .parquet): a `path` (or `source`, `video`) column, optional `caption` and
  `label`; relative paths are taken from the manifest's folder.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from pipelines.data.video.schema import CAPTION, LABEL, SOURCE
from pipelines.platform import storage

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".3gp", ".ts")
MANIFEST_EXTENSIONS = (".csv", ".parquet")
PATH_COLUMNS = ("path", "source", "video")


class SourceError(ValueError):
    """An input that cannot be listed (one readable line)."""


SOURCE_SCHEMA = pa.schema([pa.field(SOURCE, pa.string()), pa.field(CAPTION, pa.string()), pa.field(LABEL, pa.int64())])


def list_sources(uri: str, labels: str | None = None, split_list: str | None = None) -> list[dict]:
    """The sources as Python dicts: for the small sets (evaluation, training's listing) that want them."""
    return source_table(uri, labels, split_list).to_pylist()


def source_table(uri: str, labels: str | None = None, split_list: str | None = None) -> pa.Table:
    """The sources as an Arrow table (source, caption, label): no Python object per video, so a
    10 M-row manifest or a prefix of millions of files stays a few hundred MB in the driver."""
    storage.check_readable(uri, "input")
    if uri.lower().endswith(MANIFEST_EXTENSIONS):
        return _from_manifest(uri)
    files = storage.list_files(uri, extensions=VIDEO_EXTENSIONS)
    if not files:
        raise SourceError(f"no video files ({', '.join(VIDEO_EXTENSIONS)}) under {uri}")
    root = uri.rstrip("/") + "/"
    relative = [f[len(root) :] if f.startswith(root) else f for f in files]
    if split_list:
        wanted = {line.split()[0] for line in storage.read_text(split_list).splitlines() if line.strip()}
        kept = [i for i, r in enumerate(relative) if r in wanted]
        files, relative = [files[i] for i in kept], [relative[i] for i in kept]
        if not files:
            raise SourceError(f"none of the videos under {uri} is listed in {split_list}")
    label_values = [None] * len(files)
    if labels == "folder":
        classes = sorted({r.split("/")[0] for r in relative if "/" in r})
        index = {name: i for i, name in enumerate(classes)}
        label_values = [index.get(r.split("/")[0]) if "/" in r else None for r in relative]
    elif labels is not None:
        raise SourceError(f"labels must be 'folder' or absent, got {labels!r}")
    return pa.table(
        [pa.array(files, pa.string()), pa.nulls(len(files), pa.string()), pa.array(label_values, pa.int64())],
        schema=SOURCE_SCHEMA,
    )


def _from_manifest(uri: str) -> pa.Table:
    with storage.open(uri, "rb") as f:
        if uri.lower().endswith(".parquet"):
            table = pq.read_table(f)
        else:  # Arrow's CSV reader: multithreaded, and no Python dict per row
            table = pacsv.read_csv(
                f,
                convert_options=pacsv.ConvertOptions(
                    column_types={CAPTION: pa.string(), LABEL: pa.int64(), **{c: pa.string() for c in PATH_COLUMNS}},
                    strings_can_be_null=True,
                ),
            )
    if table.num_rows == 0:
        raise SourceError(f"manifest {uri} has no rows")
    column = next((c for c in PATH_COLUMNS if c in table.column_names), None)
    if column is None:
        raise SourceError(
            f"manifest {uri} needs a path column (one of {', '.join(PATH_COLUMNS)}); it has "
            f"{', '.join(table.column_names)}"
        )
    paths = table.column(column).cast(pa.string())
    # Relative paths are relative to the manifest's folder.
    base = uri.rsplit("/", 1)[0] + "/" if "/" in uri else ""
    absolute = pc.or_(pc.starts_with(paths, "/"), pc.match_substring(paths, "://"))
    paths = pc.if_else(absolute, paths, pc.binary_join_element_wise(pa.scalar(base), paths, ""))
    n = table.num_rows
    caption = table.column(CAPTION).cast(pa.string()) if CAPTION in table.column_names else pa.nulls(n, pa.string())
    caption = pc.if_else(pc.equal(caption, ""), pa.scalar(None, pa.string()), caption)  # an empty caption is no caption
    label = table.column(LABEL).cast(pa.int64()) if LABEL in table.column_names else pa.nulls(n, pa.int64())
    return pa.table([paths, caption, label], schema=SOURCE_SCHEMA)


def write_manifest(rows: list[dict], uri: str) -> str:
    """A CSV manifest (path, caption, label) that source_table reads back; rows hold path or source."""
    import csv
    import io

    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=["path", CAPTION, LABEL])
    writer.writeheader()
    for row in rows:
        label = row.get(LABEL)
        writer.writerow(
            {
                "path": row.get("path") or row[SOURCE],
                CAPTION: row.get(CAPTION) or "",
                LABEL: "" if label is None or label == "" else int(label),
            }
        )
    storage.write_text(uri, text.getvalue())
    return uri
