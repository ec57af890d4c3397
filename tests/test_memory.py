"""GPU memory (issue 30, parts 1 and 2): the memory plan, and the options that make the paper presets fit.

- gradient accumulation: N micro-batches give one big batch's gradients and parameters, also
  through DDP (no_sync, gradients in the buckets);
- gradient checkpointing: the same loss and gradients as without, for the DiT and the autoencoder,
  with less kept for the backward;
- the plan: CUDA's autocast policy on CPU tensors, the fake-tensor step against the same step on
  real tensors, the CLI's JSON line, and the driver refusing a batch that cannot fit in one line
  that names the fix (which then passes). Everything runs on the CPU, in this process.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from cmd_model import memory
from cmd_model.autoencoder import VideoAutoencoder
from cmd_model.diffusion import dit_scheduler
from cmd_model.dit import DiT
from cmd_model.layers import checkpointed
from cmd_model.presets import get_preset
from pipelines.training import checkpoint
from pipelines.training.config import ConfigError, TrainConfig
from pipelines.training.gpu_memory import check_gpu_memory
from pipelines.training.loop import Trainee, train_step
from pipelines.training.optim import OptimizerSpec, make_optimizer

# ---------------------------------------------------------------------------------------
# Gradient accumulation
# ---------------------------------------------------------------------------------------


class GivenNoiseMotion:
    """The motion stage's loss (diffusion loss of the motion DiT given the content frame and label)
    with its noise, timesteps and condition dropout taken from the batch instead of drawn, so one
    big batch and its micro-batches see the same ones."""

    def __init__(self, cfg: TrainConfig):
        self.cfg, self.device = cfg, torch.device("cpu")
        self.scheduler = dit_scheduler()

    def loss(self, model, batch):
        x_t = self.scheduler.add_noise(batch["motion"], batch["noise"], batch["t"])
        eps = model(x_t, batch["t"], context=batch["content"], labels=batch["labels"], drop=batch["drop"])
        return F.mse_loss(eps, batch["noise"])


def motion_batch(n: int, seed: int = 0) -> dict:
    preset = get_preset("tiny-pixel")
    g = torch.Generator().manual_seed(seed)
    return {
        "motion": torch.randn(n, *preset.motion_shape, generator=g),
        "noise": torch.randn(n, *preset.motion_shape, generator=g),
        "content": torch.randn(n, *preset.content_shape, generator=g),
        "t": torch.randint(0, 1000, (n,), generator=g),
        "labels": torch.randint(0, 5, (n,), generator=g),
        "drop": torch.tensor([False, True] * (n // 2)),
    }


def trainee(model, accum: int, wrap=lambda m: m) -> Trainee:
    cfg = TrainConfig(
        stage="motion", preset="tiny-pixel", name="t", max_steps=1, latents="l", batch_size=4, grad_accum_steps=accum
    )
    stage = GivenNoiseMotion(cfg)
    state = checkpoint.TrainState(run_id="r", config={})
    # Adam's first step moves every weight by about lr, whatever its gradient: a small lr keeps the
    # comparison about the gradients.
    optimizer = make_optimizer(model.parameters(), 1e-5, OptimizerSpec())  # the motion stage's: AdamW (0.9, 0.999)
    return Trainee(stage, wrap(model), model, None, 0.0, optimizer, state)


def tiny_dit(seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    model = DiT.from_preset_config(get_preset("tiny-pixel").motion)
    # Zero-initialised adaLN gates would leave most gradients exactly zero: start from a trained-like state.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def assert_same_step(a: Trainee, b: Trainee, out_a, out_b) -> None:
    torch.testing.assert_close(out_a[0], out_b[0], rtol=1e-5, atol=1e-6)  # the loss
    torch.testing.assert_close(out_a[1], out_b[1], rtol=1e-5, atol=1e-6)  # the gradient norm
    for (name, pa), pb in zip(a.raw.named_parameters(), b.raw.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-4, atol=1e-7, msg=name)
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("accum", [2, 4])
def test_accumulated_micro_batches_give_one_big_batchs_step(accum):
    big, small = tiny_dit(), tiny_dit()
    one, many = trainee(big, 1), trainee(small, accum)
    batch = motion_batch(4)
    rows = []  # what each forward pass of the accumulating model took
    small.register_forward_hook(lambda module, args, out: rows.append(len(args[0])))
    out_one, out_many = train_step(one, batch, 1e-5, 0), train_step(many, batch, 1e-5, 0)
    assert rows == [4 // accum] * accum  # the batch did go through in micro-batches
    assert_same_step(one, many, out_one, out_many)


def test_accumulation_under_ddp_syncs_once_into_the_buckets(tmp_path):
    """DDP as prepare_model wraps it (gradient_as_bucket_view): no_sync on all micro-batches but the
    last still gives the big batch's gradients (one gloo rank: the reducer, buckets and no_sync run)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        big, small = tiny_dit(), tiny_dit()
        one = trainee(big, 1)
        many = trainee(small, 2, wrap=lambda m: DistributedDataParallel(m, gradient_as_bucket_view=True))
        for step in range(2):  # the second step starts from gradients set to None in the buckets
            batch = motion_batch(4, seed=step)
            assert_same_step(one, many, train_step(one, batch, 1e-5, step), train_step(many, batch, 1e-5, step))
    finally:
        dist.destroy_process_group()


def test_batches_that_do_not_divide_into_micro_batches_are_refused_in_one_line():
    with pytest.raises(ConfigError) as exc:
        TrainConfig(
            stage="motion", preset="tiny", name="t", max_steps=1, latents="l", batch_size=12, num_workers=2,
            grad_accum_steps=4, stable_diffusion="sd",
        )  # fmt: skip
    assert "\n" not in str(exc.value)
    assert "--batch-size 12 is the global batch: it must divide evenly over --num-workers 2 x --grad-accum-steps 4" in (
        str(exc.value)
    )
    with pytest.raises(ConfigError, match="--grad-accum-steps must be a positive integer"):
        TrainConfig(stage="motion", preset="tiny", name="t", max_steps=1, latents="l", grad_accum_steps=0)


# ---------------------------------------------------------------------------------------
# Gradient checkpointing
# ---------------------------------------------------------------------------------------


def saved_bytes(fn) -> int:
    """Bytes autograd keeps for the backward of fn(), each storage once."""
    saved = {}

    def pack(t):
        saved[t.untyped_storage()._cdata] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(saved.values())


def loss_and_grads(model, loss_fn):
    model.zero_grad(set_to_none=True)
    loss, kept = saved_bytes(lambda: loss_fn(model))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, kept


@pytest.mark.parametrize("kind", ["dit", "autoencoder"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(kind):
    preset = get_preset("tiny-pixel")
    torch.manual_seed(0)
    if kind == "dit":
        model = tiny_dit()
        batch = motion_batch(2)
        loss_fn = lambda m: F.mse_loss(  # noqa: E731
            m(batch["motion"], batch["t"], context=batch["content"], labels=batch["labels"], drop=batch["drop"]),
            batch["noise"],
        )
    else:
        model = VideoAutoencoder.from_preset_config(dataclasses.replace(preset.autoencoder, depth=2))
        video = torch.rand(2, *preset.content_shape[:1], preset.autoencoder.num_frames, *preset.latent_size) * 2 - 1
        loss_fn = lambda m: F.mse_loss(m(video), video)  # noqa: E731
    checkpointing = copy.deepcopy(model)
    checkpointing.enable_gradient_checkpointing(checkpointed)
    loss, grads, kept = loss_and_grads(model, loss_fn)
    loss_c, grads_c, kept_c = loss_and_grads(checkpointing, loss_fn)
    torch.testing.assert_close(loss_c, loss, rtol=0, atol=0)
    assert grads_c.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], rtol=1e-5, atol=1e-7, msg=name)
    assert kept_c < kept / 2, (kept_c, kept)  # and it did keep less: the blocks' insides are recomputed
    with torch.no_grad():  # evaluation (no gradients) runs the blocks plainly
        assert torch.equal(loss_fn(checkpointing), loss_fn(model))


# ---------------------------------------------------------------------------------------
# The memory plan
# ---------------------------------------------------------------------------------------


def test_cuda_autocast_policy_keeps_what_cuda_keeps():
    """A UNet resnet's start, conv -> GroupNorm -> SiLU: CUDA's autocast runs GroupNorm in float32, so
    what GroupNorm keeps (a float32 copy of the bf16 conv output) and what SiLU keeps (GroupNorm's
    float32 output) take 4 bytes an element; CPU's autocast alone keeps both in bf16."""
    conv, norm = torch.nn.Conv2d(4, 32, 3, padding=1), torch.nn.GroupNorm(8, 32)
    x = torch.randn(2, 4, 16, 16)

    def step():
        return F.silu(norm(conv(x))).mean()

    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, cpu_only = saved_bytes(step)
        with memory.CudaAutocast():
            _, as_cuda = saved_bytes(step)
    elements = 2 * 32 * 16 * 16
    assert as_cuda - cpu_only == 2 * elements * (4 - 2)


@pytest.mark.parametrize("stage", ["autoencoder", "content", "motion"])
def test_the_fake_step_measures_what_the_real_step_holds(stage):
    """The plan's step on fake tensors against the same step on real CPU tensors (tiny preset): the
    same activations, saved tensors and phase peaks, to the byte."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    preset = get_preset("tiny")

    def measure():
        parts = memory.stage_parts(preset, stage)
        params = list(parts.model.train().parameters())
        optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=True)
        for p in params:
            p.grad = torch.zeros_like(p)
        optimizer.step()
        return memory._step(parts, optimizer, 2, evaluate=True)

    with FakeTensorMode(allow_non_fake_inputs=True):
        fake = measure()
    real = measure()  # uninitialised weights: the values do not matter, the storages do
    activations, saved, phases = fake
    assert activations > 0 and saved > 0 and set(phases) == set(memory.PHASES)
    # One known difference: the CPU's mse_loss returns its 0-dim mean in the storage of its
    # element-wise buffer (the model output's size in fp32; 48 KiB here, a few MiB at 512x1024), the
    # meta kernel in 4 bytes.
    ae = preset.autoencoder
    output = {"autoencoder": (ae.in_channels, ae.num_frames, *preset.latent_size), "content": preset.content_shape}
    buffer = 4 * 2 * math.prod(output.get(stage, preset.motion_shape))  # micro-batch 2, fp32
    assert real[1] == fake[1]
    for phase, held in {"activations": (real[0], fake[0]), **{k: (real[2][k], fake[2][k]) for k in fake[2]}}.items():
        assert held[0] - held[1] in (0, buffer - 4), (phase, real, fake)


def test_the_plan_adds_up_and_checkpointing_lowers_the_peak():
    preset = get_preset("shapes-pixel")
    full = memory.plan(preset, "motion", batch_size=512, num_workers=2)
    ckpt = memory.plan(preset, "motion", batch_size=512, num_workers=2, grad_checkpointing=True)
    accum = memory.plan(preset, "motion", batch_size=512, num_workers=2, grad_accum_steps=4)
    n = full["params"]
    assert (full["weights_gib"], full["optimizer_gib"]) == (round(4 * n / 2**30, 2), round(8 * n / 2**30, 2))
    assert full["gpu_batch"] == 256 and accum["micro_batch"] == 64 and full["ddp_buckets_gib"] == 0
    per_sample = {c: memory.step_profile(preset, "motion", c).activations.per_sample for c in (False, True)}
    assert 0 < per_sample[True] < per_sample[False] / 2
    assert ckpt["peak_gib"] < full["peak_gib"] and accum["peak_gib"] < full["peak_gib"]
    with pytest.raises(memory.PlanError, match="does not divide"):
        memory.plan(preset, "motion", batch_size=512, num_workers=3)


def test_the_cli_prints_one_json_line(capsys):
    assert memory.main(["--preset", "tiny", "--stage", "content", "--batch-size", "8", "--num-workers", "2"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    plan = json.loads(line)
    assert plan["gpu_batch"] == 4 and plan["fits"] and set(plan["frozen"]) == {"vae", "text_encoder"}
    assert plan["peak_gib"] >= plan["weights_gib"] + plan["gradients_gib"] + plan["optimizer_gib"] + plan["ema_gib"]


def gpu_job(gpu_gib: float, **flags) -> TrainConfig:
    return TrainConfig(
        stage="motion", preset="shapes-pixel", name="m", max_steps=1, latents="l", batch_size=1024, num_workers=2,
        use_gpu=True, gpu_gib=gpu_gib, **flags,
    )  # fmt: skip


def test_the_driver_refuses_a_batch_that_cannot_fit_and_names_the_fix():
    preset = get_preset("shapes-pixel")
    full = memory.plan(preset, "motion", batch_size=1024, num_workers=2)
    ckpt = memory.plan(preset, "motion", batch_size=1024, num_workers=2, grad_checkpointing=True)
    gpu_gib = (full["peak_gib"] + ckpt["peak_gib"]) / 2 / memory.USABLE  # fits only with checkpointing
    with pytest.raises(ConfigError) as exc:
        check_gpu_memory(gpu_job(gpu_gib))
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith(
        "--use-gpu: the motion stage of shapes-pixel at 512 a forward pass (--batch-size 1024 over"
    )
    for fix in ("--grad-checkpointing (", "--grad-accum-steps 2 (", "--num-workers 4 ("):
        assert fix in message, message
    # Each named fix passes the same check.
    assert check_gpu_memory(gpu_job(gpu_gib, grad_checkpointing=True))["fits"]
    assert check_gpu_memory(gpu_job(gpu_gib, grad_accum_steps=2))["fits"]
    assert check_gpu_memory(gpu_job(gpu_gib).replace(num_workers=4))["fits"]
    # A GPU too small for any of them: the job says so.
    with pytest.raises(ConfigError, match=r"even one sample a GPU with --grad-checkpointing needs .* more memory"):
        check_gpu_memory(gpu_job(0.001))
    # Without --use-gpu there is no GPU to fit: no plan, no refusal.
    assert check_gpu_memory(gpu_job(gpu_gib).replace(use_gpu=False)) is None
