"""What every step of a video, and every later stage, shares: column names, ClipSpec, errors, ids."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

# ---------------------------------------------------------------------------------------------
# Column names, shared by every stage of the project
# ---------------------------------------------------------------------------------------------

VIDEO_ID = "video_id"
SOURCE = "source"
CLIP_INDEX = "clip_index"
START_FRAME = "start_frame"
FRAME_STRIDE = "frame_stride"
FPS = "fps"
CAPTION = "caption"
LABEL = "label"
FRAMES = "frames"
NUM_CLIPS = "num_clips"  # windows planned for the row's video: a rerun knows whether it is complete
STAGE = "stage"  # error rows: which stage failed
REASON = "reason"  # error rows: "<code>: <detail>", e.g. "too_short: 5 frames, clip needs 16"


class VideoError(Exception):
    """A bad video, described by a machine-friendly code and a human detail.

    Codes: not_found, empty_file, not_a_video, no_video_stream, corrupt, truncated, too_large,
    too_short; IsolatedDecoder adds timeout and decoder_crashed.
    """

    def __init__(self, code: str, detail: str):
        super().__init__(f"{code}: {detail}")
        self.code = code


@dataclass(frozen=True, kw_only=True)
class ClipSpec:
    """How clips are cut from one video and the size they are decoded to."""

    height: int  # output pixels; frames are resized to cover (height, width), then centre-cropped
    width: int
    num_frames: int = 16
    frame_stride: int = 1  # take every stride-th source frame
    target_fps: float | None = None  # if set, stride = max(1, round(src_fps / target_fps))
    clips_per_video: int | None = None  # None: all non-overlapping windows
    sampling: str = "uniform"  # "uniform": evenly spaced windows; "random": seeded per video
    seed: int = 0
    max_pixels: int = 3840 * 2160  # bigger sources are rejected: decord RAM grows with 4K+ (decord#208)
    decode_timeout_s: float = 60.0  # only IsolatedDecoder enforces it

    @classmethod
    def for_preset(cls, preset, **overrides) -> "ClipSpec":
        """The clips a preset trains on (its video size and ClipSampling); `overrides` (None: keep) change fields."""
        h, w = preset.video_size
        c = preset.clips
        values = dict(
            height=h, width=w, num_frames=c.num_frames, frame_stride=c.frame_stride, clips_per_video=c.clips_per_video
        )
        return cls(**{**values, **{k: v for k, v in overrides.items() if v is not None}})

    def __post_init__(self):
        for name in ("height", "width", "num_frames", "frame_stride", "max_pixels"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"ClipSpec.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.target_fps is not None and not self.target_fps > 0:
            raise ValueError(f"ClipSpec.target_fps must be > 0 or None, got {self.target_fps!r}")
        if self.clips_per_video is not None and not (
            isinstance(self.clips_per_video, int) and self.clips_per_video >= 1
        ):
            raise ValueError(f"ClipSpec.clips_per_video must be a positive int or None, got {self.clips_per_video!r}")
        if self.sampling not in ("uniform", "random"):
            raise ValueError(f"ClipSpec.sampling must be 'uniform' or 'random', got {self.sampling!r}")
        if not self.decode_timeout_s > 0:
            raise ValueError(f"ClipSpec.decode_timeout_s must be > 0, got {self.decode_timeout_s!r}")


def make_video_id(source: str) -> str:
    """Stable id of a video: the first 16 hex digits of the SHA-1 of its URI."""
    return hashlib.sha1(source.encode()).hexdigest()[:16]


def error_row(source: str, reason: str, stage: str = "decode") -> dict:
    """The row that stands for a video that produced no clips."""
    return {SOURCE: source, STAGE: stage, REASON: reason}


def brief(exc: BaseException) -> str:
    """One short line for a reason string (decord messages carry a timestamp and source path)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"
