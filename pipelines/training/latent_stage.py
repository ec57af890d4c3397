"""What the content and motion stages share: reading and checking a precompute output."""

from __future__ import annotations

import functools

import torch

from pipelines.data import latent_shards as shards
from pipelines.data.video.schema import CAPTION, LABEL
from pipelines.platform import model_store, storage
from pipelines.platform.model_store import ModelNotFound, autoencoder_mismatch, fetch_model, model_digest
from pipelines.training import data
from pipelines.training.config import ConfigError, TrainConfig
from pipelines.training.stage import Stage, to_device

# Latent sets up to this size (all columns, uncompressed) are read once and kept in Ray's object
# store for every epoch (data.latent_dataset): about 4,000 clips at 512x512 (64 KB each), where
# an epoch is short enough for the per-epoch re-read to show. Larger sets stream from storage.
CACHE_BYTES = 256 * 2**20


def check_stable_diffusion(path: str) -> None:
    """Every worker can load the SD at `path` (pipelines.platform.model_store.check_stable_diffusion)."""
    try:
        model_store.check_stable_diffusion(path)
    except ModelNotFound as exc:
        raise ConfigError(str(exc)) from None


def check_autoencoder(uri: str, cfg: TrainConfig, digest: str | None) -> str:
    """The autoencoder matches the preset and is the one that made the latents; returns its digest."""
    try:
        directory = fetch_model(uri)
    except ModelNotFound as exc:
        raise ConfigError(str(exc)) from None
    mismatch = autoencoder_mismatch(directory, cfg.model_preset.autoencoder)
    if mismatch:
        raise ConfigError(f"autoencoder {uri} does not match preset {cfg.preset}: " + ", ".join(mismatch))
    found = model_digest(directory)
    if digest and found != digest:
        raise ConfigError(
            f"autoencoder {uri} (digest {found}) is not the one that made {cfg.latents} (digest {digest})"
        )
    return found


def check_eval_latents(cfg: TrainConfig, digest: str) -> None:
    """Held-out latents must be a precompute output of the same preset and autoencoder as the training ones."""
    storage.check_readable(cfg.eval_latents, "--eval-latents folder")
    manifest = shards.read_manifest(cfg.eval_latents)
    if manifest is None or not data.latent_files(cfg.eval_latents):
        raise ConfigError(f"--eval-latents {cfg.eval_latents} is not a precompute_latents output with shards")
    if manifest.get("preset") != cfg.preset or manifest.get("autoencoder_digest", "") != digest:
        raise ConfigError(
            f"--eval-latents {cfg.eval_latents} was made for preset {manifest.get('preset')!r} with autoencoder "
            f"{manifest.get('autoencoder_digest')!r}, not {cfg.preset!r} with {digest!r} like --latents"
        )


class LatentStage(Stage):
    """A stage trained on the latent shards; subclasses name the columns they read."""

    @classmethod
    def columns(cls, cfg: TrainConfig) -> list[str]:
        raise NotImplementedError

    @staticmethod
    def condition_column(cfg: TrainConfig) -> str:
        """Captions drive text-conditioned (latent-mode) models, labels the class-conditional ones."""
        return CAPTION if cfg.model_preset.mode == "latent" else LABEL

    @classmethod
    def prepare(cls, cfg: TrainConfig) -> dict:
        storage.check_readable(cfg.latents, "latents folder")
        files = data.latent_files(cfg.latents)
        if not files:
            raise ConfigError(
                f"no latent shards under {storage.join(cfg.latents, shards.LATENTS_DIR)} (run "
                "jobs/precompute_latents.py first)"
            )
        manifest = shards.read_manifest(cfg.latents)
        if manifest is None:
            raise ConfigError(f"{cfg.latents} has no {shards.MANIFEST}: not a precompute_latents output")
        if manifest.get("preset") != cfg.preset:
            raise ConfigError(
                f"latents in {cfg.latents} were made for preset {manifest.get('preset')!r}, not {cfg.preset!r}"
            )
        rows, size = data.shard_stats(files)
        if rows < cfg.global_batch:
            raise ConfigError(
                f"{cfg.latents} holds {rows} clips, fewer than one batch (--batch-size {cfg.global_batch})"
            )
        if cfg.model_preset.mode == "latent":
            check_stable_diffusion(cfg.sd_path)
        digest = manifest.get("autoencoder_digest", "")
        if cfg.eval_latents:
            check_eval_latents(cfg, digest)
        if cfg.autoencoder:
            check_autoencoder(cfg.autoencoder, cfg, digest)
        plan = {
            "data_version": {"latents": cfg.latents, "autoencoder_digest": digest, "clips": rows, "shards": len(files)},
            "cache": size <= CACHE_BYTES,
        }
        if cls.condition_column(cfg) == LABEL:
            # Class-conditional: the preset's class count is a default; a data set with more classes
            # gets as many class embeddings (UCF-101 has 101, a user's folders have what they have).
            plan["num_classes"] = max(getattr(cfg.model_preset, cfg.stage).num_classes, data.label_count(files))
        return plan

    @classmethod
    def dataset(cls, cfg: TrainConfig, plan: dict):
        return data.latent_dataset(cfg.latents, cls.columns(cfg), cache=plan.get("cache", False))

    collate = data.LatentCollate
    # Latents are small (a paper-size clip is ~0.2 MB), so 256 of them are ~50 MB; frame stages
    # (25 MB a clip at 512x1024) keep one batch per fetch.
    rows_per_fetch = 256

    @functools.cached_property
    def eval_batch(self) -> dict:
        """The first eval_samples clips of --eval-latents (held out), else of the training latents (the
        same ones at every evaluation: a fit to the training set, not generalisation)."""
        source = self.cfg.eval_latents or self.cfg.latents
        rows = data.read_latent_rows(source, self.columns(self.cfg), self.cfg.eval_samples)
        return to_device(data.collate_latents(rows), self.device)

    def labels(self, batch: dict, num_classes: int) -> torch.Tensor:
        """Class labels with missing ones (NULL_LABEL) mapped to the model's null class."""
        y = batch[LABEL]
        return torch.where(y < 0, torch.full_like(y, num_classes), y)
