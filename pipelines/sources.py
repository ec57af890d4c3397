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

import csv
import io

import pyarrow.parquet as pq

from pipelines import storage
from pipelines.video_io import CAPTION, LABEL, SOURCE

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg", ".flv", ".wmv", ".3gp", ".ts")
MANIFEST_EXTENSIONS = (".csv", ".parquet")
PATH_COLUMNS = ("path", "source", "video")


class SourceError(ValueError):
    """An input that cannot be listed (one readable line)."""


def list_sources(uri: str, labels: str | None = None, split_list: str | None = None) -> list[dict]:
    storage.check_readable(uri, "input")
    if uri.lower().endswith(MANIFEST_EXTENSIONS):
        return _from_manifest(uri)
    files = storage.list_files(uri, extensions=VIDEO_EXTENSIONS)
    if not files:
        raise SourceError(f"no video files ({', '.join(VIDEO_EXTENSIONS)}) under {uri}")
    root = uri.rstrip("/") + "/"
    relative = {f: f[len(root):] if f.startswith(root) else f for f in files}
    if split_list:
        wanted = {line.split()[0] for line in storage.read_text(split_list).splitlines() if line.strip()}
        files = [f for f in files if relative[f] in wanted]
        if not files:
            raise SourceError(f"none of the videos under {uri} is listed in {split_list}")
    if labels == "folder":
        classes = sorted({relative[f].split("/")[0] for f in files if "/" in relative[f]})
        index = {name: i for i, name in enumerate(classes)}
        return [{SOURCE: f, CAPTION: None, LABEL: index.get(relative[f].split("/")[0])} for f in files]
    if labels is not None:
        raise SourceError(f"labels must be 'folder' or absent, got {labels!r}")
    return [{SOURCE: f, CAPTION: None, LABEL: None} for f in files]


def _from_manifest(uri: str) -> list[dict]:
    if uri.lower().endswith(".parquet"):
        with storage.open(uri, "rb") as f:
            rows = pq.read_table(f).to_pylist()
    else:
        rows = list(csv.DictReader(io.StringIO(storage.read_text(uri))))
    if not rows:
        raise SourceError(f"manifest {uri} has no rows")
    column = next((c for c in PATH_COLUMNS if c in rows[0]), None)
    if column is None:
        raise SourceError(f"manifest {uri} needs a path column (one of {', '.join(PATH_COLUMNS)}); it has {', '.join(rows[0])}")
    base = uri.rsplit("/", 1)[0]
    sources = []
    for row in rows:
        path = str(row[column])
        if not (path.startswith("/") or "://" in path):
            path = storage.join(base, path)
        label = row.get(LABEL)
        sources.append({
            SOURCE: path,
            CAPTION: row.get(CAPTION) or None,
            LABEL: int(label) if label not in (None, "") else None,
        })
    return sources
