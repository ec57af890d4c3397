"""What every step of a video, and every later stage, shares: column names, ClipSpec, errors, ids."""

from __future__ import annotations

import dataclasses
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
# Clips the row's video delivers in all, so a rerun knows whether it is complete. Null on rows sent
# before the decoder reached the video's end (scene cuts or --min-motion: the count is known only
# then); the video's last rows always carry it.
NUM_CLIPS = "num_clips"
MOTION_SCORE = "motion_score"  # mean absolute difference of the clip's consecutive frames, 0..255 (shots.py)
STAGE = "stage"  # error rows: which stage failed
REASON = "reason"  # error rows: "<code>: <detail>", e.g. "too_short: 5 frames, clip needs 16"


class VideoError(Exception):
    """A bad video, described by a machine-friendly code and a human detail.

    Codes: not_found, empty_file, not_a_video, no_video_stream, corrupt, truncated, too_large,
    too_short (also: no shot as long as a clip), static (every clip under ClipSpec.min_motion);
    IsolatedDecoder adds timeout and decoder_crashed.
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
    # Cut clips only inside shots (PySceneDetect's AdaptiveDetector on every decoded frame: shots.py).
    # Off here, the decoder's own default, so evaluation's clips and the decoder's tests stay as they
    # were; the jobs that cut training clips (precompute, the autoencoder) turn it on by default.
    scene_cuts: bool = False
    scene_cut_threshold: float = 3.0  # AdaptiveDetector's adaptive_threshold: a frame's change over its neighbours'
    min_motion: float | None = None  # drop clips whose MOTION_SCORE is below this (None: keep every clip)

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
        if not self.scene_cut_threshold > 0:
            raise ValueError(f"ClipSpec.scene_cut_threshold must be > 0, got {self.scene_cut_threshold!r}")
        if self.min_motion is not None and not self.min_motion >= 0:
            raise ValueError(f"ClipSpec.min_motion must be >= 0 or None, got {self.min_motion!r}")

    @property
    def all_windows(self) -> bool:
        """The default sampling: every back-to-back window, from the start (of the video, or of each shot)."""
        return self.clips_per_video is None and self.sampling == "uniform"

    def sampling_key(self) -> dict:
        """What decides which clips a video gives (for an output's manifest): the fields, less the
        timeout, and less the scene-cut and motion fields while they are off (the key then reads as
        it did before they existed; the manifest's schema_version tells the outputs apart)."""
        key = {k: v for k, v in dataclasses.asdict(self).items() if k != "decode_timeout_s"}
        if not self.scene_cuts:
            del key["scene_cuts"], key["scene_cut_threshold"]
        if self.min_motion is None:
            del key["min_motion"]
        return key


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
