"""What a precompute output holds: OUTPUT/report.json and OUTPUT/report.html, beside the shards.

Built from the output itself after every run (the latents' identity columns, errors/ and videos/),
so it describes everything written so far, not the last run alone, and anyone can rebuild it:

    python -c "from pipelines.data.report import write_report; write_report('OUT')"

report.json: videos in, out (with clips) and failed by reason; shots (cuts, shots too short for a
clip); clips; video durations, resolutions and frame rates; the motion score's distribution (a
histogram on fixed edges) and the static clips: those --min-motion dropped, and those under
STATIC_MOTION still in the shards when it was off. report.html shows the same with three plots.
Every count can be checked with DuckDB or pyarrow against the shards (tests/test_precompute.py does).
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections import Counter

import numpy as np
import pyarrow as pa

from pipelines.data import latent_shards as shards
from pipelines.data.video.schema import CLIP_INDEX, FPS, FRAME_STRIDE, MOTION_SCORE, SOURCE, START_FRAME, VIDEO_ID
from pipelines.platform import storage

# Mean absolute frame difference (0..255) under which a clip counts as static in the report when
# --min-motion is off: under one grey level a pixel per frame, a still or a locked-off empty shot.
STATIC_MOTION = 1.0
# Fixed edges, so reports of two outputs compare bin by bin; the last bin holds everything above 32.
MOTION_EDGES = [0, 0.5, 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 256]
LISTED = 100  # static clips listed by name in report.json (all are counted)
_COLUMNS = [VIDEO_ID, SOURCE, CLIP_INDEX, START_FRAME, FRAME_STRIDE, FPS, MOTION_SCORE]


def _spread(values) -> dict:
    """min, median, max and mean of a list of numbers (None when empty)."""
    v = np.asarray(values, dtype=float)
    if not len(v):
        return {"min": None, "median": None, "max": None, "mean": None}
    return {
        k: round(float(f(v)), 3)
        for k, f in (("min", np.min), ("median", np.median), ("max", np.max), ("mean", np.mean))
    }


def build_report(output: str, videos_in: int | None = None, min_motion: float | None = None) -> dict:
    """The report of OUTPUT as a dict (what report.json holds). videos_in: the videos the job was
    given (the shards know only those that produced something)."""
    clips, errors, videos = (
        shards.read_identity(output, _COLUMNS),
        shards.read_errors(output),
        shards.read_videos(output),
    )
    manifest = shards.read_manifest(output) or {}
    num_frames = json.loads(manifest.get("clip_sampling", "{}")).get("num_frames", 16)
    motion = clips.column(MOTION_SCORE).to_numpy(zero_copy_only=False).astype(float)
    video_ids = np.unique(shards.id_numbers(clips.column(VIDEO_ID))) if clips.num_rows else []
    fps = clips.column(FPS).to_numpy(zero_copy_only=False).astype(float)
    stride = clips.column(FRAME_STRIDE).to_numpy(zero_copy_only=False).astype(float)
    clip_seconds = np.where(fps > 0, ((num_frames - 1) * stride + 1) / np.where(fps > 0, fps, 1), 0.0)
    per_video = Counter(clips.column(VIDEO_ID).to_pylist()) if clips.num_rows else Counter()

    rows = videos.to_pylist()
    detected = [r for r in rows if r["shots"] is not None]
    shot_seconds = [n / r["fps"] for r in detected if r["fps"] for n in (r["shot_frames"] or [])]
    threshold = STATIC_MOTION if min_motion is None else min_motion
    dropped = [
        {SOURCE: r[SOURCE], **c, "dropped": True} for r in rows for c in (r["static_clips"] or [])
    ]  # by --min-motion: not in the shards
    below = np.flatnonzero(motion < threshold)
    kept = [
        {SOURCE: s, CLIP_INDEX: i, START_FRAME: f, MOTION_SCORE: m, "dropped": False}
        for s, i, f, m in zip(
            *(clips.column(c).take(pa.array(below)).to_pylist() for c in (SOURCE, CLIP_INDEX, START_FRAME)),
            motion[below].tolist(),
        )
    ]
    static = sorted(dropped + kept, key=lambda c: c[MOTION_SCORE])
    counts, _ = np.histogram(np.clip(motion, 0, MOTION_EDGES[-1]), bins=MOTION_EDGES)
    return {
        "output": output,
        "schema_version": manifest.get("schema_version"),
        "videos": {
            "in": videos_in,
            "out": len(video_ids),  # with at least one clip in the shards
            "failed": errors.num_rows,
            "failed_by_reason": dict(Counter(r.split(":")[0] for r in errors.column("reason").to_pylist())),
            "decoded": videos.num_rows,  # what the decoder could read a header of (videos/)
        },
        "durations_s": {**_spread(videos.column("duration_s").to_pylist()), "total": _total(videos, "duration_s")},
        "resolutions": dict(Counter(f"{r['width']}x{r['height']}" for r in rows).most_common()),
        "frame_rates": dict(Counter(f"{r['fps']:.3g}" for r in rows).most_common()),
        "shots": {
            "videos_with_scene_cuts": len(detected),
            "total": sum(r["shots"] for r in detected),
            "cuts": sum(len(r["cuts"] or []) for r in detected),
            "too_short_for_a_clip": sum(r["short_shots"] for r in detected),
            "seconds": _spread(shot_seconds),
        },
        "clips": {
            "total": clips.num_rows,
            "seconds": round(float(clip_seconds.sum()), 2),
            "per_video": _spread(list(per_video.values())),
        },
        "motion": {
            "score": "mean absolute difference of a clip's consecutive frames, 0-255, at the clip's size",
            **_spread(motion),
            "histogram": {"edges": MOTION_EDGES, "counts": counts.tolist()},
        },
        "static_clips": {
            "threshold": threshold,
            "min_motion": min_motion,  # None: nothing dropped; the clips under the threshold are in the shards
            "count": len(static),
            "dropped": len(dropped),
            "in_shards": len(kept),
            "clips": [{k: (round(v, 3) if k == MOTION_SCORE else v) for k, v in c.items()} for c in static[:LISTED]],
        },
    }


def _total(table: pa.Table, column: str) -> float:
    values = table.column(column).to_numpy(zero_copy_only=False) if table.num_rows else np.zeros(0)
    return round(float(np.nansum(values.astype(float))), 2)


def write_report(output: str, videos_in: int | None = None, min_motion: float | None = None) -> dict:
    """build_report, written as OUTPUT/report.json and OUTPUT/report.html; returns the report."""
    report = build_report(output, videos_in, min_motion)
    storage.write_text(storage.join(output, shards.REPORT_JSON), json.dumps(report, indent=2))
    storage.write_text(storage.join(output, shards.REPORT_HTML), _html(report, output))
    return report


# ---------------------------------------------------------------------------------------------
# The HTML page: tables of the counts and three small plots, inline (one file, nothing to fetch)
# ---------------------------------------------------------------------------------------------


def _plot(draw) -> str:
    """A matplotlib figure (Agg canvas: no pyplot, no global backend) as an inline PNG <img>."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 2.6), dpi=100)
    FigureCanvasAgg(figure)
    draw(figure.add_subplot())
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return f'<img alt="plot" src="data:image/png;base64,{base64.b64encode(buffer.getvalue()).decode()}">'


def _table(rows: list[tuple], head: tuple | None = None) -> str:
    cells = "".join("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows)
    top = "<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in head) + "</tr>" if head else ""
    return f"<table>{top}{cells}</table>"


def _html(report: dict, output: str) -> str:
    v, s, c, m = report["videos"], report["shots"], report["clips"], report["motion"]
    hist = m["histogram"]
    labels = [f"{a:g}-{b:g}" for a, b in zip(hist["edges"][:-1], hist["edges"][1:])]

    def motion_plot(ax):
        ax.bar(range(len(labels)), hist["counts"], color="#4a7ab5")
        ax.set_xticks(range(len(labels)), labels, rotation=45, fontsize=7)
        ax.axvline(
            np.searchsorted(hist["edges"], report["static_clips"]["threshold"]) - 0.5, color="#c33", linestyle="--"
        )
        ax.set(title="motion score per clip", ylabel="clips")

    def resolutions_plot(ax):
        ax.bar(range(len(report["resolutions"])), list(report["resolutions"].values()), color="#6a6")
        ax.set_xticks(range(len(report["resolutions"])), list(report["resolutions"]), rotation=45, fontsize=7)
        ax.set(title="videos by resolution", ylabel="videos")

    summary = [
        ("videos in", v["in"]),
        ("videos with clips", v["out"]),
        ("videos failed", v["failed"]),
        ("shots (videos with scene cuts)", f"{s['total']} ({s['videos_with_scene_cuts']})"),
        ("shots too short for a clip", s["too_short_for_a_clip"]),
        ("clips", c["total"]),
        ("clip seconds", c["seconds"]),
        ("video seconds", report["durations_s"]["total"]),
        (
            "static clips (dropped / in shards)",
            f"{report['static_clips']['dropped']} / {report['static_clips']['in_shards']}",
        ),
    ]
    static = report["static_clips"]
    parts = [
        "<!doctype html><meta charset=utf-8><title>precompute report</title>",
        "<style>body{font:14px sans-serif;margin:2em}td,th{padding:2px 10px;text-align:left}"
        "table{border-collapse:collapse;margin-bottom:1em}tr:nth-child(even){background:#f4f4f4}</style>",
        f"<h1>What {html.escape(output)} holds</h1>",
        _table(summary),
        "<h2>Failures by reason</h2>",
        _table(sorted(v["failed_by_reason"].items()), ("reason", "videos")),
        "<h2>Motion</h2>",
        _plot(motion_plot),
        f"<p>{html.escape(m['score'])}; median {m['median']}. The dashed line: {static['threshold']:g}"
        + (" (--min-motion)" if static["min_motion"] is not None else " (what --min-motion would drop)")
        + "</p>",
        "<h2>Resolutions and frame rates</h2>",
        _plot(resolutions_plot),
        _table(list(report["frame_rates"].items()), ("fps", "videos")),
        "<h2>Durations (s)</h2>",
        _table([(k, report["durations_s"][k]) for k in ("min", "median", "max", "total")]),
        f"<h2>Static clips ({static['count']}, the first {min(static['count'], LISTED)})</h2>",
        _table(
            [(x[SOURCE], x[CLIP_INDEX], x[START_FRAME], x[MOTION_SCORE], x["dropped"]) for x in static["clips"]],
            ("source", "clip", "start frame", "motion", "dropped"),
        ),
    ]
    return "\n".join(parts) + "\n"
