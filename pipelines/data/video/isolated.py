"""Step 4: decode in a long-lived, killable child process (`python -m pipelines.data.video.isolated --serve`).

decord can hang while holding the GIL (decord#373) or segfault (decord#25, #229): a hang is killed
at the timeout and a crash only costs the child, which is replaced on the next call.
"""

from __future__ import annotations

import dataclasses
import json
import os
import select
import signal
import struct
import subprocess
import sys
import time
from typing import Callable, Iterator

import numpy as np

from pipelines.data.video.decode import decode_chunks
from pipelines.data.video.schema import FRAMES, ClipSpec, VideoError, brief, error_row

# ---------------------------------------------------------------------------------------------
# Isolation: a killable child process speaking a length-prefixed protocol on stdin/stdout
# ---------------------------------------------------------------------------------------------
# Message: 8-byte big-endian length, then that many bytes of JSON. Per request the child sends
# zero or more chunk messages, {"rows": [clip metadata], "shape": [C, T, H, W, 3]} followed by the
# chunk's frames as raw uint8 bytes, then exactly one final message: {"done": true, "clips": n} or
# {"error": reason}, each with "video": what decode_chunks learnt of the video (its stats: size,
# fps, shots, static clips) or null. The pipe is the backpressure: a child that is ahead of its parent blocks on
# write, holding one chunk. subprocess rather than multiprocessing: it works the same inside Ray
# workers and never pickles.

_LENGTH = struct.Struct(">Q")
_PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


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
        sent, stats = 0, {}
        try:
            for rows in decode_chunks(
                request["path"], request["source"], ClipSpec(**request["spec"]), request["chunk_clips"], stats
            ):
                frames = [row.pop(FRAMES) for row in rows]
                _send(out, {"rows": rows, "shape": [len(frames), *frames[0].shape]}, frames)
                sent += len(rows)
                del rows, frames  # hold one chunk, not two, while the next is decoded
        except VideoError as exc:
            _send(out, {"error": str(exc), "video": stats or None})
            continue
        except Exception as exc:  # a bug must become an error row, not end the worker
            _send(out, {"error": f"internal_error: {brief(exc)}", "video": None})
            continue
        _send(out, {"done": True, "clips": sent, "video": stats})


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
        # What the child learnt of the last video it finished or failed on (decode_chunks' stats),
        # None after a timeout or crash; the data report is built from these.
        self.last_video: dict | None = None

    def __enter__(self) -> IsolatedDecoder:
        self._ensure_worker()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    @property
    def pid(self) -> int | None:
        """The current child's pid (None while no child runs)."""
        return self._proc.pid if self._proc else None

    def decode_chunks(
        self, source: str, *, open_file: Callable[[str], str] | None = None, chunk_clips: int = 8
    ) -> Iterator[tuple[list[dict], dict | None]]:
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
        self.last_video = None
        try:
            path = open_file(source) if open_file else source
        except Exception as exc:
            yield [], error_row(source, f"open_failed: {brief(exc)}", stage="open")
            return
        self._ensure_worker()
        request = {
            "source": source,
            "path": os.fspath(path),
            "spec": dataclasses.asdict(self.spec),
            "chunk_clips": chunk_clips,
        }
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
                yield (
                    [],
                    error_row(
                        source,
                        f"timeout: no progress for {limit} after {received} clips"
                        if received
                        else f"timeout: no result after {limit}",
                    ),
                )
                return
            except (EOFError, BrokenPipeError):
                finished = True
                yield (
                    [],
                    error_row(
                        source, f"decoder_crashed: {self._reap()}" + (f" after {received} clips" if received else "")
                    ),
                )
                return
            finished = True
            self.last_video = header.get("video")
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

    def decode(self, source: str, *, open_file: Callable[[str], str] | None = None) -> tuple[list[dict], dict | None]:
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
            [sys.executable, "-m", "pipelines.data.video.isolated", "--serve"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
            close_fds=True,
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


def decode_clips_isolated(
    source: str, spec: ClipSpec, *, open_file: Callable[[str], str] | None = None
) -> tuple[list[dict], dict | None]:
    """decode_clips in a fresh child process; for many videos keep one IsolatedDecoder instead."""
    with IsolatedDecoder(spec) as decoder:
        return decoder.decode(source, open_file=open_file)


if __name__ == "__main__":
    if sys.argv[1:] != ["--serve"]:
        sys.exit("usage: python -m pipelines.data.video.isolated --serve  (IsolatedDecoder's worker, on stdin/stdout)")
    _serve()
