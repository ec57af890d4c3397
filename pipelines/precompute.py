"""Videos -> content and motion latents in Parquet, with Ray Data (streaming).

Steps:
1. check    inputs, models and output before any Ray work (one readable line on failure)
2. plan     list the videos; skip those already written or already known bad (resume)
3. decode   DecodeClips actors: one killable decoder process each; a video -> N clip rows
4. encode   EncodeLatents actors (pipelines.latent_encoder): [SD VAE per frame] -> autoencoder encoder (GPU when present)
5. write    ShardWriter tasks: one atomic Parquet shard per batch, metadata in every file
6. report   summary.json: videos seen, clips written, failures by reason, seconds, clips/s

A rerun on the same output decodes only videos with missing clips and writes only those
clips, so a job killed at any point finishes with no duplicates; `overwrite=True` starts over.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np

from cmd_model.presets import Preset
from pipelines import latent_shards as shards
from pipelines import storage
from pipelines.model_store import localize, model_config, model_digest
from pipelines.sources import list_sources
from pipelines.video_io import (
    CAPTION, CLIP_INDEX, FPS, FRAME_STRIDE, FRAMES, LABEL, NUM_CLIPS, REASON, SOURCE, START_FRAME, VIDEO_ID,
    ClipSpec, IsolatedDecoder, make_video_id,
)

log = logging.getLogger(__name__)
SKIP_CLIPS = "skip_clips"  # clip indices a previous run already wrote for this video


class ConfigError(ValueError):
    """A wrong flag, path or model, reported in one line before any cluster work."""


@dataclass(frozen=True)
class PrecomputeConfig:
    input: str
    output: str
    autoencoder: str
    preset: Preset
    stable_diffusion: str | None = None  # latent mode: the SD folder whose VAE makes frame latents
    clips_per_video: int | None = None
    frame_stride: int | None = None
    target_fps: float | None = None
    labels: str | None = None  # "folder": class index from the parent folder (UCF-101 layout)
    overwrite: bool = False
    encode_batch_size: int = 16
    rows_per_shard: int = 1024
    decode_timeout_s: float = 120.0
    decoders: int | None = None  # decode actors; default: the cluster's CPUs minus what encoding needs

    def clip_spec(self) -> ClipSpec:
        h, w = self.preset.video_size
        clips = self.preset.clips
        return ClipSpec(
            height=h, width=w, num_frames=clips.num_frames,
            frame_stride=self.frame_stride or clips.frame_stride, target_fps=self.target_fps,
            clips_per_video=self.clips_per_video or clips.clips_per_video, decode_timeout_s=self.decode_timeout_s,
        )


# ---------------------------------------------------------------------------------------
# Stages: callable classes, so the same code runs in a Ray actor, a test or a notebook
# ---------------------------------------------------------------------------------------


class DecodeClips:
    """Batch of videos (source, caption, label, skip_clips) -> clip rows; failures go to OUTPUT/errors."""

    def __init__(self, spec: ClipSpec, output: str):
        self.spec, self.output = spec, output
        self.decoder = IsolatedDecoder(spec)

    def __call__(self, batch: dict[str, np.ndarray]):
        for i, source in enumerate(batch[SOURCE]):
            skip = set(json.loads(batch[SKIP_CLIPS][i]))
            with storage.local_copy(source) as path:
                # Yield per chunk of a few clips, as the decoder streams them: memory stays the same
                # for a 10-second or a 2-hour video (ray#32746). A video that fails part way keeps
                # the clips already yielded and gets an error row (a rerun then skips it).
                for rows, error in self.decoder.decode_chunks(source, open_file=lambda _: path):
                    if error:
                        shards.write_errors([error], self.output)
                        continue
                    keep = [r for r in rows if r[CLIP_INDEX] not in skip]
                    if keep:
                        yield clip_batch(keep, rows[0][NUM_CLIPS], batch[CAPTION][i], batch[LABEL][i])

    def __del__(self):
        self.decoder.close()


def clip_batch(rows: list[dict], num_clips: int, caption, label) -> dict[str, np.ndarray]:
    n = len(rows)
    return {
        VIDEO_ID: np.array([r[VIDEO_ID] for r in rows], dtype=object),
        SOURCE: np.array([r[SOURCE] for r in rows], dtype=object),
        CLIP_INDEX: np.array([r[CLIP_INDEX] for r in rows], dtype=np.int32),
        shards.NUM_CLIPS: np.full(n, num_clips, dtype=np.int32),
        START_FRAME: np.array([r[START_FRAME] for r in rows], dtype=np.int32),
        FRAME_STRIDE: np.array([r[FRAME_STRIDE] for r in rows], dtype=np.int32),
        FPS: np.array([r[FPS] for r in rows], dtype=np.float32),
        CAPTION: np.array([caption] * n, dtype=object),
        LABEL: np.array([-1 if label is None or label != label else int(label)] * n, dtype=np.int32),
        FRAMES: np.stack([r[FRAMES] for r in rows]),  # uint8 [N, L, H, W, 3]
    }


class ShardWriter:
    """Latent rows -> one atomic Parquet shard under OUTPUT/latents; returns {shard, rows}."""

    def __init__(self, output: str, content_shape, motion_shape, metadata: dict):
        self.directory = storage.join(output, shards.LATENTS_DIR)
        self.schema = shards.latent_schema(content_shape, motion_shape, metadata)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch[LABEL] = np.where(batch[LABEL] < 0, None, batch[LABEL]).astype(object)
        path = shards.write_atomic(shards.latent_table(batch, self.schema), self.directory)
        return {"shard": np.array([path], dtype=object), "rows": np.array([len(batch[VIDEO_ID])])}


# ---------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------


def check_config(cfg: PrecomputeConfig) -> dict:
    """Validate everything that can be checked without Ray; return the output manifest."""
    storage.check_readable(cfg.input, "input")
    try:
        ae_dir = localize(cfg.autoencoder)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    ae = model_config(ae_dir)
    want = dataclasses.asdict(cfg.preset.autoencoder)
    mismatch = [k for k in ("in_channels", "num_frames", "height", "width", "patch_size", "motion_channels") if ae.get(k) != want[k]]
    if mismatch:
        raise ConfigError(
            f"autoencoder {cfg.autoencoder} does not match preset {cfg.preset.name}: "
            + ", ".join(f"{k}={ae.get(k)} (preset {want[k]})" for k in mismatch)
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
        "clip_sampling": json.dumps({k: v for k, v in dataclasses.asdict(spec).items() if k != "decode_timeout_s"}, sort_keys=True),
        "content_shape": json.dumps(list(cfg.preset.content_shape)),
        "motion_shape": json.dumps(list(cfg.preset.motion_shape)),
    }


def check_vae(sd: str | None, preset_name: str) -> str:
    """The VAE's identity for the manifest: its folder and weight digest, or a hub id."""
    if sd is None:
        raise ConfigError(f"preset {preset_name} works on SD latents: pass --vae DIR (a Stable Diffusion folder)")
    for vae_dir in (storage.join(sd, "vae"), sd):
        if storage.exists(storage.join(vae_dir, "config.json")) and "://" not in sd:
            return f"{vae_dir}#{model_digest(vae_dir)}"
    if "://" not in sd and not sd.startswith((".", "/")) and sd.count("/") == 1:
        return sd  # a hub id, resolved by diffusers where the cluster has network
    raise ConfigError(f"no Stable Diffusion VAE at {sd} (expected a diffusers folder with vae/config.json)")


def guard_output(cfg: PrecomputeConfig, manifest: dict) -> None:
    """Never append latents of another autoencoder, preset or sampling to an existing output."""
    if cfg.overwrite:
        for sub in (shards.LATENTS_DIR, shards.ERRORS_DIR, shards.MANIFEST, shards.SUMMARY):
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


def plan(cfg: PrecomputeConfig) -> tuple[list[dict], int]:
    """Videos still to process (with clips to skip), and how many were found in all."""
    sources = list_sources(cfg.input, labels=cfg.labels)
    written, planned = shards.written_clips(cfg.output)
    bad = shards.failed_sources(cfg.output)
    todo = []
    for src in sources:
        vid = make_video_id(src[SOURCE])
        done = written.get(vid, set())
        if src[SOURCE] in bad or (done and len(done) >= planned.get(vid, 0)):
            continue
        # JSON text, not a list column: Ray Data turns ragged lists into tensors of objects.
        todo.append({**src, SKIP_CLIPS: json.dumps(sorted(done))})
    return todo, len(sources)


def _resources(num_decoders: int | None) -> dict:
    """Actor counts from the cluster: one encoder per GPU (or one on CPU), decoders on the remaining CPUs."""
    import ray

    total = ray.cluster_resources()
    gpus, cpus = int(total.get("GPU", 0)), total.get("CPU", 1)
    encoders = max(gpus, 1)
    # On CPU the encoder takes half a core slot: it shares the machine with decoders, and torch
    # uses its own threads anyway; on GPU it takes one core to feed the GPU.
    encoder_cpus = 1.0 if gpus else 0.5
    writer_cpus = 0.25
    decoders = num_decoders or max(1, int(cpus - encoders * encoder_cpus - writer_cpus))
    return dict(gpus=gpus, encoders=encoders, encoder_cpus=encoder_cpus, decoders=decoders, writer_cpus=writer_cpus)


def build_dataset(cfg: PrecomputeConfig, todo: list[dict], manifest: dict):
    import ray
    from ray.data import ActorPoolStrategy

    from pipelines.latent_encoder import EncodeLatents

    res = _resources(cfg.decoders)
    spec = cfg.clip_spec()
    clip_mib = spec.num_frames * spec.height * spec.width * 3 / 2**20
    # Workers read and write S3 with the settings the driver was given (flags or AWS_* variables);
    # on a cloud cluster these are usually empty and the instance role supplies credentials.
    env = {"runtime_env": {"env_vars": storage.s3_env_vars()}} if storage.s3_env_vars() else {}
    ds = ray.data.from_items(todo, override_num_blocks=max(1, len(todo)))
    ds = ds.map_batches(
        DecodeClips,
        fn_constructor_kwargs=dict(spec=spec, output=cfg.output),
        batch_size=1,  # one video per call: a hang or crash costs only that video
        compute=ActorPoolStrategy(size=res["decoders"]),  # each actor owns one decoder process
        num_cpus=1,  # decoding is CPU-bound; one core per decoder process
        # Two chunks of clips in flight (decode streams 8 clips at a time) plus the decoder's own
        # buffers (decord#208): Ray Data cannot prevent OOMs when a UDF's memory is left unset.
        memory=int(2**30 + 2 * 8 * clip_mib * 2**20),
        **env,
    )
    ds = ds.map_batches(
        EncodeLatents,
        fn_constructor_kwargs=dict(preset=cfg.preset, autoencoder=cfg.autoencoder, stable_diffusion=cfg.stable_diffusion or cfg.preset.stable_diffusion),
        batch_size=cfg.encode_batch_size,  # explicit int: required with num_gpus; sized to fill a GPU at 512^2
        compute=ActorPoolStrategy(size=res["encoders"]),  # models load once per actor
        num_gpus=1 if res["gpus"] else 0,
        num_cpus=res["encoder_cpus"],
        memory=int(2 * 2**30),  # model weights + one batch of frames and activations on the host
        **env,
    )
    shape_kw = dict(content_shape=cfg.preset.content_shape, motion_shape=cfg.preset.motion_shape)
    return ds.map_batches(
        ShardWriter,
        fn_constructor_kwargs=dict(output=cfg.output, metadata=manifest, **shape_kw),
        batch_size=cfg.rows_per_shard,  # rows per Parquet file: big enough for fast scans
        compute=ActorPoolStrategy(size=1),  # I/O-bound; one writer keeps files few and large
        num_cpus=res["writer_cpus"],  # fractional: never waits behind decoders for a core
        **env,
    )


def run(cfg: PrecomputeConfig) -> dict:
    """The whole job; returns (and writes) the summary."""
    start = time.monotonic()
    manifest = check_config(cfg)
    guard_output(cfg, manifest)
    todo, seen = plan(cfg)
    written = 0
    if todo:
        ensure_ray()
        for row in build_dataset(cfg, todo, manifest).iter_rows():
            written += int(row["rows"])
    seconds = time.monotonic() - start
    all_errors = shards.read_errors(cfg.output)
    reasons = Counter(r.split(":")[0] for r in all_errors.column(REASON).to_pylist())
    done, _ = shards.written_clips(cfg.output)
    summary = {
        "videos_seen": seen,
        "videos_processed_this_run": len(todo),
        "videos_with_latents": len(done),
        "videos_failed": all_errors.num_rows,
        "clips_written_this_run": written,
        "clips_total": sum(len(v) for v in done.values()),
        "failures_by_reason": dict(reasons),
        "seconds": round(seconds, 2),
        "clips_per_second": round(written / seconds, 3) if seconds > 0 else 0.0,
        "output": cfg.output,
    }
    storage.write_text(storage.join(cfg.output, shards.SUMMARY), json.dumps(summary, indent=2))
    return summary


def ensure_ray() -> None:
    """Connect to the cluster in RAY_ADDRESS (as `ray job submit` sets), or start a local one on loopback.

    Callers set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 before Ray is first imported (the jobs do).
    """
    import os

    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        # The submitted job's runtime env already holds its variables; repeating one is an error.
        ray.init()
        return
    # Workers must see the S3 settings the driver was given (flags or AWS_* variables).
    ray.init(runtime_env={"env_vars": storage.s3_env_vars()})
