"""Memory plan of one training stage on each GPU, measured on the CPU without allocating it.

    python -m cmd_model.memory --preset webvid-sd21-512x1024 --stage content --batch-size 256 --num-workers 32

prints one JSON line (GiB): what every GPU holds, the peak of a training step, and whether it fits.
--batch-size is the global batch, as in the training jobs (with the default --num-workers 1, the
batch of one GPU); each GPU runs it as --grad-accum-steps micro-batches.

- Resident, from parameter counts: the trained model's fp32 weights and gradients, AdamW's two
  fp32 states, the fp32 EMA copy (the diffusion stages), the frozen models the stage keeps on the
  GPU in bf16 (SD's VAE and text encoder; the motion stage's autoencoder, fp32), and DDP's
  gradient buckets (none: the loop passes gradient_as_bucket_view, so gradients live in them).
- Measured: one real training step of the stage, at the preset's shapes, on fake tensors
  (FakeTensorMode: every operation's shapes and dtypes, no memory): the inputs through the frozen
  encoders, the model's forward and loss under bf16 autocast, the backward, gradient clipping and
  AdamW's step; then the rank-0 evaluation's decoding. Every storage an operation creates is
  followed to its release, at micro-batches of 1 and 2: each phase's peak above the resident
  memory is a line, fixed + micro-batch x per sample, solved from the two runs. Activations are
  what is still held when the forward pass ends: autograd's saved tensors (also summed, once per
  storage, with saved_tensors_hooks) and, with gradient checkpointing, the blocks' inputs.
- Peak = resident + the highest phase at the micro-batch. It fits when it is at most USABLE of
  the GPU: the rest is the CUDA context, NCCL, cuBLAS workspaces and the caching allocator's
  fragmentation, none of which the plan sees.

The fake tensors live on the CPU (a CPU-only machine cannot run CUDA's autograd engine, even on
fake tensors), under CPU autocast plus the ops where CUDA's autocast differs (CudaAutocast). The
CPU's fused attention saves what CUDA's flash attention saves (inputs, output, log-sum-exp).
docs/memory.md has the plans of the paper presets and what was checked.

It imports nothing from pipelines: the training jobs' drivers import it.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import sys
import time
import weakref
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from cmd_model.presets import PRESETS, Preset, TinySDConfig, get_preset

GIB = 2**30
STAGES = ("autoencoder", "content", "motion")
# Of the GPU's memory, what the plan may fill: the CUDA context (~0.5 GiB), NCCL's buffers, the
# cuBLAS/cuDNN workspaces and the caching allocator's fragmentation take the rest.
USABLE = 0.9
# As the training stages: AdamW (foreach) on fp32 weights, gradient clipping, an EMA copy for the
# diffusion models only (pipelines.training's OptimizerSpec), 10% caption dropout, and rank 0's
# evaluation on 2 clips (--eval-samples' default).
EMA_STAGES = ("content", "motion")
CAPTION_DROPOUT = 0.1
EVAL_SAMPLES = 2

# ---------------------------------------------------------------------------------------
# CUDA's autocast on CPU fake tensors
# ---------------------------------------------------------------------------------------

# Ops CUDA's autocast runs in float32 (its fp32 and fp32-set-dtype lists, aten/src/ATen/autocast_mode.h)
# where CPU's keeps the input's dtype, by the name of their Python function or method. They matter:
# the UNet's GroupNorms under CUDA autocast keep an fp32 copy of every bf16 feature map.
CUDA_FP32 = frozenset(
    """group_norm layer_norm softmax log_softmax softmin softplus exp expm1 log log10 log2 log1p pow __pow__
    __rpow__ reciprocal __rdiv__ __rtruediv__ rsqrt acos asin cosh sinh tan erfinv sum prod cumsum cumprod norm
    normalize logsumexp cosine_similarity dist cdist pdist renorm interpolate mse_loss l1_loss smooth_l1_loss
    huber_loss kl_div nll_loss poisson_nll_loss binary_cross_entropy_with_logits""".split()
)
# Ops CUDA's autocast runs in the low precision where CPU's does not.
CUDA_LOW = frozenset({"einsum", "mv", "addmv", "addr", "chain_matmul", "multi_dot"})


def _cast(tree, dtypes: tuple[torch.dtype, ...], to: torch.dtype):
    return pytree.tree_map(lambda x: x.to(to) if isinstance(x, torch.Tensor) and x.dtype in dtypes else x, tree)


class CudaAutocast(TorchFunctionMode):
    """With torch.autocast("cpu", bf16): casts as CUDA's autocast would where CPU's policy differs.

    The casts are ordinary autograd ops, as autocast's own, so what they keep for the backward is kept.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.is_autocast_enabled("cpu"):
            name = getattr(func, "__name__", "")
            if name in CUDA_FP32:
                args, kwargs = _cast((args, kwargs), (torch.bfloat16, torch.float16), torch.float32)
            elif name in CUDA_LOW:
                args, kwargs = _cast((args, kwargs), (torch.float32,), torch.bfloat16)
        return func(*args, **kwargs)


def checkpointed(module: torch.nn.Module, *args):
    """cmd_model.layers.checkpointed (what the training stages use), with CudaAutocast also around the
    backward pass's recomputation: function modes do not reach the autograd engine, and the
    recomputed block must cast as its forward did."""
    return torch.utils.checkpoint.checkpoint(
        module, *args, use_reentrant=False, context_fn=lambda: (contextlib.nullcontext(), CudaAutocast())
    )


# ---------------------------------------------------------------------------------------
# Following storages
# ---------------------------------------------------------------------------------------


class StorageTracker(TorchDispatchMode):
    """Follows every storage that operations create, from its creation to its release, by phase.

    A storage is counted once, however many views share it; storages that existed before (the
    weights, the optimizer's states: the resident part) are not followed, even when an operation
    updates them in place.
    """

    def __init__(self):
        super().__init__()
        self.phase = ""
        self.events: list[tuple[str, int, int]] = []  # (phase, serial, +bytes or -bytes) in order
        self.created_in: list[str] = []  # serial -> the phase that created it
        self._sizes: list[int] = []
        self._alive: dict[int, int] = {}  # storage address -> serial of the storage living there

    def serial(self, t: torch.Tensor) -> int | None:
        return self._alive.get(t.untyped_storage()._cdata)

    def held(self, created_in: str) -> int:
        """Bytes alive now of the storages created in phase `created_in`."""
        return sum(self._sizes[s] for s in self._alive.values() if self.created_in[s] == created_in)

    def peaks(self, leave_out: set[int]) -> dict[str, int]:
        """Per phase, the most bytes alive at once (storages of every phase), without the `leave_out` serials."""
        live, peaks = 0, {}
        for phase, serial, delta in self.events:
            if serial not in leave_out:
                live += delta
                peaks[phase] = max(peaks.get(phase, 0), live)
        return peaks

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Only fresh outputs: one the schema marks as aliasing an input (a view, an in-place or
        # out= result) shares a storage that exists already.
        fresh = [r.alias_info is None for r in func._schema.returns]
        for i, result in enumerate(out if isinstance(out, (tuple, list)) and len(fresh) > 1 else [out]):
            if i < len(fresh) and fresh[i]:
                for t in pytree.tree_leaves(result):
                    if isinstance(t, torch.Tensor):
                        self._follow(t)
        return out

    def _follow(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key in self._alive:
            return
        serial, size = len(self._sizes), storage.nbytes()
        self._sizes.append(size)
        self.created_in.append(self.phase)
        self._alive[key] = serial
        self.events.append((self.phase, serial, size))
        weakref.finalize(storage, self._release, key, serial)

    def _release(self, key: int, serial: int) -> None:
        if self._alive.get(key) == serial:
            del self._alive[key]
        self.events.append((self.phase, serial, -self._sizes[serial]))


# ---------------------------------------------------------------------------------------
# The stages' models and steps, on fake tensors
# ---------------------------------------------------------------------------------------


def _fake(build: Callable[[], torch.nn.Module], dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A module built on the meta device (no initialisation cost), then given fake CPU storage.

    Parameters and buffers are made anew from their shapes (not converted from the meta tensors:
    the fake mode would keep the meta ones alive in its memo).
    """
    with torch.device("meta"):
        module = build()
    for sub in module.modules():
        for name, p in sub._parameters.items():
            if p is not None:
                sub._parameters[name] = torch.nn.Parameter(
                    torch.empty(p.shape, dtype=dtype or p.dtype), requires_grad=p.requires_grad
                )
        for name, b in sub._buffers.items():
            if b is not None:  # zeros: index buffers (CLIP's position ids) stay in range on real tensors
                sub._buffers[name] = torch.zeros(b.shape, dtype=dtype if b.is_floating_point() and dtype else b.dtype)
    return module


def _frozen(build: Callable[[], torch.nn.Module], dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A frozen model, as the stages load one: eval mode, no gradients."""
    return _fake(build, dtype).eval().requires_grad_(False)


def _sd_parts(preset: Preset) -> tuple[dict, dict, dict]:
    """(UNet, VAE, CLIPTextConfig fields) of the preset's Stable Diffusion: a public checkpoint's or the stand-in's."""
    from cmd_model.content import SD_TEXT_ENCODERS, SD_VAE, tiny_text_config, tiny_vae_config
    from cmd_model.report import unet_config

    if preset.stable_diffusion in SD_TEXT_ENCODERS:
        text = dict(vocab_size=49408, max_position_embeddings=77, **SD_TEXT_ENCODERS[preset.stable_diffusion])
        return unet_config(preset), SD_VAE, text
    stand_in = preset.stand_in_sd or TinySDConfig(text_dim=preset.motion.text_dim)
    return unet_config(preset), tiny_vae_config(stand_in), tiny_text_config(stand_in)


@dataclass
class StageParts:
    """One stage on fake tensors: the trained model, the frozen models it keeps on the GPU, and its step."""

    model: torch.nn.Module
    frozen: dict[str, torch.nn.Module]
    batch: Callable[[int], dict]  # micro-batch -> the batch as the loader hands it to the GPU
    prepare: Callable[[dict], dict]  # no_grad: the frozen encoders' part (SD VAE, text encoder)
    loss: Callable[[torch.nn.Module, dict], torch.Tensor]
    evaluate: Callable[[], object] | None = None  # rank 0's decoding of its evaluation clips


def stage_parts(preset: Preset, stage: str) -> StageParts:
    """Build the stage's models as the training stage does (pipelines.training.<stage>), under a FakeTensorMode."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from cmd_model.autoencoder import VideoAutoencoder
    from cmd_model.content import clips_to_input, latents_to_video
    from cmd_model.denoisers import dit_denoiser, unet_denoiser
    from cmd_model.diffusion import diffusion_loss, dit_scheduler
    from cmd_model.dit import DiT

    latent = preset.mode == "latent"
    ae = preset.autoencoder
    frozen: dict[str, torch.nn.Module] = {}
    if latent:
        unet_cfg, vae_cfg, text_cfg = _sd_parts(preset)
        frozen["vae"] = _frozen(lambda: AutoencoderKL(**vae_cfg), torch.bfloat16)
        vae = frozen["vae"]

    def video(n: int, frames: int = ae.num_frames) -> torch.Tensor:  # uint8 clips as decoded
        return torch.empty(n, frames, *preset.video_size, 3, dtype=torch.uint8)

    def decode_frames(x: torch.Tensor) -> None:  # [B, C, L, H, W] in autoencoder space, as video_to_uint8
        if latent:
            latents_to_video(vae, x.float().movedim(1, 2))

    if stage == "autoencoder":
        model = _fake(lambda: VideoAutoencoder.from_preset_config(ae))
        encoder = frozen.get("vae")

        def evaluate():
            x = clips_to_input(video(EVAL_SAMPLES), encoder)
            decode_frames(x)
            decode_frames(model(x))

        return StageParts(
            model,
            frozen,
            batch=lambda n: {"frames": video(n)},
            prepare=lambda b: {"x": clips_to_input(b["frames"], encoder)},
            loss=lambda m, b: F.mse_loss(m(b["x"]).float(), b["x"]),  # the paper's l2 (the preset default)
            evaluate=evaluate,
        )

    if latent:
        text_encoder = _frozen(lambda: CLIPTextModel(CLIPTextConfig(**text_cfg)), torch.bfloat16)
        frozen["text_encoder"] = text_encoder

        def tokens(n: int) -> torch.Tensor:
            return torch.zeros(n, text_cfg["max_position_embeddings"], dtype=torch.long)

    if stage == "content" and latent:
        model = _fake(lambda: UNet2DConditionModel(sample_size=preset.latent_size[0], **unet_cfg))
        # SD's schedule; SD 1.5 and 2.1-base predict epsilon (TinySDConfig's default), the stand-ins say.
        prediction = (preset.stand_in_sd or TinySDConfig()).prediction_type
        scheduler = DDPMScheduler(
            beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction
        )
        null = text_encoder(tokens(1)).last_hidden_state  # the empty caption's features, made once

        def loss(m, b):
            denoise = unet_denoiser(m, b["text"], null, cond_dropout=CAPTION_DROPOUT)
            return diffusion_loss(denoise, b["content"], scheduler)

        return StageParts(
            model,
            frozen,
            batch=lambda n: {"content": torch.empty(n, *preset.content_shape), "ids": tokens(n)},
            prepare=lambda b: {"content": b["content"], "text": text_encoder(b["ids"]).last_hidden_state},
            loss=loss,
            evaluate=lambda: decode_frames(torch.empty(EVAL_SAMPLES, *preset.content_shape)[:, :, None]),
        )

    config = preset.content if stage == "content" else preset.motion
    model = _fake(lambda: DiT.from_preset_config(config))
    scheduler = dit_scheduler(config.prediction_type)
    evaluate = None
    if stage == "motion":
        # --autoencoder, kept in fp32 to decode the evaluation's samples
        decoder = frozen["autoencoder"] = _frozen(lambda: VideoAutoencoder.from_preset_config(ae))

        def evaluate():
            decode_frames(
                decoder.decode(
                    torch.empty(EVAL_SAMPLES, *preset.content_shape), torch.empty(EVAL_SAMPLES, *preset.motion_shape)
                )
            )

    def batch(n: int) -> dict:
        b = {"x": torch.empty(n, config.in_channels, *config.input_size)}
        if config.context_channels:
            b["context"] = torch.empty(n, config.context_channels, *config.context_size)
        if config.text_dim:
            b["ids"] = tokens(n)
        if config.num_classes:
            b["labels"] = torch.zeros(n, dtype=torch.long)
        return b

    def prepare(b: dict) -> dict:
        if "ids" in b:
            b = {**b, "text": text_encoder(b.pop("ids")).pooler_output}
        return b

    def loss(m, b):
        denoise = dit_denoiser(m, content=b.get("context"), labels=b.get("labels"), text=b.get("text"))
        return diffusion_loss(denoise, b["x"], scheduler)

    return StageParts(model, frozen, batch=batch, prepare=prepare, loss=loss, evaluate=evaluate)


# ---------------------------------------------------------------------------------------
# Measuring a step
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Line:
    """bytes = fixed + per_sample x micro-batch."""

    fixed: float
    per_sample: float

    def at(self, micro_batch: int) -> float:
        return self.fixed + self.per_sample * micro_batch

    @classmethod
    def through(cls, at_1: float, at_2: float) -> "Line":
        return cls(fixed=2 * at_1 - at_2, per_sample=at_2 - at_1)


@dataclass(frozen=True)
class StepProfile:
    """What one stage's step measured, in bytes (see the module docstring)."""

    params: int  # the trained model's
    frozen: dict[str, int]  # bytes of each frozen model kept on the GPU
    activations: Line  # held when the forward pass ends
    saved: Line  # autograd's saved tensors, the weights left out (saved_tensors_hooks)
    phases: dict[str, Line]  # inputs, forward, backward, optimizer, evaluation: peak above the resident memory
    seconds: float  # what measuring took (wall clock)
    cpu_seconds: float  # and in CPU time (what a busy machine does not inflate)


PHASES = ("inputs", "forward", "backward", "optimizer", "evaluation")


def _module_bytes(module: torch.nn.Module) -> int:
    tensors = (*module.parameters(), *module.buffers())
    return sum({t.untyped_storage()._cdata: t.untyped_storage().nbytes() for t in tensors}.values())


def _step(parts: StageParts, optimizer, micro_batch: int, evaluate: bool) -> tuple[int, int, dict[str, int]]:
    """One training step at `micro_batch` (then rank 0's evaluation): (activations, saved, peaks per phase)."""
    model = parts.model
    params = list(model.parameters())
    tracker = StorageTracker()
    weights = {p.untyped_storage()._cdata for p in params}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in weights:
            saved[storage._cdata] = storage.nbytes()
        return t

    optimizer.zero_grad(set_to_none=True)
    with tracker:
        tracker.phase = "inputs"
        batch = parts.batch(micro_batch)
        with torch.no_grad():
            inputs = parts.prepare(batch)
        tracker.phase = "forward"
        # The training loop's autocast (bf16 on CUDA), here as CPU autocast with CUDA's policy.
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast("cpu", dtype=torch.bfloat16), CudaAutocast():
                loss = parts.loss(model, inputs)
        activations = tracker.held("forward")
        tracker.phase = "backward"
        loss.backward()
        del loss
        tracker.phase = "optimizer"
        grads = {tracker.serial(p.grad) for p in params if p.grad is not None}
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        del batch, inputs
        if evaluate and parts.evaluate is not None:
            tracker.phase = "evaluation"
            with torch.no_grad():
                parts.evaluate()
    # The gradients are counted as resident (DDP's buckets hold them from the first step on).
    return activations, sum(saved.values()), tracker.peaks(leave_out=grads)


def _shapes_only(preset: Preset) -> Preset:
    """The preset with the DiT fields that change no shape at their defaults, so that the trials of a
    sweep over condition dropout share one measurement."""
    changes = {}
    for name in ("content", "motion"):
        config = getattr(preset, name)
        if config is not None:
            defaults = type(config)()
            changes[name] = dataclasses.replace(
                config, cond_dropout=defaults.cond_dropout, class_embed_std=defaults.class_embed_std
            )
    return preset.replace(**changes)


@functools.lru_cache(maxsize=32)
def step_profile(preset: Preset, stage: str, grad_checkpointing: bool = False) -> StepProfile:
    """Measure the stage's step at micro-batches 1 and 2 (seconds on a CPU; cached per process)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if stage not in STAGES:
        raise ValueError(f"no memory plan for stage {stage!r}; choose one of: {', '.join(STAGES)}")
    if stage == "content" and preset.mode == "pixel" and preset.content is None:
        raise ValueError(f"preset {preset.name} has no content model")
    start, cpu = time.perf_counter(), time.process_time()
    # Non-fake inputs: the schedulers' CPU tables (alphas_cumprod) become fake constants.
    with FakeTensorMode(allow_non_fake_inputs=True):
        parts = stage_parts(preset, stage)
        model = parts.model.train()
        if grad_checkpointing:
            model.enable_gradient_checkpointing(checkpointed)
        params = list(model.parameters())
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, foreach=True)
        for p in params:  # AdamW's states exist from the first step on: make them, then measure
            p.grad = torch.zeros_like(p)
        optimizer.step()
        runs = [_step(parts, optimizer, n, evaluate=n == 1) for n in (1, 2)]
    (act_1, saved_1, peaks_1), (act_2, saved_2, peaks_2) = runs
    phases = {phase: Line.through(peaks_1[phase], peaks_2[phase]) for phase in PHASES[:4]}
    if "evaluation" in peaks_1:  # measured once: its size is --eval-samples', not the batch's
        phases["evaluation"] = Line(fixed=peaks_1["evaluation"], per_sample=0.0)
    return StepProfile(
        params=sum(p.numel() for p in params),
        frozen={name: _module_bytes(m) for name, m in parts.frozen.items()},
        activations=Line.through(act_1, act_2),
        saved=Line.through(saved_1, saved_2),
        phases=phases,
        seconds=time.perf_counter() - start,
        cpu_seconds=time.process_time() - cpu,
    )


# ---------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------


class PlanError(ValueError):
    """A batch that cannot be planned (it does not divide), in one line."""


def per_gpu(batch_size: int, num_workers: int, grad_accum_steps: int) -> tuple[int, int]:
    """(the batch of one GPU per optimizer step, its micro-batch)."""
    workers = max(1, num_workers)
    if batch_size < 1 or grad_accum_steps < 1 or batch_size % (workers * grad_accum_steps):
        raise PlanError(
            f"batch {batch_size} does not divide into {workers} GPU(s) x {grad_accum_steps} micro-batch(es) of one size"
        )
    return batch_size // workers, batch_size // workers // grad_accum_steps


def plan(
    preset: Preset,
    stage: str,
    batch_size: int,
    num_workers: int = 1,
    grad_accum_steps: int = 1,
    grad_checkpointing: bool = False,
    gpu_gib: float = 80.0,
    ema: bool | None = None,
    bucket_view: bool = True,
) -> dict:
    """The memory of each GPU for one stage at a global batch (GiB); see the module docstring."""
    gpu_batch, micro = per_gpu(batch_size, num_workers, grad_accum_steps)
    profile = step_profile(_shapes_only(preset), stage, grad_checkpointing)
    ema = stage in EMA_STAGES if ema is None else ema
    n = profile.params
    resident = {
        "weights": 4 * n,
        "gradients": 4 * n,
        "optimizer": 8 * n,  # AdamW: exp_avg and exp_avg_sq, fp32
        "ema": 4 * n if ema else 0,
        "frozen": sum(profile.frozen.values()),
        # Without gradient_as_bucket_view DDP copies every gradient into a bucket of its own.
        "ddp_buckets": 4 * n if num_workers > 1 and not bucket_view else 0,
    }
    phases = {phase: line.at(micro) for phase, line in profile.phases.items()}
    peak_phase = max(phases, key=phases.get)
    peak = sum(resident.values()) + phases[peak_phase]
    gib = lambda b: round(b / GIB, 2)  # noqa: E731
    return {
        "preset": preset.name,
        "stage": stage,
        "batch_size": batch_size,
        "num_workers": num_workers,
        "gpu_batch": gpu_batch,
        "grad_accum_steps": grad_accum_steps,
        "micro_batch": micro,
        "grad_checkpointing": grad_checkpointing,
        "params": n,
        **{f"{name}_gib": gib(value) for name, value in resident.items()},
        "frozen": {name: gib(value) for name, value in profile.frozen.items()},
        "activations_per_sample_gib": gib(profile.activations.per_sample),
        "activations_gib": gib(profile.activations.at(micro)),
        # Each phase's peak above the resident memory at this micro-batch: the forward's and the
        # backward's hold the activations, the rest are temporaries (AdamW's, the SD VAE's).
        "phases_gib": {phase: gib(value) for phase, value in phases.items()},
        "peak_phase": peak_phase,
        "peak_gib": gib(peak),
        "gpu_gib": gpu_gib,
        "usable_gib": round(USABLE * gpu_gib, 2),
        "fits": peak <= USABLE * gpu_gib * GIB,
        "measured_cpu_s": round(profile.cpu_seconds, 1),
    }


def fixes(
    preset: Preset,
    stage: str,
    batch_size: int,
    num_workers: int = 1,
    grad_accum_steps: int = 1,
    grad_checkpointing: bool = False,
    gpu_gib: float = 80.0,
    ema: bool | None = None,
) -> list[dict]:
    """What makes a plan that does not fit fit, each change alone: gradient checkpointing, the fewest
    micro-batches, the fewest workers for the same global batch; when none of them does, the last two
    with checkpointing. Each as {"flags": ..., "peak_gib": ...}."""
    gpu_batch = batch_size // max(1, num_workers)

    def peak(**changes) -> float | None:
        kw = dict(num_workers=num_workers, grad_accum_steps=grad_accum_steps, grad_checkpointing=grad_checkpointing)
        result = plan(preset, stage, batch_size, gpu_gib=gpu_gib, ema=ema, **{**kw, **changes})
        return result["peak_gib"] if result["fits"] else None

    found = []
    if not grad_checkpointing and (gib := peak(grad_checkpointing=True)) is not None:
        found.append({"flags": "--grad-checkpointing", "peak_gib": gib})
    for checkpointing in dict.fromkeys((grad_checkpointing, True)):  # as asked; with checkpointing if none fits
        if found and checkpointing != grad_checkpointing:
            break
        prefix = "--grad-checkpointing " if checkpointing != grad_checkpointing else ""
        for steps in (n for n in range(grad_accum_steps + 1, gpu_batch + 1) if gpu_batch % n == 0):
            if (gib := peak(grad_accum_steps=steps, grad_checkpointing=checkpointing)) is not None:
                found.append({"flags": f"{prefix}--grad-accum-steps {steps}", "peak_gib": gib})
                break
        for workers in range(max(1, num_workers) + 1, batch_size + 1):
            if batch_size % (workers * grad_accum_steps):
                continue
            if (gib := peak(num_workers=workers, grad_checkpointing=checkpointing)) is not None:
                found.append({"flags": f"{prefix}--num-workers {workers}", "peak_gib": gib})
                break
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", required=True, choices=list(PRESETS))
    parser.add_argument("--stage", required=True, choices=STAGES)
    parser.add_argument(
        "--batch-size", type=int, help="global batch (default: the preset's for the stage), over --num-workers GPUs"
    )
    parser.add_argument("--num-workers", type=int, default=1, help="GPUs (data-parallel workers)")
    parser.add_argument("--grad-accum-steps", type=int, default=1, help="micro-batches per optimizer step")
    parser.add_argument("--grad-checkpointing", action="store_true", help="recompute the blocks in the backward pass")
    parser.add_argument("--gpu-gib", type=float, default=80.0, help="memory of one GPU, GiB")
    args = parser.parse_args(argv)
    preset = get_preset(args.preset)
    batch = args.batch_size or (preset.autoencoder_batch_size if args.stage == "autoencoder" else preset.batch_size)
    kw = dict(
        batch_size=batch,
        num_workers=args.num_workers,
        grad_accum_steps=args.grad_accum_steps,
        grad_checkpointing=args.grad_checkpointing,
        gpu_gib=args.gpu_gib,
    )
    try:
        result = plan(preset, args.stage, **kw)
        if not result["fits"]:
            result["fixes"] = fixes(preset, args.stage, **kw)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
