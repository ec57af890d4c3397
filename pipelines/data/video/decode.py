"""Step 3: decode only the frames in a video's clip windows, downscaled and centre-cropped.

decord first, PyAV when decord refuses the file or fails part way. This runs in the calling
process; isolated.IsolatedDecoder runs it in a killable child instead.

With ClipSpec.scene_cuts the windows stay inside shots (shots.py). The default sampling (every
back-to-back window) then reads the video once, in order, and the detector sees the same frames
the clips are cut from (ShotWindows); other samplings (N clips, random) need every shot before
they can choose, so a sequential PyAV pass at the detector's size finds the cuts first.
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
    MOTION_SCORE,
    NUM_CLIPS,
    SOURCE,
    START_FRAME,
    VIDEO_ID,
    ClipSpec,
    VideoError,
    brief,
    make_video_id,
)
from pipelines.data.video.shots import CutDetector, ShotWindows, detection_size, motion_score
from pipelines.data.video.windows import clip_stride, plan_windows, shots_of, window

# The pipeline runs one decode per CPU it reserves, so a decoder uses one thread, not every core.
DECODE_THREADS = 1
# decord's fault_tol is a fraction of the video when in (0, 1): this tiny one means the first frame
# decord fails to decode raises (and PyAV takes over) instead of being silently duplicated
# (decord#119). It does not see frames FFmpeg conceals after bit errors; only PyAV flags those.
DECORD_FAULT_TOL = 1e-6
# Frames per decord get_batch in the sequential pass (ShotWindows): one clip's worth, as a window read is.
READ_FRAMES = 16

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
    return np.ascontiguousarray(_center_view(frames, spec))


def _center_view(frames: np.ndarray, spec: ClipSpec) -> np.ndarray:
    """_center_crop without the copy: ShotWindows copies each frame once, into its clip."""
    h, w = frames.shape[-3:-1]
    top, left = (h - spec.height) // 2, (w - spec.width) // 2
    return frames[..., top : top + spec.height, left : left + spec.width, :]


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


def _plan_present(
    present: int, info: dict, spec: ClipSpec, source: str, cut_off: bool, cuts: tuple[int, ...] = ()
) -> Plan:
    """Windows planned on the `present` frames really there; a cut-off file that is too short is truncated."""
    try:
        stride, starts = plan_windows(present, info["fps"], spec, source, cuts)
    except VideoError as exc:
        if cut_off:
            raise VideoError("truncated", f"{present} of {info['num_frames']} frames present; {exc}") from None
        raise
    return stride, starts, info["fps"]


def _pyav_chunks(
    path: str,
    info: dict,
    spec: ClipSpec,
    source: str,
    chunk_clips: int,
    plan: Plan | None = None,
    sent: int = 0,
    cuts: tuple[int, ...] = (),
    stats: dict | None = None,
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
        plan = _plan_present(present, info, spec, source, cut_off, cuts)
        if stats is not None:
            stats["clips_planned"] = len(plan[1])
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
    path: str,
    source: str,
    spec: ClipSpec,
    chunk_clips: int,
    width: int,
    height: int,
    cuts: tuple[int, ...] = (),
    scanned: int | None = None,
    stats: dict | None = None,
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
        # container that over-reports makes get_batch fail, and PyAV then counts real frames
        # (a cut scan has counted them already: `scanned`).
        stride, starts = plan_windows(min(available, scanned or available), fps, spec, source, cuts)
        plan = (stride, starts, fps)
        if stats is not None:
            stats["clips_planned"] = len(starts)
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


def decode_chunks(
    path: str, source: str, spec: ClipSpec, chunk_clips: int, stats: dict | None = None
) -> Iterator[list[dict]]:
    """Clip rows of the local file `path`, labelled with `source`, in lists of at most chunk_clips
    rows, in clip order; raises VideoError (possibly after some lists were yielded).

    decord first: one get_batch per window, so only the current chunk is held. A file decord cannot
    open goes to PyAV, which plans its own windows. If decord fails after clips were yielded, PyAV
    finishes the same plan, so clip_index and num_clips keep the meaning they were given.

    Each row also gets its MOTION_SCORE; spec.min_motion drops the clips under it. Where the
    number of clips is known only at the video's end (scene cuts with the default sampling, or
    min_motion), rows carry NUM_CLIPS None and the video's last rows the count (_deliver).
    `stats`, when given, is filled with what the data report needs: the header's size, fps and
    duration, the frames scanned, cuts, shots, clips planned and delivered, and the static clips.
    """
    stats = {} if stats is None else stats
    info = probe(path)
    stats.update(
        width=info["width"],
        height=info["height"],
        fps=info["fps"],
        duration_s=info["duration"],
        frames=info["num_frames"],
    )
    if info["width"] * info["height"] > spec.max_pixels:
        raise VideoError("too_large", f"{info['width']}x{info['height']} is over {spec.max_pixels} pixels")
    width, height = _resize_dims(info["width"], info["height"], spec)
    streamed = spec.scene_cuts and spec.all_windows
    if streamed:
        chunks = _shot_chunks(path, info, spec, source, chunk_clips, width, height, stats)
    else:
        chunks = _planned_chunks(path, info, spec, source, chunk_clips, width, height, stats)
    yield from _deliver(chunks, spec, stats, chunk_clips, counted=not streamed and spec.min_motion is None)


def _planned_chunks(
    path: str, info: dict, spec: ClipSpec, source: str, chunk_clips: int, width: int, height: int, stats: dict
) -> Iterator[list[dict]]:
    """Windows planned before decoding (plan_windows): decord, then PyAV for what decord could not do."""
    cuts, scanned = (), None
    if spec.scene_cuts:
        scanned, cuts = scan_cuts(path, info["fps"], width, height, spec.scene_cut_threshold)
        _shot_stats(stats, scanned, cuts, spec, info["fps"])
    sent, plan, decord_failure = yield from _decord_chunks(
        path, source, spec, chunk_clips, width, height, tuple(cuts), scanned, stats
    )
    if decord_failure is None:
        return
    try:
        yield from _pyav_chunks(path, info, spec, source, chunk_clips, plan if sent else None, sent, tuple(cuts), stats)
    except (av.error.FFmpegError, OSError) as exc:
        raise VideoError("corrupt", f"decord {decord_failure}; pyav {brief(exc)}") from None


def scan_cuts(path: str, fps: float, width: int, height: int, threshold: float) -> tuple[int, list[int]]:
    """(frames decoded, cuts) of a whole video: one sequential PyAV pass at the detector's size.

    For the samplings that must see every shot before choosing windows. A damaged tail ends the
    scan: the windows are then planned on the frames before it.
    """
    det_width, det_height = detection_size(width, height)
    detector = CutDetector(fps, threshold)
    try:
        container = av.open(path, metadata_errors="ignore")
    except av.error.FFmpegError as exc:
        raise VideoError("corrupt", f"scene-cut scan: {brief(exc)}") from None
    try:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = DECODE_THREADS
        try:
            for frame in container.decode(stream):
                detector.push(frame.reformat(width=det_width, height=det_height, format="rgb24").to_ndarray())
        except av.error.FFmpegError:
            pass
        detector.finish()
    finally:
        container.close()
        gc.collect()  # as _pyav_stream: PyAV's decoder threads go with its objects
    return detector.frames, detector.cuts


def _shot_stats(stats: dict, scanned: int, cuts: list[int], spec: ClipSpec, fps: float) -> None:
    """What the report says of a video's shots: how many, how many too short for a clip, the cuts."""
    span = (spec.num_frames - 1) * clip_stride(fps, spec) + 1
    lengths = [b - a for a, b in shots_of(scanned, cuts)]
    stats.update(
        frames_scanned=scanned,
        cuts=list(cuts),
        shots=len(lengths),
        short_shots=sum(n < span for n in lengths),
        shot_frames=lengths,
    )


def _shot_chunks(
    path: str, info: dict, spec: ClipSpec, source: str, chunk_clips: int, width: int, height: int, stats: dict
) -> Iterator[list[dict]]:
    """The default sampling inside shots, in one sequential pass (ShotWindows): decord, and PyAV when
    decord cannot open the file or fails part way; PyAV then makes the whole pass again (the
    detector needs every frame from the start) and goes on after the last clip decord sent."""
    sent, last_start, failure = yield from _decord_shots(path, source, spec, chunk_clips, width, height, stats)
    if failure is None:
        return
    try:
        yield from _pyav_shots(path, info, spec, source, chunk_clips, width, height, stats, sent, last_start)
    except (av.error.FFmpegError, OSError) as exc:
        raise VideoError("corrupt", f"decord {failure}; pyav {brief(exc)}") from None


def _no_windows(windows: ShotWindows, spec: ClipSpec, code: str = "too_short") -> VideoError:
    lengths = [b - a for a, b in shots_of(windows.last + 1, windows.cuts)]
    return VideoError(
        code,
        f"{windows.last + 1} frames in {len(lengths)} shots, the longest {max(lengths, default=0)}; "
        f"a clip needs {windows.span}",
    )


def _decord_shots(
    path: str, source: str, spec: ClipSpec, chunk_clips: int, width: int, height: int, stats: dict
) -> Generator[list[dict], None, tuple[int, int, str | None]]:
    """_shot_chunks' decord pass: yields chunks; returns (clips sent, start of the last one sent, failure)."""
    try:
        reader = decord.VideoReader(
            path, width=width, height=height, num_threads=DECODE_THREADS, fault_tol=DECORD_FAULT_TOL
        )
        fps, available = reader.get_avg_fps(), len(reader)
    except Exception as exc:  # decord refuses many files PyAV still reads, e.g. cut-off tails
        return 0, -1, brief(exc)
    try:
        stride, _ = plan_windows(available, fps, spec, source)  # shorter than one clip: fails here, as without cuts
        windows = ShotWindows(
            available, stride, spec, CutDetector(fps, spec.scene_cut_threshold), lambda f: _center_view(f, spec)
        )
        rows, sent, last_start, at = [], 0, -1, 0
        while at < available and not windows.done():
            try:
                batch = reader.get_batch(list(range(at, min(at + READ_FRAMES, available)))).asnumpy()
            except Exception as exc:
                if rows:  # confirmed clips: valid whatever comes next
                    yield rows
                    sent, last_start = sent + len(rows), rows[-1][START_FRAME]
                return sent, last_start, brief(exc)
            for frame in batch:
                for start, frames in windows.push(at, frame):
                    rows.append(_clip_row(source, sent + len(rows), None, start, stride, fps, frames))
                at += 1
                if windows.done():
                    break
            if len(rows) >= chunk_clips:
                yield rows
                sent, last_start, rows = sent + len(rows), rows[-1][START_FRAME], []
            del batch
        if at >= available:
            rows += [
                _clip_row(source, sent + len(rows) + k, None, start, stride, fps, frames)
                for k, (start, frames) in enumerate(windows.finish())
            ]
        _shot_stats(stats, windows.last + 1, windows.cuts, spec, fps)
        stats["clips_planned"] = windows.found
        if not windows.found:
            raise _no_windows(windows, spec)
        if rows:
            yield rows
        return sent + len(rows), rows[-1][START_FRAME] if rows else last_start, None
    finally:
        del reader  # as _decord_chunks (decord#208)


def _pyav_shots(
    path: str,
    info: dict,
    spec: ClipSpec,
    source: str,
    chunk_clips: int,
    width: int,
    height: int,
    stats: dict,
    sent: int,
    after: int,
) -> Iterator[list[dict]]:
    """_shot_chunks' PyAV pass over the frames really present; windows starting at or before
    `after` were sent by decord (their `sent` clip indices are taken). A window holding a frame
    FFmpeg concealed after a bitstream error (is_corrupt) is dropped but keeps its index."""
    present = _count_packets(path)
    cut_off = present < info["num_frames"]
    stride, _, fps = _plan_present(present, info, spec, source, cut_off)
    windows = ShotWindows(
        present, stride, spec, CutDetector(fps, spec.scene_cut_threshold), lambda f: _center_view(f, spec)
    )
    concealed: set[int] = set()
    index, rows, emitted, failure = sent, [], 0, None

    def take(ready: list[tuple[int, np.ndarray]]) -> None:
        nonlocal index
        for start, frames in ready:
            if start <= after:
                continue
            if not concealed.intersection(window(start, stride, spec.num_frames)):
                rows.append(_clip_row(source, index, None, start, stride, fps, frames))
            index += 1

    container = av.open(path, metadata_errors="ignore")
    try:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = DECODE_THREADS
        decoded = 0
        try:
            for frame in container.decode(stream):
                if frame.is_corrupt:
                    concealed.add(decoded)
                take(windows.push(decoded, frame.reformat(width=width, height=height, format="rgb24").to_ndarray()))
                decoded += 1
                if len(rows) >= chunk_clips:
                    emitted += len(rows)
                    yield rows
                    rows = []
                if windows.done() or decoded >= present:
                    break
        except av.error.FFmpegError as exc:
            failure = exc  # keep the clips that finished before the damage
        if not windows.done():
            take(windows.finish())
        if rows:
            emitted += len(rows)
            yield rows
    finally:
        container.close()
        gc.collect()  # PyAV leaks decoder threads until its objects are collected (Open-Sora)
    _shot_stats(stats, windows.last + 1, windows.cuts, spec, fps)
    stats["clips_planned"] = index
    if index == 0:
        raise _no_windows(windows, spec, "truncated" if cut_off else "too_short")
    if not emitted and not sent:
        detail = f"{decoded} frames decoded, {index} clips damaged" + (f" ({brief(failure)})" if failure else "")
        raise VideoError("truncated" if cut_off else "corrupt", detail)


def _deliver(
    chunks: Iterator[list[dict]], spec: ClipSpec, stats: dict, chunk_clips: int, counted: bool
) -> Iterator[list[dict]]:
    """The rows as the caller gets them: each with its MOTION_SCORE, those under spec.min_motion
    dropped (listed in stats["static_clips"]), and, unless their NUM_CLIPS was `counted` before
    decoding, NUM_CLIPS None on every row but the video's last ones, which carry the count. One
    row is held back for that until the video ends, so the last chunk is never empty."""
    static = stats.setdefault("static_clips", [])
    held: list[dict] = []
    delivered = 0
    try:
        for chunk in chunks:
            kept = []
            for row in chunk:
                row[MOTION_SCORE] = motion_score(row[FRAMES])
                if spec.min_motion is not None and row[MOTION_SCORE] < spec.min_motion:
                    static.append({k: row[k] for k in (CLIP_INDEX, START_FRAME, MOTION_SCORE)})
                else:
                    kept.append(row)
            if counted:
                delivered += len(kept)
                if kept:
                    yield kept
                del chunk, kept  # hold one chunk, not two, while the next is decoded
                continue
            held += kept
            del chunk, kept
            while len(held) > chunk_clips:
                out, held = held[:chunk_clips], held[chunk_clips:]
                for row in out:
                    row[NUM_CLIPS] = None
                delivered += len(out)
                yield out
                del out
    except VideoError:
        if held:  # decoded before the failure: good clips (their video's count stays unknown)
            for row in held:
                row[NUM_CLIPS] = None
            yield held
        raise
    if held:
        for row in held:
            row[NUM_CLIPS] = stats["clips_planned"] - len(static)
        delivered += len(held)
        yield held
    stats["clips"] = delivered
    if not delivered and static:
        top = max(c[MOTION_SCORE] for c in static)
        raise VideoError("static", f"all {len(static)} clips under min_motion {spec.min_motion:g} (at most {top:.2f})")


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
