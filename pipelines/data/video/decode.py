"""Step 3: decode only the frames in a video's clip windows, downscaled and centre-cropped.

decord first, PyAV when decord refuses the file or fails part way. This runs in the calling
process; isolated.IsolatedDecoder runs it in a killable child instead.
"""

from __future__ import annotations

import gc
from typing import Callable, Generator, Iterator

import av
import decord
import numpy as np

from pipelines.data.video.probe import probe
from pipelines.data.video.schema import (
    CLIP_INDEX,
    FPS,
    FRAME_STRIDE,
    FRAMES,
    NUM_CLIPS,
    SOURCE,
    START_FRAME,
    VIDEO_ID,
    ClipSpec,
    VideoError,
    brief,
    make_video_id,
)
from pipelines.data.video.windows import plan_windows, window

# The pipeline runs one decode per CPU it reserves, so a decoder uses one thread, not every core.
DECODE_THREADS = 1
# decord's fault_tol is a fraction of the video when in (0, 1): this tiny one means the first frame
# decord fails to decode raises (and PyAV takes over) instead of being silently duplicated
# (decord#119). It does not see frames FFmpeg conceals after bit errors; only PyAV flags those.
DECORD_FAULT_TOL = 1e-6

# (stride, window starts, fps): the clips planned for one video
Plan = tuple[int, list[int], float]


def _resize_dims(src_width: int, src_height: int, spec: ClipSpec) -> tuple[int, int]:
    """(width, height) to decode at: the smallest aspect-kept size covering the output.

    For a square output this makes the shorter side match; the centre crop removes the rest.
    """
    scale = max(spec.width / src_width, spec.height / src_height)
    return max(spec.width, round(src_width * scale)), max(spec.height, round(src_height * scale))


def _center_crop(frames: np.ndarray, spec: ClipSpec) -> np.ndarray:
    """[..., H', W', 3] -> contiguous [..., spec.height, spec.width, 3]."""
    h, w = frames.shape[-3:-1]
    top, left = (h - spec.height) // 2, (w - spec.width) // 2
    return np.ascontiguousarray(frames[..., top : top + spec.height, left : left + spec.width, :])


def _clip_row(
    source: str, clip_index: int, num_clips: int, start: int, stride: int, fps: float, frames: np.ndarray
) -> dict:
    return {
        VIDEO_ID: make_video_id(source),
        SOURCE: source,
        CLIP_INDEX: clip_index,
        NUM_CLIPS: num_clips,
        START_FRAME: start,
        FRAME_STRIDE: stride,
        FPS: float(fps),
        FRAMES: frames,
    }


def _count_packets(path: str) -> int:
    """Frames actually present: video packets up to the first unreadable byte (no decoding)."""
    count = 0
    with av.open(path, metadata_errors="ignore") as container:
        try:
            for packet in container.demux(container.streams.video[0]):
                count += packet.size > 0  # the final flush packet is empty
        except av.error.FFmpegError:
            pass  # a damaged tail ends the count
    return count


def _frame_slots(
    plan: Plan, num_frames: int, first: int
) -> tuple[dict[int, list[tuple[int, int]]], dict[int, list[int]]]:
    """Where each frame goes, for clips first.. of the plan: (wanted, ends).

    wanted: frame index -> [(clip, slot)]; ends: frame index -> clips whose window ends there.
    """
    stride, starts, _ = plan
    wanted: dict[int, list[tuple[int, int]]] = {}  # frame index -> [(clip, slot)]
    ends: dict[int, list[int]] = {}  # frame index -> clips whose window ends there
    for c in range(first, len(starts)):
        frames = window(starts[c], stride, num_frames)
        for k, index in enumerate(frames):
            wanted.setdefault(index, []).append((c, k))
        ends.setdefault(frames[-1], []).append(c)
    return wanted, ends


def _plan_present(present: int, info: dict, spec: ClipSpec, source: str, cut_off: bool) -> Plan:
    """Windows planned on the `present` frames really there; a cut-off file that is too short is truncated."""
    try:
        stride, starts = plan_windows(present, info["fps"], spec, source)
    except VideoError as exc:
        if cut_off:
            raise VideoError("truncated", f"{present} of {info['num_frames']} frames present; {exc}") from None
        raise
    return stride, starts, info["fps"]


def _pyav_chunks(
    path: str, info: dict, spec: ClipSpec, source: str, chunk_clips: int, plan: Plan | None = None, sent: int = 0
) -> Iterator[list[dict]]:
    """Decode sequentially with PyAV, yielding lists of at most chunk_clips rows as windows complete.

    Windows are planned on the frames really present, unless `plan` (stride, starts, fps) is given:
    then the first `sent` clips of that plan are skipped (decord already delivered them). A clip is
    dropped when the stream ends before it, or when one of its frames was concealed by FFmpeg after
    a bitstream error (is_corrupt). Memory: the clips whose windows are open (one, unless windows
    overlap) plus one chunk of finished ones.
    """
    present = _count_packets(path)
    cut_off = present < info["num_frames"]
    if plan is None:
        plan = _plan_present(present, info, spec, source, cut_off)
    decoded, emitted, spoiled, failure = yield from _pyav_stream(path, info, spec, source, chunk_clips, plan, sent)
    if not emitted and not sent:
        detail = f"{decoded} frames decoded, {len(spoiled)} of {len(plan[1])} clips damaged"
        detail += f" ({brief(failure)})" if failure else ""
        raise VideoError("truncated" if cut_off else "corrupt", detail)


def _pyav_stream(
    path: str, info: dict, spec: ClipSpec, source: str, chunk_clips: int, plan: Plan, sent: int
) -> Generator[list[dict], None, tuple[int, int, set[int], Exception | None]]:
    """_pyav_chunks' decode loop over clips sent.. of `plan`; returns (decoded, emitted, spoiled, failure).

    decoded: frames decoded; emitted: clips yielded; spoiled: clips with a concealed frame;
    failure: the FFmpeg error that ended the stream early, or None.
    """
    stride, starts, fps = plan
    wanted, ends = _frame_slots(plan, spec.num_frames, sent)
    width, height = _resize_dims(info["width"], info["height"], spec)
    open_clips: dict[int, np.ndarray] = {}  # clip -> uint8 [T, H, W, 3], allocated at its first frame
    ready: list[dict] = []
    last, decoded, emitted, failure, spoiled = max(wanted), 0, 0, None, set()
    container = av.open(path, metadata_errors="ignore")
    try:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = DECODE_THREADS
        try:
            for frame in container.decode(stream):
                if decoded in wanted:
                    rgb = _center_crop(frame.reformat(width=width, height=height, format="rgb24").to_ndarray(), spec)
                    for c, k in wanted[decoded]:
                        if c not in open_clips:
                            open_clips[c] = np.empty((spec.num_frames, spec.height, spec.width, 3), np.uint8)
                        open_clips[c][k] = rgb
                        if frame.is_corrupt:
                            spoiled.add(c)
                for c in ends.get(decoded, ()):  # windows have equal spans: they end in start order
                    clip = open_clips.pop(c)
                    if c not in spoiled:
                        ready.append(_clip_row(source, c, len(starts), starts[c], stride, fps, clip))
                decoded += 1
                if len(ready) >= chunk_clips:
                    emitted += len(ready)
                    yield ready
                    ready = []
                if decoded > last:
                    break
        except av.error.FFmpegError as exc:
            failure = exc  # keep the clips that finished before the damage
        if ready:
            emitted += len(ready)
            yield ready
    finally:
        container.close()
        gc.collect()  # PyAV leaks decoder threads until its objects are collected (Open-Sora)
    return decoded, emitted, spoiled, failure


def _decord_chunks(
    path: str, source: str, spec: ClipSpec, chunk_clips: int, width: int, height: int
) -> Generator[list[dict], None, tuple[int, Plan | None, str | None]]:
    """decode_chunks' decord stage: yields chunks; returns (sent, plan, failure).

    failure is None when every planned clip was yielded, else why decord gave up (it could not open
    the file: plan None; or get_batch failed after `sent` clips of `plan`).
    """
    try:
        reader = decord.VideoReader(
            path, width=width, height=height, num_threads=DECODE_THREADS, fault_tol=DECORD_FAULT_TOL
        )
        fps, available = reader.get_avg_fps(), len(reader)
    except Exception as exc:  # decord refuses many files PyAV still reads, e.g. cut-off tails
        return 0, None, brief(exc)
    sent = 0
    try:
        # Planning against len(reader) keeps every index below what decord thinks exists; a
        # container that over-reports makes get_batch fail, and PyAV then counts real frames.
        stride, starts = plan_windows(available, fps, spec, source)
        plan = (stride, starts, fps)
        while sent < len(starts):
            try:
                chunk = [
                    _clip_row(
                        source,
                        c,
                        len(starts),
                        starts[c],
                        stride,
                        fps,
                        _center_crop(reader.get_batch(window(starts[c], stride, spec.num_frames)).asnumpy(), spec),
                    )
                    for c in range(sent, min(sent + chunk_clips, len(starts)))
                ]
            except Exception as exc:
                return sent, plan, brief(exc)
            yield chunk
            sent += len(chunk)
            del chunk
        return sent, plan, None
    finally:
        del reader  # one reader per video, freed now: decord's RAM grows across seeks (decord#208)


def decode_chunks(path: str, source: str, spec: ClipSpec, chunk_clips: int) -> Iterator[list[dict]]:
    """Clip rows of the local file `path`, labelled with `source`, in lists of at most chunk_clips
    rows, in clip order; raises VideoError (possibly after some lists were yielded).

    decord first: one get_batch per window, so only the current chunk is held. A file decord cannot
    open goes to PyAV, which plans its own windows. If decord fails after clips were yielded, PyAV
    finishes the same plan, so clip_index and num_clips keep the meaning they were given.
    """
    info = probe(path)
    if info["width"] * info["height"] > spec.max_pixels:
        raise VideoError("too_large", f"{info['width']}x{info['height']} is over {spec.max_pixels} pixels")
    width, height = _resize_dims(info["width"], info["height"], spec)
    sent, plan, decord_failure = yield from _decord_chunks(path, source, spec, chunk_clips, width, height)
    if decord_failure is None:
        return
    try:
        yield from _pyav_chunks(path, info, spec, source, chunk_clips, plan if sent else None, sent)
    except (av.error.FFmpegError, OSError) as exc:
        raise VideoError("corrupt", f"decord {decord_failure}; pyav {brief(exc)}") from None


def decode_clips(source: str, spec: ClipSpec, *, open_file: Callable[[str], str] | None = None) -> list[dict]:
    """Decode one video into clip rows, in this process; raises VideoError for bad videos.

    Each row: {video_id, source, clip_index, num_clips, start_frame, frame_stride, fps,
    frames: uint8 [spec.num_frames, spec.height, spec.width, 3]}. clip_index is the window's
    place in the plan, so it names the same clip on a rerun; a dropped damaged clip leaves a gap.
    num_clips is the number of windows planned, known before any frame is decoded.
    open_file maps the URI to a local path (e.g. downloads s3:// to a temp file); default: identity.
    This holds the whole video's clips; IsolatedDecoder.decode_chunks streams them instead.
    """
    path = open_file(source) if open_file else source
    return [row for chunk in decode_chunks(path, source, spec, chunk_clips=64) for row in chunk]
