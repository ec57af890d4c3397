"""Videos -> content and motion latents in Parquet, with Ray Data (streaming).

Steps:
1. check    inputs, models and output before any Ray work (one readable line on failure)
2. plan     list the videos; skip those already written or already known bad (resume), all in
            Arrow tables: the driver holds no Python object per video (10 M videos fit)
3. decode   decode tasks, each keeping one killable decoder process: a video -> N clip rows
4. encode   EncodeToSinks actors (pipelines.data.latent_encoder): [SD VAE per frame] -> autoencoder
            encoder (GPU when present), rows handed straight to a sink
5. write    ShardSink actors on the driver's node (as many as the encoders need, see writer_count): atomic Parquet
            shards of rows_per_shard rows or flush_seconds of output, whichever comes first, and
            the errors batched the same way: a bounded number of files whatever the failure rate
6. report   summary.json: videos seen, clips written, failures by reason, seconds, clips/s; and
            report.json + report.html (pipelines.data.report): what the whole output holds

A rerun on the same output decodes only videos with missing clips and writes only those
clips, so a job killed at any point finishes with no duplicates; `overwrite=True` starts over.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from cmd_model.presets import PRESETS, Preset, get_preset
from pipelines.data import latent_shards as shards
from pipelines.data.decode_stage import SKIP_CLIPS, decode_stage, plan_blocks  # noqa: F401 - plan_blocks: benchmarks, tests
from pipelines.data.report import write_report
from pipelines.data.shard_sink import ShardSink
from pipelines.data.sources import source_table
from pipelines.data.video.schema import (
    REASON,
    SOURCE,
    ClipSpec,
    make_video_id,
)
from pipelines.platform import storage
from pipelines.platform.cluster import dataset_of_tables, ensure_ray
from pipelines.platform.errors import ConfigError
from pipelines.platform.flags import flag
from pipelines.platform.model_store import (
    REMOTE,
    ModelNotFound,
    autoencoder_mismatch,
    check_stable_diffusion,
    fetch_model,
    for_every_node,
    is_hub_id,
    model_digest,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrecomputeConfig:
    """What a precompute job was asked to do; jobs/precompute_latents.py's flags are these fields (platform.flags)."""

    input: str = flag(help="video folder, s3:// prefix, or CSV/Parquet manifest with a path column")
    output: str = flag(help="output folder or s3:// prefix")
    autoencoder: str = flag(help="save_pretrained folder, s3:// prefix or MLflow runs:/ URI")
    preset: Preset = flag(choices=tuple(PRESETS), convert=get_preset, help="model preset (cmd_model.presets.PRESETS)")
    # Latent mode: the SD folder whose VAE makes frame latents.
    stable_diffusion: str | None = flag(
        None,
        name="--vae",
        aliases=("--stable-diffusion",),
        help="latent mode: Stable Diffusion folder (diffusers layout) or hub id",
    )
    clips_per_video: int | None = flag(None, help="N evenly spaced clips per video (default: all non-overlapping)")
    frame_stride: int | None = flag(None, help="take every k-th source frame (default: the preset's)")
    target_fps: float | None = flag(None, help="sample frames at this rate instead of a fixed stride")
    # A clip that straddles a shot change teaches the motion model a jump no camera makes.
    scene_cuts: str = flag(
        "on", choices=("on", "off"), help="cut clips only inside shots (hard cuts found by PySceneDetect)"
    )
    scene_cut_threshold: float = flag(
        3.0, help="a frame is a cut when its change is this many times its neighbours' (AdaptiveDetector)"
    )
    min_motion: float | None = flag(
        None, help="drop clips whose motion score (mean abs frame difference, 0-255) is below this"
    )
    labels: str | None = flag(None, choices=("folder",), help="class labels from folder names (UCF-101 layout)")
    overwrite: bool = flag(False, help="delete what the output holds and start over")
    encode_batch_size: int = flag(16, help="clips per encoder batch")
    rows_per_shard: int = flag(1024, help="clips per Parquet shard")
    # A shard (and an errors file) is written at least this often: progress shows early.
    flush_seconds: float = flag(10.0, help="a shard is also written after this long, full or not")
    decode_timeout_s: float = flag(120.0, name="--decode-timeout", help="seconds before a video's decoder is killed")
    decoders: int | None = flag(None, help="decode actors (default: the cluster's free CPUs minus what encoding needs)")
    writers: int | None = flag(None, help="shard-writing actors (default: 1 per 16 encoders)")
    # On a cluster that scales from zero nothing is up when the job starts: say how many encoders
    # and decoders to ask for, and the autoscaler adds the nodes.
    use_gpu: bool = flag(False, help="each encoder on a GPU (default: on when the cluster has GPUs up)")
    encoders: int | None = flag(None, help="encoder actors (default: one per GPU up now, else 1)")

    def __post_init__(self):
        for name in (
            "clips_per_video",
            "frame_stride",
            "encode_batch_size",
            "rows_per_shard",
            "decoders",
            "writers",
            "encoders",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        if not self.flush_seconds > 0:
            raise ConfigError(f"--flush-seconds must be > 0, got {self.flush_seconds}")
        if self.scene_cuts not in ("on", "off"):
            raise ConfigError(f"--scene-cuts must be on or off, got {self.scene_cuts!r}")
        if not self.scene_cut_threshold > 0:
            raise ConfigError(f"--scene-cut-threshold must be > 0, got {self.scene_cut_threshold}")
        if self.min_motion is not None and not self.min_motion >= 0:
            raise ConfigError(f"--min-motion must be >= 0, got {self.min_motion}")

    def clip_spec(self) -> ClipSpec:
        return ClipSpec.for_preset(
            self.preset,
            frame_stride=self.frame_stride,
            target_fps=self.target_fps,
            clips_per_video=self.clips_per_video,
            decode_timeout_s=self.decode_timeout_s,
            scene_cuts=self.scene_cuts == "on",
            scene_cut_threshold=self.scene_cut_threshold,
            min_motion=self.min_motion,
        )


# ---------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------


def check_config(cfg: PrecomputeConfig) -> dict:
    """Validate everything that can be checked without Ray; return the output manifest."""
    storage.check_readable(cfg.input, "input")
    try:
        ae_dir = fetch_model(cfg.autoencoder)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    mismatch = autoencoder_mismatch(ae_dir, cfg.preset.autoencoder)
    if mismatch:
        raise ConfigError(
            f"autoencoder {cfg.autoencoder} does not match preset {cfg.preset.name}: " + ", ".join(mismatch)
        )
    vae_identity = "none (pixel mode)"
    if cfg.preset.mode == "latent":
        vae_identity = check_vae(cfg.stable_diffusion or cfg.preset.stable_diffusion, cfg.preset.name)
    storage.check_writable(cfg.output, "output")
    spec = cfg.clip_spec()
    return {
        "schema_version": shards.SCHEMA_VERSION,
        "autoencoder_digest": model_digest(ae_dir),
        "autoencoder": cfg.autoencoder,
        "vae": vae_identity,
        "preset": cfg.preset.name,
        "mode": cfg.preset.mode,
        "clip_sampling": json.dumps(spec.sampling_key(), sort_keys=True),
        "content_shape": json.dumps(list(cfg.preset.content_shape)),
        "motion_shape": json.dumps(list(cfg.preset.motion_shape)),
    }


def check_vae(sd: str | None, preset_name: str) -> str:
    """The VAE's identity for the manifest: a local folder with its weight digest, else the
    s3:// or MLflow folder or hub id, checked so that every encoder can load it."""
    if sd is None:
        raise ConfigError(f"preset {preset_name} works on SD latents: pass --vae DIR (a Stable Diffusion folder)")
    if not sd.startswith(REMOTE):
        for vae_dir in (storage.join(sd, "vae"), sd):
            if storage.exists(storage.join(vae_dir, "config.json")):
                return f"{vae_dir}#{model_digest(vae_dir)}"
        if not is_hub_id(sd):
            raise ConfigError(f"no Stable Diffusion VAE at {sd} (expected a diffusers folder with vae/config.json)")
    elif storage.is_s3(sd) and storage.exists(storage.join(sd, "config.json")):
        return sd  # an s3:// VAE folder of its own
    try:
        check_stable_diffusion(sd, parts=("vae",))
    except ModelNotFound as exc:
        raise ConfigError(str(exc)) from None
    return sd


def ship_inputs(cfg: PrecomputeConfig, say=print) -> PrecomputeConfig:
    """Nodes share nothing but storage: with --output on s3://, a local autoencoder or SD folder
    is sent to <output>/inputs/ once, and every encoder reads it from its node's model cache."""
    to = storage.join(cfg.output, "inputs")
    return dataclasses.replace(
        cfg,
        autoencoder=for_every_node(cfg.autoencoder, cfg.output, to, "--autoencoder", say),
        stable_diffusion=for_every_node(cfg.stable_diffusion, cfg.output, to, "--vae", say),
    )


def guard_output(cfg: PrecomputeConfig, manifest: dict) -> None:
    """Never append latents of another autoencoder, preset or sampling to an existing output."""
    if cfg.overwrite:
        for sub in (
            shards.LATENTS_DIR,
            shards.ERRORS_DIR,
            shards.VIDEOS_DIR,
            shards.MANIFEST,
            shards.SUMMARY,
            shards.REPORT_JSON,
            shards.REPORT_HTML,
        ):
            storage.remove(storage.join(cfg.output, sub), recursive=True)
    existing = shards.read_manifest(cfg.output)
    if existing is None:
        shards.write_manifest(cfg.output, manifest)
        return
    keys = ("schema_version", "autoencoder_digest", "vae", "preset", "clip_sampling")
    different = [k for k in keys if existing.get(k) != manifest[k]]
    if different:
        k = different[0]
        raise ConfigError(
            f"{cfg.output} already holds latents with {k}={existing.get(k)!r}, not {manifest[k]!r}; "
            "write to a new output or pass --overwrite"
        )


def video_numbers(sources: pa.ChunkedArray) -> np.ndarray:
    """make_video_id of every source as uint64 (shards.id_numbers): 8 bytes a source, no string column."""
    return np.fromiter(
        (int(make_video_id(s), 16) for chunk in sources.chunks for s in chunk.to_pylist()),
        dtype=np.uint64,
        count=len(sources),
    )


def plan(cfg: PrecomputeConfig) -> tuple[pa.Table, int]:
    """Videos still to process (source, caption, label, skip_clips) and how many were found in all.

    Vectorised passes throughout: the sources as an Arrow table, video ids as uint64, and the
    written index (sorted by video) searched with numpy, so the cost grows linearly with the
    sources and the written clips (benchmarks/precompute_scale.py measures it).
    """
    sources = source_table(cfg.input, labels=cfg.labels)
    numbers = video_numbers(sources.column(SOURCE))
    written = shards.written_index(cfg.output)
    known = written.column(shards.VIDEO_NUMBER).to_numpy()
    at = np.minimum(np.searchsorted(known, numbers), max(len(known) - 1, 0))
    found = (known[at] == numbers) if len(known) else np.zeros(len(numbers), bool)
    done, planned = written.column(shards.DONE).to_numpy(), written.column(shards.PLANNED).to_numpy()
    # planned < 0: no written row knows the video's count yet (its run stopped before the video's end)
    whole = found & (planned[at] >= 0) & (done[at] >= planned[at]) if len(known) else found
    failed = pc.is_in(sources.column(SOURCE), value_set=shards.failed_sources(cfg.output)).to_numpy(
        zero_copy_only=False
    )
    keep = ~(whole | failed)
    todo = sources.filter(pa.array(keep))
    # Videos cut short by a killed run: their written clips are skipped (JSON text, not a list
    # column: Ray Data turns ragged lists into tensors of objects). Few, so Python is fine.
    skip = np.full(todo.num_rows, "[]", dtype=object)
    cut_short = np.flatnonzero((found & ~whole)[keep])
    if len(cut_short):
        lists = written.column(shards.INDICES)
        for row, index in zip(cut_short, at[keep][cut_short]):
            skip[row] = json.dumps(sorted(lists[int(index)].as_py()))
    return todo.append_column(SKIP_CLIPS, pa.array(skip, pa.string())), sources.num_rows


# One sink writes ~140 MB/s of 512x1024 latents (90 KB a clip: ~1,500 clips/s) to local disk on
# 2 cores (benchmarks/precompute_scale.py; docs/performance.md, "Scaling precompute"); S3 PUTs are
# slower per stream, so count on a third of that. One GPU encoder (SD VAE over 16 frames at
# 512x1024, then the autoencoder) makes a few clips/s: 16 of them stay under a tenth of one
# sink's rate, so writing never limits encoding. A 64-GPU cluster gets 4 sinks.
ENCODERS_PER_WRITER = 16


def writer_count(encoders: int) -> int:
    """Sinks for this many encoders: 1 up to 16 encoders, 4 for a 64-GPU cluster."""
    return max(1, math.ceil(encoders / ENCODERS_PER_WRITER))


def actor_counts(
    num_decoders: int | None,
    num_writers: int | None = None,
    *,
    use_gpu: bool = False,
    encoders: int | None = None,
    preset: Preset | None = None,
) -> dict:
    """Actor counts: the flags, else from what the cluster has up now (one encoder per GPU, or one
    on CPU; decoders on the remaining CPUs). Raises ConfigError, before any actor starts, where
    the cluster has nothing up to size from or a GPU preset would encode on a CPU.

    The counts leave cores for the encoder's and the sinks' work, but on a CPU-only cluster they
    ask Ray for no CPU: an actor holds what it asks for all job long, and a node lost mid-job must
    leave a whole CPU for the decode tasks Ray runs again on a surviving node (with a one-CPU
    survivor, an encoder holding half of it stalled the job for good).
    """
    from pipelines.platform.cluster import nothing_up, resources_now

    gpus_now, cpus = resources_now()
    gpus = use_gpu or gpus_now > 0
    if gpus and encoders is None and gpus_now == 0:
        raise ConfigError(nothing_up("GPU", "--encoders N (one GPU each)", "--use-gpu, and the cluster"))
    if preset is not None and preset.needs_gpu and not gpus:
        raise ConfigError(
            f"preset {preset.name} encodes through Stable Diffusion's VAE at {preset.resolution}: "
            "pass --use-gpu and --encoders N (no GPU is up on this cluster)"
        )
    encoders = encoders or max(gpus_now, 1)
    writers = num_writers or writer_count(encoders)
    # On CPU the encoder takes about half a core (torch shares the machine with the decoders); on
    # GPU it asks for one core to feed the GPU. Sinks mostly wait on storage: a quarter of a core.
    free = int(cpus - encoders * (1.0 if gpus else 0.5) - writers * 0.25)
    if num_decoders is None and cpus < 1:
        raise ConfigError(nothing_up("CPU", "--decoders N"))
    decoders = num_decoders or max(1, free)
    return dict(
        gpus=int(gpus), encoders=encoders, encoder_cpus=1.0 if gpus else 0.0, decoders=decoders, writers=writers
    )


def make_sinks(cfg: PrecomputeConfig, manifest: dict, res: dict, env: dict) -> list:
    """The ShardSink actors, on the driver's node: a worker node lost mid-job takes no held rows with it."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    sink = ray.remote(ShardSink).options(num_cpus=0, scheduling_strategy=here, **env)
    return [
        sink.remote(
            cfg.output,
            cfg.preset.content_shape,
            cfg.preset.motion_shape,
            manifest,
            cfg.rows_per_shard,
            cfg.flush_seconds,
        )
        for _ in range(res["writers"])
    ]


def build_dataset(cfg: PrecomputeConfig, todo: pa.Table, sinks: list, res: dict, env: dict):
    """plan blocks -> decode tasks -> encoder actors that hand rows to the sinks; yields clip counts."""
    from ray.data import ActorPoolStrategy

    from pipelines.data.latent_encoder import EncodeToSinks

    ds = dataset_of_tables(plan_blocks(todo, res["decoders"]))
    ds = decode_stage(ds, cfg.clip_spec(), res["decoders"], cfg.output, error_sink=sinks[0], env=env)
    return ds.map_batches(
        EncodeToSinks,
        fn_constructor_kwargs=dict(
            sinks=sinks,
            preset=cfg.preset,
            autoencoder=cfg.autoencoder,
            stable_diffusion=cfg.stable_diffusion or cfg.preset.stable_diffusion,
        ),
        batch_size=cfg.encode_batch_size,  # explicit int: required with num_gpus; sized to fill a GPU at 512^2
        compute=ActorPoolStrategy(size=res["encoders"]),  # models load once per actor
        num_gpus=1 if res["gpus"] else 0,
        num_cpus=res["encoder_cpus"],
        memory=int(2 * 2**30),  # model weights + one batch of frames and activations on the host
        **env,
    )


def run(cfg: PrecomputeConfig) -> dict:
    """The whole job; returns (and writes) the summary."""
    start = time.monotonic()
    manifest = check_config(cfg)
    guard_output(cfg, manifest)
    todo, seen = plan(cfg)
    written = 0
    if todo.num_rows:
        import ray

        ensure_ray()  # the S3 settings reach every worker
        cfg = ship_inputs(cfg)
        # Workers read and write S3 with the settings the driver was given (flags or AWS_* variables);
        # on a cloud cluster these are usually empty and the instance role supplies credentials.
        env = {"runtime_env": {"env_vars": storage.s3_env_vars()}} if storage.s3_env_vars() else {}
        res = actor_counts(cfg.decoders, cfg.writers, use_gpu=cfg.use_gpu, encoders=cfg.encoders, preset=cfg.preset)
        sinks = make_sinks(cfg, manifest, res, env)
        try:
            for _ in build_dataset(cfg, todo, sinks, res, env).iter_batches(batch_size=None):
                pass
            written = sum(ray.get([sink.flush.remote() for sink in sinks]))
        except Exception:
            # A sink that ran out of space says so; the error Ray Data raises here holds it only as
            # traceback text (Ray wraps the actor's error, then the map task's, and drops causes).
            full = next((f for f in ray.get([sink.disk_full.remote() for sink in sinks]) if f), None)
            if full is None:
                raise
            raise storage.StorageFull(full) from None  # one line, not three tracebacks
        finally:
            for sink in sinks:
                ray.kill(sink)
    seconds = time.monotonic() - start
    all_errors = shards.read_errors(cfg.output)
    reasons = Counter(r.split(":")[0] for r in all_errors.column(REASON).to_pylist())
    index = shards.written_index(cfg.output)
    summary = {
        "videos_seen": seen,
        "videos_processed_this_run": todo.num_rows,
        "videos_with_latents": index.num_rows,
        "videos_failed": all_errors.num_rows,
        "clips_written_this_run": written,
        "clips_total": int(pc.sum(index.column(shards.DONE)).as_py() or 0),
        "failures_by_reason": dict(reasons),
        "seconds": round(seconds, 2),
        "clips_per_second": round(written / seconds, 3) if seconds > 0 else 0.0,
        "output": cfg.output,
    }
    # Over the whole output, not this run alone: a rerun that finished a few videos reports all of them.
    data_report = write_report(cfg.output, videos_in=seen, min_motion=cfg.min_motion)
    summary["report"] = {
        "json": storage.join(cfg.output, shards.REPORT_JSON),
        "html": storage.join(cfg.output, shards.REPORT_HTML),
        "shots": data_report["shots"]["total"],
        "static_clips": data_report["static_clips"]["count"],
    }
    storage.write_text(storage.join(cfg.output, shards.SUMMARY), json.dumps(summary, indent=2))
    return summary
