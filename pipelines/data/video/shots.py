"""Step 2b: hard cuts, found on the frames the decoder makes anyway, and clip windows that stay inside shots.

Every curation pipeline splits at shot changes before clipping (Open-Sora, LTX-Video, Cosmos); a
16-frame clip that straddles a cut teaches the motion model a jump no camera makes. Detection is
PySceneDetect's AdaptiveDetector (Open-Sora #98 moved to it: it compares a frame's change with its
neighbours', so fast camera motion is not taken for a cut), fed the decoder's own frames, shrunk to
at most DETECT_WIDTH pixels across: no second decode of the video.

- CutDetector   frames in order -> cut frames (the first frame of each new shot), `lag` frames late
- ShotWindows   the default sampling (every back-to-back window) inside shots, decided while the
                frames stream by, so one sequential decode pass gives both the cuts and the clips
- motion_score  a clip's mean absolute frame difference (the report's motion histogram, --min-motion)
"""

from __future__ import annotations

from collections import deque
from typing import Callable

import cv2
import numpy as np
from scenedetect.common import FrameTimecode
from scenedetect.detectors import AdaptiveDetector, ContentDetector

from pipelines.data.video.schema import ClipSpec

# PySceneDetect's own working width (scene_manager.DEFAULT_MIN_WIDTH): wider frames are shrunk first.
DETECT_WIDTH = 256
# ContentDetector's own default threshold (mean HSV change, 0..255), for the frames at a video's
# edges that AdaptiveDetector cannot judge against neighbours on both sides.
EDGE_THRESHOLD = 27.0
MOTION_GRID = 128  # motion_score looks at about this many pixels along a frame's longer side


class CutDetector:
    """Hard cuts of frames fed in order from frame 0: `push` returns the cuts (frame numbers, each
    the first frame of a new shot) up to `lag` frames behind the frame just pushed, in order, and
    `finish` the rest once the video has ended.

    PySceneDetect's AdaptiveDetector judges frame t by its change over the changes of frames
    t - lag .. t + lag. At the video's edges those neighbours are missing; fed as they come, the
    detector would compare frame 2 with a made-up zero change for frame 0 and call noise a cut
    (it did, on the demo's noisy 32x32 videos). So the first and last `lag` + 1 frames are mirrored
    around the edge frame (real changes on both sides), and because a mirror repeats the edge
    frame's own change among its neighbours, the first and last `lag` frames are also judged by
    ContentDetector's fixed threshold (EDGE_THRESHOLD), which needs no neighbours. min_scene_len is
    0: a cut closely followed by another must not be merged away, or a clip could start before the
    second one.
    """

    def __init__(self, fps: float, threshold: float):
        self.detector = AdaptiveDetector(adaptive_threshold=threshold, min_scene_len=0)
        self.lag = self.detector.window_width
        self.fps = fps if fps > 0 else 25.0  # FrameTimecode needs a rate; only frame numbers are used
        self.cuts: list[int] = []  # reported so far, in order
        self.frames = 0  # real frames pushed
        self._found: set[int] = set()  # found, not yet reported
        self._fed = 0  # frames given to the AdaptiveDetector, mirrored ones included
        self._first: list[np.ndarray] = []  # frames 0..lag, until the detector starts
        self._recent: deque[np.ndarray] = deque(maxlen=self.lag + 1)

    def push(self, frame: np.ndarray) -> list[int]:
        """Frame `self.frames` (uint8 RGB [H, W, 3], any size) -> the cuts now known, in order."""
        small = _detector_input(frame)
        self.frames += 1
        self._recent.append(small)
        if len(self._first) <= self.lag:
            self._first.append(small)
            if len(self._first) == self.lag + 1:  # start: frames lag..1 mirrored before frame 0
                self._edge(self._first, 0)
                for image in self._first[:0:-1] + self._first:
                    self._feed(image)
        else:
            self._feed(small)
        return self._report(self.frames - 1 - self.lag)

    def finish(self) -> list[int]:
        """The cuts not reported yet, once the last frame was pushed."""
        recent = list(self._recent)
        if self.frames > self.lag:  # end: frames n-2..n-1-lag mirrored after frame n-1
            for image in recent[-2::-1]:
                self._feed(image)
            self._edge(recent, self.frames - len(recent))
        elif self._first:
            self._edge(self._first, 0)
        return self._report(self.frames)

    def _feed(self, small: np.ndarray) -> None:
        at = FrameTimecode(self._fed, self.fps)
        self._fed += 1
        self._found.update(c.frame_num - self.lag for c in self.detector.process_frame(at, small))

    def _edge(self, frames: list[np.ndarray], first: int) -> None:
        """ContentDetector's fixed threshold over frames first.. (a cut needs no neighbours there)."""
        detector = ContentDetector(threshold=EDGE_THRESHOLD, min_scene_len=0)
        for k, image in enumerate(frames):
            self._found.update(first + c.frame_num for c in detector.process_frame(FrameTimecode(k, self.fps), image))

    def _report(self, upto: int) -> list[int]:
        if not self._found:  # most frames
            return []
        ready = sorted(c for c in self._found if c <= upto)
        self._found.difference_update(ready)
        ready = [c for c in ready if 0 < c < self.frames and (not self.cuts or c > self.cuts[-1])]
        self.cuts += ready
        return ready


def _detector_input(frame: np.ndarray) -> np.ndarray:
    """RGB -> the BGR image PySceneDetect expects, at most DETECT_WIDTH wide (area-averaged)."""
    h, w = frame.shape[:2]
    if w > DETECT_WIDTH:
        frame = cv2.resize(frame, (DETECT_WIDTH, max(1, round(h * DETECT_WIDTH / w))), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(frame, cv2.COLOR_RGB2BGR)


def detection_size(width: int, height: int) -> tuple[int, int]:
    """(width, height) the detector works at for frames decoded at (width, height)."""
    if width <= DETECT_WIDTH:
        return width, height
    return DETECT_WIDTH, max(1, round(height * DETECT_WIDTH / width))


class ShotWindows:
    """Every back-to-back clip window inside each shot (windows.plan_windows' default sampling with
    cuts), decided while frames stream by in order.

    push(i, frame) places frame i in the window being filled and feeds the detector; a window is
    handed out once the detector has seen `lag` frames past its end with no cut inside it. A cut
    at c drops the windows that hold frames on both sides of it and starts a new grid at c, filled
    from the last few frames kept for that (the detector reports c at most `lag` frames late).
    Memory: one window being filled, one or two finished ones, lag + 1 frames.
    """

    def __init__(
        self,
        available: int,
        stride: int,
        spec: ClipSpec,
        detector: CutDetector,
        crop: Callable[[np.ndarray], np.ndarray],  # a decoded frame -> the clip's part of it (a view will do)
    ):
        self.available, self.stride, self.length = available, stride, spec.num_frames
        self.span = (spec.num_frames - 1) * stride + 1
        self.detector, self.crop = detector, crop
        self.next_start = 0  # where the next window of the current shot starts
        self.open: tuple[int, np.ndarray] | None = None  # (start, frames) of the window being filled
        self.pending: list[tuple[int, int, np.ndarray]] = []  # (start, end, frames): complete, not yet confirmed
        self.recent: deque[tuple[int, np.ndarray]] = deque(maxlen=detector.lag + 1)
        self.last = -1  # the last frame pushed
        self.confirmed = -1  # the end of the last window handed out
        self.found = 0  # windows handed out

    @property
    def cuts(self) -> list[int]:
        return self.detector.cuts

    def push(self, index: int, frame: np.ndarray) -> list[tuple[int, np.ndarray]]:
        """Frame `index` (the one after the last) -> the windows now known to lie inside one shot: (start, frames)."""
        if index != self.last + 1:
            raise ValueError(f"frames must come in order: got {index} after {self.last}")
        self.last = index
        self.recent.append((index, frame))
        self._place(index, frame)
        for cut in self.detector.push(frame):
            self._cut(cut)
        return self._confirm(index - self.detector.lag)

    def finish(self) -> list[tuple[int, np.ndarray]]:
        """After the video's last frame: the cuts in its last frames, then every window left that holds none."""
        for cut in self.detector.finish():
            self._cut(cut)
        return self._confirm(self.last)

    def done(self) -> bool:
        """True when no later frame can add a window: nothing is being filled or waits, and even a cut
        not yet reported could not start a window that fits before the video ends."""
        return not self.open and not self.pending and self.last - self.detector.lag + self.span >= self.available

    def _place(self, index: int, frame: np.ndarray) -> None:
        cropped = None
        if self.open is None and index == self.next_start and index + self.span <= self.available:
            cropped = self.crop(frame)
            self.open = (index, np.empty((self.length, *cropped.shape), np.uint8))
        if self.open is None:
            return
        start, frames = self.open
        slot, off_grid = divmod(index - start, self.stride)
        if off_grid:
            return
        frames[slot] = self.crop(frame) if cropped is None else cropped
        if slot == self.length - 1:
            self.pending.append((start, index, frames))
            self.open, self.next_start = None, index + 1

    def _cut(self, cut: int) -> None:
        if cut <= self.confirmed or cut < self.last - self.detector.lag:
            raise RuntimeError(f"cut at frame {cut} reported too late (frame {self.last}, lag {self.detector.lag})")
        # Windows that end before the cut keep; the rest straddle it (or sit on the old shot's grid).
        self.pending = [w for w in self.pending if w[1] < cut]
        self.open, self.next_start = None, cut
        for index, frame in self.recent:  # the new shot's first frames have passed already: place them again
            if index >= cut:
                self._place(index, frame)

    def _confirm(self, frontier: int) -> list[tuple[int, np.ndarray]]:
        if not self.pending or self.pending[0][1] > frontier:  # most frames: nothing to hand out
            return []
        ready = [(start, frames) for start, end, frames in self.pending if end <= frontier]
        if ready:
            self.pending = [w for w in self.pending if w[1] > frontier]
            self.confirmed = max(self.confirmed, frontier)
            self.found += len(ready)
        return ready


def motion_score(frames: np.ndarray) -> float:
    """Mean absolute difference between consecutive frames of a clip (uint8 [T, H, W, 3]), on the
    0..255 scale: 0 for a still image, a few units for sensor noise or a slow pan. Taken on a grid
    of about MOTION_GRID pixels along the longer side, so it costs ~0.1 ms even at 512x1024."""
    if len(frames) < 2:
        return 0.0
    step = max(1, max(frames.shape[1:3]) // MOTION_GRID)
    sampled = frames[:, ::step, ::step]
    # A pair of frames at a time (cv2.absdiff stays in uint8): the decoder's memory stays about one
    # chunk of clips (tests/test_video_io.py), where int16 copies of the whole clip would add ~6 clips.
    total = sum(
        int(cv2.absdiff(np.ascontiguousarray(a), np.ascontiguousarray(b)).sum()) for a, b in zip(sampled, sampled[1:])
    )
    return total / ((len(frames) - 1) * sampled[0].size)
