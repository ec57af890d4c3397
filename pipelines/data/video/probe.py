"""Step 1: what the container header says (PyAV); files that are not videos are rejected here."""

from __future__ import annotations

import os
import stat

import av

from pipelines.data.video.schema import VideoError, brief

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
        raise VideoError(_unopenable_reason(path), brief(exc)) from None
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
