"""What a training job was asked to do: one frozen config built from the shared flags.

The same fields drive the three stages; `prepare` in each stage checks the ones it uses.
Every check here runs before Ray starts and fails with one readable line (ConfigError).
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass

from cmd_model.presets import Preset, get_preset
from pipelines.platform.errors import ConfigError  # noqa: F401 - re-exported: pipelines.training.ConfigError
from pipelines.platform.flags import flag

STAGES = ("vae", "autoencoder", "content", "motion")
VIDEO_STAGES, LATENT_STAGES = ("vae", "autoencoder"), ("content", "motion")  # what each trains on: --input or --latents
# Ray Train's own default place for runs; on a multi-node cluster pass an s3:// (or NFS) --storage.
DEFAULT_STORAGE = os.path.expanduser("~/ray_results")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=-]*$")
# Model config fields that --model-overrides (and a sweep's model.*) may change: width, depth and
# regularisation. The rest (channels, frame and latent sizes, patches, conditioning) are fixed by
# the data and by the models of the other stages.
OVERRIDABLE = {
    "vae": (),  # the VAE keeps the base SD's architecture
    "autoencoder": ("hidden_size", "depth", "num_heads", "head_dim", "mlp_ratio"),
    "content": ("hidden_size", "depth", "num_heads", "mlp_ratio", "cond_dropout"),
    "motion": ("hidden_size", "depth", "num_heads", "mlp_ratio", "cond_dropout"),
}


@dataclass(frozen=True)
class TrainConfig:
    """Every flag of the training jobs is a field here (pipelines.platform.flags builds the parser from them)."""

    stage: str  # the job's: train_<stage>.py
    preset: str = flag(help="model preset (cmd_model.presets.PRESETS), e.g. tiny, ucf101-64, webvid-sd21-512x1024")
    # With `storage`, identifies the run: the same pair resumes it (no timestamps).
    name: str = flag(help="run name; with --storage it identifies the run, and the same pair resumes it")
    max_steps: int = flag(help="optimizer steps in all (a resumed run continues to this step)")
    storage: str = flag(
        DEFAULT_STORAGE, help="checkpoint root: a local folder or s3:// prefix (shared storage on a multi-node cluster)"
    )
    batch_size: int | None = flag(
        None,
        help=(
            "global batch over all workers (default: the preset's for this stage; paper: 24 autoencoder, 256 diffusion)"
        ),
    )
    recon_loss: str | None = flag(
        None,
        stages=("autoencoder",),
        choices=("l2", "l1", "l1+lpips"),
        help="reconstruction loss (default: the preset's; paper: l2; the released pixel-mode code: l1+lpips)",
    )
    lpips_vgg: str | None = flag(
        None,
        stages=("autoencoder",),
        help="l1+lpips: torchvision's VGG-16 ImageNet state dict (vgg16-397923af.pth), a local file",
    )
    lr: float | None = flag(None, help="learning rate (default: the paper's for this stage, from the preset)")
    warmup_steps: int = flag(0, help="linear learning-rate warm-up steps (paper: none)")
    eval_every: int = flag(5000, help="steps between evaluations (samples, reconstructions) on rank 0")
    checkpoint_every: int = flag(1000, help="steps between checkpoints")
    # Every step's values cost the tracking client's work in the training process (an in-process
    # sqlite store: ~40% of a 15 ms step, benchmarks/train.py) and a device sync to read them.
    log_every: int = flag(10, help="steps between training-metric logs (loss and grad norm: means over those steps)")
    num_workers: int = flag(
        1,
        help="Ray Train workers (data-parallel replicas); 0: Ray Train's local mode, the loop runs in the job's "
        "own process on its CPU (no worker actors: quick small runs, debugging)",
    )
    use_gpu: bool = flag(False, help="one GPU per worker (bf16 autocast, TF32)")
    # What makes a paper preset's batch fit its GPUs (python -m cmd_model.memory; docs/memory.md).
    grad_accum_steps: int = flag(
        1,
        help="micro-batches per optimizer step on each worker, their gradients summed (DDP syncs only the "
        "last): the same global --batch-size in less memory",
    )
    grad_checkpointing: bool = flag(
        False,
        help="keep only each block's input and recompute the rest in the backward pass: a fraction of the "
        "activation memory for about a third more compute",
    )
    gpu_gib: float = flag(
        80.0,
        help="GPU memory of each worker, GiB: with --use-gpu the job refuses a per-GPU batch whose memory "
        "plan (python -m cmd_model.memory) does not fit in it",
    )
    max_failures: int = flag(0, help="worker-group restarts from the last checkpoint before failing (-1: no limit)")
    cpus_per_worker: float = flag(1.0, help="CPUs each worker reserves")
    # The released CMD code clips the motion DiT's gradient norm at 1.0.
    grad_clip: float = flag(1.0, help="gradient-norm clipping")
    seed: int = flag(0, help="seed of the initial weights and the noise")
    experiment: str | None = flag(None, help="MLflow experiment (default: cmd-{stage})")
    eval_samples: int = flag(2, help="clips sampled or reconstructed per evaluation")
    input: str | None = flag(
        None,
        stages=VIDEO_STAGES,
        required_for=VIDEO_STAGES,
        help="videos: a folder, s3:// prefix, or CSV/Parquet manifest",
    )
    labels: str | None = flag(
        None, stages=VIDEO_STAGES, choices=("folder",), help="class labels from folder names (UCF-101 layout)"
    )
    decoders: int | None = flag(
        None,
        stages=VIDEO_STAGES,
        help="video-decoding tasks beside the workers (default: the CPUs the cluster has up now, less the "
        "workers'; give it on a cluster that scales from zero)",
    )
    # The autoencoder cuts its clips as precompute does (pipelines.data.decode_stage): inside shots.
    scene_cuts: str = flag(
        "on",
        stages=("autoencoder",),
        choices=("on", "off"),
        help="cut clips only inside shots (hard cuts found by PySceneDetect)",
    )
    scene_cut_threshold: float = flag(
        3.0,
        stages=("autoencoder",),
        help="a frame is a cut when its change is this many times its neighbours' (AdaptiveDetector)",
    )
    latents: str | None = flag(
        None,
        stages=LATENT_STAGES,
        required_for=LATENT_STAGES,
        help="a precompute_latents output folder or s3:// prefix",
    )
    eval_latents: str | None = flag(
        None,
        stages=LATENT_STAGES,
        help="held-out clips' latents (a precompute_latents output made with the same autoencoder): evaluations "
        "and sweeps measure on them instead of the first training clips",
    )
    stable_diffusion: str | None = flag(
        None, aliases=("--vae",), help="latent-mode presets: the Stable Diffusion folder (diffusers layout) or hub id"
    )
    autoencoder: str | None = flag(
        None,
        stages=("motion",),
        help="the autoencoder that made the latents (folder, s3:// or runs:/); decodes sample videos",
    )
    ema_decay: float | None = flag(
        None, help="EMA decay of the exported weights (default: the stage's; paper 0.999, none for the autoencoder)"
    )
    init_from: str | None = flag(
        None,
        help=(
            "a save_pretrained folder or URI (runs:/, models:/, s3://) whose weights start a run with no checkpoint yet"
        ),
    )
    model_overrides: dict = flag(
        default_factory=dict,
        help='JSON changes to the stage\'s model config from the preset, e.g. \'{"hidden_size": 64, "depth": 3}\'',
    )

    def __post_init__(self):
        check_config(self)

    @property
    def model_preset(self) -> Preset:
        """The preset, with model_overrides applied to this stage's model config."""
        preset = get_preset(self.preset)
        if not self.model_overrides:
            return preset
        # Each stage's model config is the preset attribute of the same name.
        return preset.replace(**{self.stage: dataclasses.replace(getattr(preset, self.stage), **self.model_overrides)})

    @property
    def global_batch(self) -> int:
        p = self.model_preset
        return self.batch_size or (p.autoencoder_batch_size if self.stage in ("vae", "autoencoder") else p.batch_size)

    @property
    def reconstruction_loss(self) -> str:
        return self.recon_loss or self.model_preset.autoencoder_loss

    @property
    def worker_batch(self) -> int:
        return self.global_batch // max(1, self.num_workers)

    @property
    def micro_batch(self) -> int:
        """What one forward pass takes: the worker's batch over --grad-accum-steps."""
        return self.worker_batch // self.grad_accum_steps

    @property
    def local_mode(self) -> bool:
        """Ray Train's local mode (ScalingConfig(num_workers=0)): the loop runs in the driver's process."""
        return self.num_workers == 0

    @property
    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        p = self.model_preset
        return p.autoencoder_lr if self.stage in ("vae", "autoencoder") else p.diffusion_lr

    @property
    def experiment_name(self) -> str:
        return self.experiment or f"cmd-{self.stage}"

    @property
    def sd_path(self) -> str | None:
        return self.stable_diffusion or self.model_preset.stable_diffusion

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)


RECON_LOSSES = ("l2", "l1", "l1+lpips")
PATH_FIELDS = (
    "storage",
    "input",
    "latents",
    "eval_latents",
    "stable_diffusion",
    "autoencoder",
    "init_from",
    "lpips_vgg",
)


def with_absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Local paths made absolute: Ray workers run in another working directory.

    `storage` is always local-or-s3; the others may be URIs (s3://, runs:/) or hub ids, which only
    change when a folder of that name exists here.
    """
    changes = {}
    for name in PATH_FIELDS:
        value = getattr(cfg, name)
        if not value or "://" in value or value.startswith(("runs:/", "models:/")):
            continue
        if name == "storage" or os.path.exists(os.path.expanduser(value)):
            changes[name] = os.path.abspath(os.path.expanduser(value))
    return cfg.replace(**changes)


def check_config(cfg: TrainConfig) -> None:
    """Flag values alone (no I/O): stage, preset, numbers, name."""
    if cfg.stage not in STAGES:
        raise ConfigError(f"unknown stage {cfg.stage!r}; choose one of: {', '.join(STAGES)}")
    try:
        preset = get_preset(cfg.preset)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if not _NAME.match(cfg.name or ""):
        raise ConfigError(
            f"--name {cfg.name!r} must be letters, digits and . _ = - (it names a folder and the MLflow run)"
        )
    positive = dict(
        max_steps=cfg.max_steps,
        eval_every=cfg.eval_every,
        checkpoint_every=cfg.checkpoint_every,
        log_every=cfg.log_every,
        eval_samples=cfg.eval_samples,
        grad_accum_steps=cfg.grad_accum_steps,
    )
    for option in ("batch_size", "decoders"):
        if getattr(cfg, option) is not None:
            positive[option] = getattr(cfg, option)
    for option, value in positive.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ConfigError(f"--{option.replace('_', '-')} must be a positive integer, got {value!r}")
    non_negative = dict(
        num_workers=cfg.num_workers, warmup_steps=cfg.warmup_steps, max_failures=cfg.max_failures, seed=cfg.seed
    )
    for option, value in non_negative.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < (-1 if option == "max_failures" else 0):
            least = "-1 (no limit) or more" if option == "max_failures" else "a non-negative integer"
            raise ConfigError(f"--{option.replace('_', '-')} must be {least}, got {value!r}")
    if cfg.scene_cuts not in ("on", "off"):
        raise ConfigError(f"--scene-cuts must be on or off, got {cfg.scene_cuts!r}")
    positive_numbers = dict(
        lr=cfg.lr,
        grad_clip=cfg.grad_clip,
        cpus_per_worker=cfg.cpus_per_worker,
        scene_cut_threshold=cfg.scene_cut_threshold,
        gpu_gib=cfg.gpu_gib,
    )
    for option, value in positive_numbers.items():
        if value is not None and not (
            isinstance(value, (int, float)) and value > 0 and value == value and value != float("inf")
        ):
            raise ConfigError(f"--{option.replace('_', '-')} must be a positive number, got {value!r}")
    if cfg.ema_decay is not None and not (isinstance(cfg.ema_decay, (int, float)) and 0 < cfg.ema_decay < 1):
        raise ConfigError(f"--ema-decay must be a number between 0 and 1 (exclusive), got {cfg.ema_decay!r}")
    check_model_overrides(cfg.stage, preset, cfg.model_overrides)
    if cfg.recon_loss is not None and (cfg.stage != "autoencoder" or cfg.recon_loss not in RECON_LOSSES):
        raise ConfigError(
            f"--recon-loss is the autoencoder's: one of {', '.join(RECON_LOSSES)}, got {cfg.recon_loss!r}"
        )
    if cfg.reconstruction_loss == "l1+lpips" and (preset.mode != "pixel" or not cfg.lpips_vgg):
        raise ConfigError(
            "--recon-loss l1+lpips is for pixel-mode presets and needs --lpips-vgg FILE (torchvision's VGG-16 weights)"
        )
    if cfg.local_mode and cfg.use_gpu:
        raise ConfigError("--num-workers 0 runs the loop in this process on its CPU: drop --use-gpu, or use workers")
    if cfg.global_batch % (max(1, cfg.num_workers) * cfg.grad_accum_steps):
        over = f"--num-workers {cfg.num_workers}"
        if cfg.grad_accum_steps > 1:
            over += f" x --grad-accum-steps {cfg.grad_accum_steps} (micro-batches of one size on every worker)"
        raise ConfigError(f"--batch-size {cfg.global_batch} is the global batch: it must divide evenly over {over}")
    if cfg.stage in ("vae", "autoencoder") and not cfg.input:
        raise ConfigError(
            f"the {cfg.stage} trains on videos: pass --input (a folder, s3:// prefix or CSV/Parquet manifest)"
        )
    if cfg.stage in ("content", "motion") and not cfg.latents:
        raise ConfigError(
            f"the {cfg.stage} model trains on precomputed latents: pass --latents (a precompute_latents output)"
        )
    if preset.needs_gpu and not cfg.use_gpu:
        raise ConfigError(
            f"preset {preset.name} trains Stable Diffusion-sized models at {preset.resolution}: pass --use-gpu "
            "(for a run on CPUs, use preset shapes-latent or tiny)"
        )
    if preset.mode == "latent" and not cfg.sd_path:
        raise ConfigError(
            f"preset {preset.name} is in latent mode: pass --stable-diffusion DIR (a diffusers Stable Diffusion folder)"
        )


def check_model_overrides(stage: str, preset: Preset, overrides) -> None:
    """Known fields of the stage's model config, each of the field's type, and a consistent model."""
    if not isinstance(overrides, dict):
        raise ConfigError(f'--model-overrides must be a JSON object such as {{"depth": 3}}, got {overrides!r}')
    if not overrides:
        return
    base = getattr(preset, stage, None)
    if stage == "vae":
        raise ConfigError("--model-overrides: the vae stage trains the base Stable Diffusion's VAE as it is")
    if base is None:
        raise ConfigError(
            f"preset {preset.name} fine-tunes Stable Diffusion's UNet as its {stage} model: "
            "its architecture is SD's and --model-overrides has nothing to change"
        )
    valid = OVERRIDABLE[stage]
    unknown = sorted(set(overrides) - set(valid))
    if unknown:
        raise ConfigError(
            f"--model-overrides: unknown {stage} model field(s) {', '.join(unknown)}; valid: {', '.join(valid)}"
        )
    for key, value in overrides.items():
        kind = type(getattr(base, key))
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is int and not (number and isinstance(value, int) and value >= 1):
            raise ConfigError(f"--model-overrides: {stage} {key} must be a positive integer, got {value!r}")
        if kind is float and not (number and value >= 0 and value == value and value != float("inf")):
            raise ConfigError(f"--model-overrides: {stage} {key} must be a non-negative number, got {value!r}")
    if "cond_dropout" in overrides and not overrides["cond_dropout"] < 1:
        raise ConfigError(f"--model-overrides: cond_dropout must be below 1, got {overrides['cond_dropout']!r}")
    merged = dataclasses.replace(base, **overrides)
    if stage != "autoencoder" and merged.hidden_size % merged.num_heads:
        raise ConfigError(
            f"--model-overrides: {stage} hidden_size {merged.hidden_size} must be a multiple of "
            f"num_heads {merged.num_heads}"
        )
