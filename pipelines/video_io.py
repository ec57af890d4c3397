"""One video file -> 16-frame clip rows; every failure becomes a reason string, never a crash.

Steps, in the order a video goes through them:
1. `probe` reads the container header (PyAV) and rejects files that are not videos.
2. `plan_windows` picks the clip windows (pure function of frame count, fps and ClipSpec).
3. `decode_clips` decodes only the frames in those windows, downscaled at decode time and
   centre-cropped: decord first, PyAV when decord refuses the file.
4. `IsolatedDecoder` runs step 3 in a long-lived child process, because decord can hang while
   holding the GIL (decord#373) or segfault (decord#25, #229): a hang is killed at the timeout
   and a crash only costs the child, which is replaced on the next call. Its `decode_chunks`
   streams a video's clips a few at a time, so memory does not grow with the video's length.

Rows are clips, never whole videos (ray#32746): one row holds frames uint8 [T, H, W, 3].
This module does not import ray; pipelines wrap it in Ray tasks and actors.
"""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import os
import select
import signal
import stat
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import av
import decord
import numpy as np

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

# The pipeline runs one decode per CPU it reserves, so a decoder uses one thread, not every core.
DECODE_THREADS = 1
# decord's fault_tol is a fraction of the video when in (0, 1): this tiny one means the first frame
# decord fails to decode raises (and PyAV takes over) instead of being silently duplicated
# (decord#119). It does not see frames FFmpeg conceals after bit errors; only PyAV flags those.
DECORD_FAULT_TOL = 1e-6


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
        values = dict(height=h, width=w, num_frames=c.num_frames, frame_stride=c.frame_stride, clips_per_video=c.clips_per_video)
        return cls(**{**values, **{k: v for k, v in overrides.items() if v is not None}})

    def __post_init__(self):
        for name in ("height", "width", "num_frames", "frame_stride", "max_pixels"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"ClipSpec.{name} must be a positive int, got {getattr(self, name)!r}")
        if self.target_fps is not None and not self.target_fps > 0:
            raise ValueError(f"ClipSpec.target_fps must be > 0 or None, got {self.target_fps!r}")
        if self.clips_per_video is not None and not (
                isinstance(self.clips_per_video, int) and self.clips_per_video >= 1):
            raise ValueError(
                f"ClipSpec.clips_per_video must be a positive int or None, got {self.clips_per_video!r}")
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


def _brief(exc: BaseException) -> str:
    """One short line for a reason string (decord messages carry a timestamp and source path)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200] if lines else ''}"


# ---------------------------------------------------------------------------------------------
# Probe: what the container header says
# ---------------------------------------------------------------------------------------------

# Leading bytes of containers we recognise; a file starting with one that the demuxer cannot
# open is a damaged video, not "not a video".
_BMFF_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide")  # at offset 4 (mp4/mov)
_SIGNATURES = (b"\x1a\x45\xdf\xa3", b"RIFF", b"OggS", b"FLV\x01", b"\x30\x26\xb2\x75", b"\x00\x00\x01\xba")


def _bmff_past_eof(f, size: int) -> bool:
    """True if a top-level mp4 box claims bytes beyond the end of the file (a cut-off download)."""
    pos = 0
    while pos + 8 <= size:
        f.seek(pos)
        head = f.read(16)
        box = int.from_bytes(head[:4], "big")
        if box == 1:  # 64-bit size follows the type
            box = int.from_bytes(head[8:16], "big")
        if box == 0:  # "extends to end of file"
            return False
        if box < 8:
            return False  # garbage box size: damaged, but not provably cut off
        pos += box
    return pos > size


def _unopenable_reason(path: str) -> str:
    """Reason code for a file the demuxer refused: truncated, corrupt, or not a video at all."""
    with open(path, "rb") as f:
        head = f.read(12)
        if head[4:8] in _BMFF_BOXES:
            return "truncated" if _bmff_past_eof(f, os.fstat(f.fileno()).st_size) else "corrupt"
    return "corrupt" if head.startswith(_SIGNATURES) else "not_a_video"


def probe(path: str) -> dict:
    """Header facts {num_frames, fps, width, height, duration}; raises VideoError.

    num_frames is what the container claims and may over-report (ANCHORS 3.5);
    for containers without a count (mkv, webm) it is estimated as duration * fps.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise VideoError("not_found", path) from None
    # Only regular files can be judged by size; a pipe or device is left to the demuxer.
    if stat.S_ISREG(st.st_mode) and st.st_size == 0:
        raise VideoError("empty_file", "0 bytes")
    try:
        container = av.open(path, metadata_errors="ignore")
    except av.error.FFmpegError as exc:
        raise VideoError(_unopenable_reason(path), _brief(exc)) from None
    try:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["none"]
            raise VideoError("no_video_stream", f"streams: {', '.join(kinds)}")
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        if stream.duration:
            duration = float(stream.duration * stream.time_base)
        else:
            duration = (container.duration or 0) / av.time_base
        width, height = stream.codec_context.width, stream.codec_context.height
        if not width or not height:
            raise VideoError("corrupt", "video stream has no frame size")
        return {
            "num_frames": int(stream.frames or round(duration * fps)),
            "fps": fps,
            "width": width,
            "height": height,
            "duration": duration,
        }
    finally:
        container.close()


# ---------------------------------------------------------------------------------------------
# Window planning (pure)
# ---------------------------------------------------------------------------------------------

def plan_windows(num_frames_available: int, src_fps: float, spec: ClipSpec,
                 source: str) -> tuple[int, list[int]]:
    """Choose clip windows: returns (stride, starts), sorted.

    Clip c covers frames starts[c] + stride * arange(spec.num_frames). Random sampling is seeded
    by (spec.seed, source), so a rerun picks the same windows for the same video.
    """
    stride = spec.frame_stride
    if spec.target_fps and src_fps > 0:
        stride = max(1, round(src_fps / spec.target_fps))
    span = (spec.num_frames - 1) * stride + 1
    slack = num_frames_available - span  # how far right the first window can move
    if slack < 0:
        raise VideoError("too_short", f"{num_frames_available} frames, clip needs {span}")
    rng = np.random.default_rng([spec.seed, int(make_video_id(source), 16)])
    if spec.clips_per_video is None:
        count = slack // span + 1  # back-to-back windows
        # Random sampling shifts the whole grid inside the leftover frames.
        offset = int(rng.integers(0, slack - (count - 1) * span + 1)) if spec.sampling == "random" else 0
        return stride, [offset + i * span for i in range(count)]
    if spec.sampling == "uniform":
        # Windows overlap when more are asked for than fit side by side.
        starts = np.linspace(0, slack, spec.clips_per_video).round().astype(int)
        return stride, np.unique(starts).tolist()
    count = min(spec.clips_per_video, slack + 1)
    return stride, sorted(rng.choice(slack + 1, size=count, replace=False).tolist())


def _window(start: int, stride: int, num_frames: int) -> list[int]:
    return list(range(start, start + stride * num_frames, stride))


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------

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
    return np.ascontiguousarray(frames[..., top:top + spec.height, left:left + spec.width, :])


def _clip_row(source: str, clip_index: int, num_clips: int, start: int, stride: int, fps: float,
              frames: np.ndarray) -> dict:
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


def _pyav_chunks(path: str, info: dict, spec: ClipSpec, source: str, chunk_clips: int,
                 plan: tuple[int, list[int], float] | None = None, sent: int = 0) -> Iterator[list[dict]]:
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
        try:
            stride, starts = plan_windows(present, info["fps"], spec, source)
        except VideoError as exc:
            if cut_off:
                raise VideoError("truncated", f"{present} of {info['num_frames']} frames present; {exc}") from None
            raise
        fps = info["fps"]
    else:
        stride, starts, fps = plan
    wanted: dict[int, list[tuple[int, int]]] = {}  # frame index -> [(clip, slot)]
    ends: dict[int, list[int]] = {}  # frame index -> clips whose window ends there
    for c in range(sent, len(starts)):
        window = _window(starts[c], stride, spec.num_frames)
        for k, index in enumerate(window):
            wanted.setdefault(index, []).append((c, k))
        ends.setdefault(window[-1], []).append(c)
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
    if not emitted and not sent:
        detail = f"{decoded} frames decoded, {len(spoiled)} of {len(starts)} clips damaged"
        detail += f" ({_brief(failure)})" if failure else ""
        raise VideoError("truncated" if cut_off else "corrupt", detail)


def _decode_chunks(path: str, source: str, spec: ClipSpec, chunk_clips: int) -> Iterator[list[dict]]:
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
    sent, plan = 0, None
    try:
        reader = decord.VideoReader(path, width=width, height=height, num_threads=DECODE_THREADS,
                                    fault_tol=DECORD_FAULT_TOL)
        fps, available = reader.get_avg_fps(), len(reader)
    except Exception as exc:  # decord refuses many files PyAV still reads, e.g. cut-off tails
        reader, decord_failure = None, _brief(exc)
    if reader is not None:
        try:
            # Planning against len(reader) keeps every index below what decord thinks exists; a
            # container that over-reports makes get_batch fail, and PyAV then counts real frames.
            stride, starts = plan_windows(available, fps, spec, source)
            plan = (stride, starts, fps)
            while sent < len(starts):
                try:
                    chunk = [
                        _clip_row(source, c, len(starts), starts[c], stride, fps,
                                  _center_crop(reader.get_batch(_window(starts[c], stride, spec.num_frames)).asnumpy(), spec))
                        for c in range(sent, min(sent + chunk_clips, len(starts)))
                    ]
                except Exception as exc:
                    decord_failure = _brief(exc)
                    break
                yield chunk
                sent += len(chunk)
                del chunk
            else:
                return
        finally:
            del reader  # one reader per video, freed now: decord's RAM grows across seeks (decord#208)
    try:
        yield from _pyav_chunks(path, info, spec, source, chunk_clips, plan if sent else None, sent)
    except (av.error.FFmpegError, OSError) as exc:
        raise VideoError("corrupt", f"decord {decord_failure}; pyav {_brief(exc)}") from None


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
    return [row for chunk in _decode_chunks(path, source, spec, chunk_clips=64) for row in chunk]


# ---------------------------------------------------------------------------------------------
# Isolation: a killable child process speaking a length-prefixed protocol on stdin/stdout
# ---------------------------------------------------------------------------------------------
# Message: 8-byte big-endian length, then that many bytes of JSON. Per request the child sends
# zero or more chunk messages, {"rows": [clip metadata], "shape": [C, T, H, W, 3]} followed by the
# chunk's frames as raw uint8 bytes, then exactly one final message: {"done": true, "clips": n} or
# {"error": reason}. The pipe is the backpressure: a child that is ahead of its parent blocks on
# write, holding one chunk. subprocess rather than multiprocessing: it works the same inside Ray
# workers and never pickles.

_LENGTH = struct.Struct(">Q")
_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _send(stream, header: dict, payload: list[np.ndarray] = ()) -> None:
    data = json.dumps(header).encode()
    stream.write(_LENGTH.pack(len(data)) + data)
    for array in payload:
        stream.write(memoryview(array))
    stream.flush()


def _recv_blocking(stream) -> dict | None:
    """Next request (child side); None when the parent closed the pipe."""
    head = stream.read(_LENGTH.size)
    if len(head) < _LENGTH.size:
        return None
    return json.loads(stream.read(_LENGTH.unpack(head)[0]))


def _read_into(fd: int, view: memoryview, deadline: float) -> None:
    """Fill `view` from fd; TimeoutError at the deadline, EOFError if the child is gone."""
    got = 0
    while got < len(view):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError
        n = os.readv(fd, [view[got:]])
        if n == 0:
            raise EOFError
        got += n


def _serve() -> None:
    """Child main loop: decode requests until stdin closes, streaming each video's chunks."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints from native libraries go to stderr, not into the protocol
    requests = os.fdopen(os.dup(0), "rb")
    _send(out, {"ready": True})
    while (request := _recv_blocking(requests)) is not None:
        sent = 0
        try:
            for rows in _decode_chunks(request["path"], request["source"], ClipSpec(**request["spec"]),
                                       request["chunk_clips"]):
                frames = [row.pop(FRAMES) for row in rows]
                _send(out, {"rows": rows, "shape": [len(frames), *frames[0].shape]}, frames)
                sent += len(rows)
                del rows, frames  # hold one chunk, not two, while the next is decoded
        except VideoError as exc:
            _send(out, {"error": str(exc)})
            continue
        except Exception as exc:  # a bug must become an error row, not end the worker
            _send(out, {"error": f"internal_error: {_brief(exc)}"})
            continue
        _send(out, {"done": True, "clips": sent})


class IsolatedDecoder:
    """Decode videos in one long-lived child process that is killed on timeout and replaced on crash.

    with IsolatedDecoder(spec) as decoder:
        for rows, error in decoder.decode_chunks("video.mp4", chunk_clips=8):
            ...  # rows: up to 8 clip rows, in clip order; error: None, or {source, stage, reason}
        rows, error = decoder.decode("short.mp4")  # the same, all clips of the video at once

    With decode_chunks neither process holds more than about one chunk of clips, whatever the
    video's length. The child is also restarted every `recycle_after` videos, since native decoders
    leak (decord#208). One call at a time: not thread-safe.
    """

    def __init__(self, spec: ClipSpec, *, recycle_after: int = 500, startup_timeout_s: float = 60.0):
        self.spec = spec
        self.recycle_after = recycle_after
        self.startup_timeout_s = startup_timeout_s
        self._proc: subprocess.Popen | None = None
        self._served = 0

    def __enter__(self) -> IsolatedDecoder:
        self._ensure_worker()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        """The current child's pid (None while no child runs)."""
        return self._proc.pid if self._proc else None

    def decode_chunks(self, source: str, *, open_file: Callable[[str], str] | None = None,
                      chunk_clips: int = 8) -> Iterator[tuple[list[dict], dict | None]]:
        """Stream one video's clips: yields (rows, None) per chunk, then at most one ([], error_row).

        Each chunk holds 1..chunk_clips rows (as decode_clips makes them), in clip_index order, sent
        by the child as soon as they are decoded. Every row carries num_clips, the number of windows
        planned for the video before decoding began; clip indices of damaged clips that were
        dropped never arrive, so fewer than num_clips rows may come without an error.

        A failure yields one error row, as the last item, and never raises for a bad video. It can
        come after chunks: a video that times out or crashes the decoder part way through has
        already delivered its first clips, which are valid; the caller keeps them (or not) and
        records the error. The timeout (spec.decode_timeout_s) applies to each message, so a long
        video is not cut off while it makes progress, and a hang is killed within the timeout.

        open_file runs here in the parent (downloads need no isolation); the child decodes the
        path. Leaving the generator early (break, close) kills the child mid-stream; the next call
        starts a fresh one.
        """
        if not isinstance(chunk_clips, int) or chunk_clips < 1:
            raise ValueError(f"chunk_clips must be a positive int, got {chunk_clips!r}")
        try:
            path = open_file(source) if open_file else source
        except Exception as exc:
            yield [], error_row(source, f"open_failed: {_brief(exc)}", stage="open")
            return
        self._ensure_worker()
        request = {"source": source, "path": os.fspath(path), "spec": dataclasses.asdict(self.spec),
                   "chunk_clips": chunk_clips}
        received, finished = 0, False
        try:
            try:
                _send(self._proc.stdin, request)
                while True:
                    # The clock starts when we ask for the next message, so time the caller spends
                    # on a chunk (the child waits on the full pipe meanwhile) does not count.
                    header, frames = self._receive(time.monotonic() + self.spec.decode_timeout_s)
                    if "rows" not in header:
                        break
                    rows = [{**meta, FRAMES: clip} for meta, clip in zip(header["rows"], frames)]
                    received += len(rows)
                    del header, frames
                    yield rows, None
                    del rows
            except TimeoutError:
                finished = True
                self._stop(kill=True)
                limit = f"{self.spec.decode_timeout_s:g} s"
                yield [], error_row(source, f"timeout: no progress for {limit} after {received} clips"
                                    if received else f"timeout: no result after {limit}")
                return
            except (EOFError, BrokenPipeError):
                finished = True
                yield [], error_row(source, f"decoder_crashed: {self._reap()}"
                                    + (f" after {received} clips" if received else ""))
                return
            finished = True
            self._served += 1
            if self._served >= self.recycle_after:
                self._stop(kill=False)
            if "error" in header:
                yield [], error_row(source, header["error"])
            elif header.get("clips") != received:
                yield [], error_row(source, f"internal_error: child sent {received} clips, said {header}")
        finally:
            if not finished:  # the caller left mid-video: the child is still streaming, out of step
                self._stop(kill=True)

    def decode(self, source: str, *,
               open_file: Callable[[str], str] | None = None) -> tuple[list[dict], dict | None]:
        """All clip rows of one video and None, or the rows decoded before a failure and an error row.

        Built on decode_chunks; holds the whole video's clips, so prefer decode_chunks for long
        videos. Never raises for a bad video: a file that fails at once gives ([], error).
        """
        rows, error = [], None
        for chunk, error in self.decode_chunks(source, open_file=open_file, chunk_clips=64):  # noqa: B007 - the last error is the answer
            rows.extend(chunk)
        return rows, error

    def close(self) -> None:
        """Stop the child (it exits when its stdin closes)."""
        self._stop(kill=False)

    def _ensure_worker(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            return
        # -m finds this package wherever the caller runs (a Ray worker's cwd is not the repo).
        python_path = os.pathsep.join(filter(None, [_PROJECT_ROOT, os.environ.get("PYTHONPATH")]))
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "pipelines.video_io", "--serve"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0, close_fds=True,
            env=dict(os.environ, PYTHONPATH=python_path),
        )
        self._served = 0
        try:
            header, _ = self._receive(time.monotonic() + self.startup_timeout_s)
        except (TimeoutError, EOFError):
            self._stop(kill=True)
            raise RuntimeError("video decode worker did not start; see its stderr above") from None
        if header != {"ready": True}:
            raise RuntimeError(f"video decode worker sent {header} instead of ready")

    def _receive(self, deadline: float) -> tuple[dict, np.ndarray | None]:
        """One message from the child: (header, frames [C, T, H, W, 3] or None)."""
        fd = self._proc.stdout.fileno()
        length = bytearray(_LENGTH.size)
        _read_into(fd, memoryview(length), deadline)
        data = bytearray(_LENGTH.unpack(length)[0])
        _read_into(fd, memoryview(data), deadline)
        header = json.loads(data)
        if "shape" not in header:
            return header, None
        frames = np.empty(header["shape"], np.uint8)
        _read_into(fd, memoryview(frames).cast("B"), deadline)
        return header, frames

    def _reap(self) -> str:
        """Wait for a child whose pipe closed; describe how it died."""
        try:
            code = self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._stop(kill=True)
            return "closed its pipe and was killed"
        self._stop(kill=False)
        if code < 0:
            return f"signal {-code} ({signal.Signals(-code).name})"
        return f"exit code {code}"

    def _stop(self, *, kill: bool) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if kill:
            proc.kill()  # SIGKILL: a decord hang holds the GIL, so nothing gentler works
        proc.stdin.close()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def decode_clips_isolated(source: str, spec: ClipSpec, *,
                          open_file: Callable[[str], str] | None = None) -> tuple[list[dict], dict | None]:
    """decode_clips in a fresh child process; for many videos keep one IsolatedDecoder instead."""
    with IsolatedDecoder(spec) as decoder:
        return decoder.decode(source, open_file=open_file)


if __name__ == "__main__":
    if sys.argv[1:] != ["--serve"]:
        sys.exit("usage: python -m pipelines.video_io --serve  (IsolatedDecoder's worker, on stdin/stdout)")
    _serve()
