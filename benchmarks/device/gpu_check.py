"""One prepared GPU check (issue 30, part 6): one JSON line per result, in under 8 minutes on one H100.

    bash benchmarks/device/gpu_check.sh                      # a lent GPU machine (the kit: make_kit.sh)
    bash benchmarks/device/gpu_check.sh --cpu                # anywhere: the same checks, sized for a CPU
    python benchmarks/device/gpu_check.py --cpu --only env,ddp_agree

Checks, in this order; each runs in a process of its own under a time budget, so one that fails,
hangs or crashes prints {"check": ..., "error": ...} and the others still run. Every line has
"ok"; the last line is the summary, and the exit code is 1 when any line is not ok.
1. env             driver, CUDA, cuDNN, NCCL (an all-reduce on one rank), bf16 (a matmul: finite,
                   TFLOP/s) and the packages the checks import
2. memory_plan     each paper preset and stage at one batch: cmd_model.memory's plan against
                   torch.cuda.max_memory_allocated over the plan's own step (its stage_parts: the same
                   models, frozen models in bf16, AdamW, the EMA copy, rank 0's evaluation) on real CUDA
                   tensors, phase by phase; ok within 15%. With cores to spare, the plans are worked
                   out in other processes while the GPU measures
3. ddp_agree       two Ray Train workers sharing the GPU (half a GPU each, gloo: NCCL refuses two ranks
                   on one device) build every stage's model with the loop's build_trainee (DDP through
                   prepare_model) and take a few train_steps, each on its own data: their weights must
                   agree, and have moved
4. tiny_chain      the tiny preset end to end: VAE -> autoencoder -> precompute (Ray Data, the encoder
                   actor on the GPU) -> content -> motion -> generate, eager and compiled, bf16 and fp16:
                   every loss, evaluation and video finite
5. paper_sampling  benchmarks/sampling.py's run_cmd at the paper's setting (webvid-sd21-512x1024:
                   16x512x1024, 50 + 50 DDIM steps, fp16, batch 1, SD decoder excluded), eager (and
                   compiled with --sampling-compile MODE), against the paper's 3.13 s and 5.56 GB (A100-40GB)

The training stages of the chain run in this process, not as jobs: the jobs log to MLflow, which the
device lacks (mlflow and its server stack would not fit the 64 MiB that travels), and Ray Train's
local mode, the in-process one, refuses the GPU. So the chain calls what a Ray Train worker runs
(the stage's prepare, dataset, model and export; the loop's batches, train_step and evaluate) with
its evaluation's images and videos counted instead of logged. Precompute is the real job (Ray Data).

--cpu runs every check on the CPU: env without the GPU's parts; memory_plan prints the plans with
measured null (a CPU has no CUDA allocator to measure); ddp_agree on two CPU workers; the chain with
torch.compile's default mode (reduce-overhead is CUDA graphs); paper_sampling at the tiny preset,
same step counts, float32 (fp16 on a CPU is emulated). Nothing is downloaded: HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GIB = 2**30
CHECKS = ("env", "memory_plan", "ddp_agree", "tiny_chain", "paper_sampling")
# Seconds a check may take before it is killed: on one H100 (their sum is above the run's 8 minutes,
# which the run's deadline holds: a check gets what is left when less) and on a 2-core CPU.
BUDGET_S = {
    "gpu": {"env": 60, "memory_plan": 150, "ddp_agree": 120, "tiny_chain": 240, "paper_sampling": 150},
    "cpu": {"env": 120, "memory_plan": 400, "ddp_agree": 400, "tiny_chain": 900, "paper_sampling": 400},
}
RUN_MINUTES = {"gpu": 8.0, "cpu": 30.0}
PAPER_PRESETS = ("ucf101-64", "webvid-sd15-512", "webvid-sd21-512x1024")
WITHIN = 0.15  # the plan's peak against the measured one
# Modules the checks import that the GPU machine's image may lack (the kit brings ray, diffusers,
# decord, av and scenedetect); by import name.
MODULES = ("ray", "diffusers", "transformers", "timm", "einops", "safetensors", "av", "decord", "scenedetect", "cv2")
PAPER_SAMPLING = {"paper_seconds_a100": 3.13, "paper_gb_a100": 5.56}  # Table 9: 16x512x1024, 50 + 50 steps, fp16


# ---------------------------------------------------------------------------------------
# The run: each check in a process of its own
# ---------------------------------------------------------------------------------------


def run_isolated(name: str, timeout: float, args: argparse.Namespace) -> list[dict]:
    """The check's lines, from a child process given `timeout` seconds; an error line when it fails,
    crashes or runs over (then its whole process group is killed: Ray's processes, compile workers)."""
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        results = Path(tmp) / "lines.jsonl"
        results.touch()
        command = [sys.executable, __file__, "--check", name, "--results", str(results)]
        command += child_flags(args)
        # Its output goes to stderr: stdout holds the JSON lines alone.
        child = subprocess.Popen(command, stdout=sys.stderr, start_new_session=True)
        try:
            code = child.wait(timeout=timeout)
            error = None if code == 0 else f"exited with code {code}"
        except subprocess.TimeoutExpired:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()
            error = f"over its budget of {timeout:.3g} s: killed"
        lines = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    if error and not any("error" in line for line in lines):
        lines.append({"check": name, "error": error, "ok": False})
    return lines


def child_flags(args: argparse.Namespace) -> list[str]:
    flags = ["--memory-batch", str(args.memory_batch)]
    if args.steps:
        flags += ["--steps", str(args.steps)]
    if args.sampling_compile:
        flags += ["--sampling-compile", args.sampling_compile]
    return flags + (["--cpu"] if args.cpu else [])


def run_all(args: argparse.Namespace) -> int:
    kind = "cpu" if args.cpu else "gpu"
    # Inherited by every child and by the Ray workers they start: nothing reaches the Hub, and the
    # workers import this checkout's packages.
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", RAY_DATA_DISABLE_PROGRESS_BARS="1")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    start = time.monotonic()
    deadline = start + 60 * (args.minutes or RUN_MINUTES[kind])
    failed, seconds = [], {}  # seconds per check: what sizes the budgets
    for name in args.only:
        began = time.monotonic()
        timeout = min(BUDGET_S[kind][name], deadline - began)
        if timeout < 10:
            lines = [{"check": name, "error": "not run: the run's time is spent", "ok": False}]
        else:
            lines = run_isolated(name, timeout, args)
        seconds[name] = round(time.monotonic() - began, 1)
        for line in lines:
            print(json.dumps(line), flush=True)
        if not all(line.get("ok") for line in lines):
            failed.append(name)
    total = round(time.monotonic() - start, 1)
    summary = {"check": "summary", "seconds": total, "checks_s": seconds, "failed": failed, "ok": not failed}
    print(json.dumps(summary), flush=True)
    return 1 if failed else 0


def run_check(args: argparse.Namespace) -> int:
    """In the child: one check, its lines appended to --results as they come."""
    import torch

    import pipelines  # noqa: F401 - first: it sets Ray's auth mode before any check imports Ray

    cuda = not args.cpu and torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    with open(args.results, "a") as results:

        def emit(**fields) -> None:
            results.write(json.dumps({"check": args.check, **fields, "device": device}, default=str) + "\n")
            results.flush()

        try:
            if not args.cpu and not cuda:
                raise RuntimeError("no CUDA device: pass --cpu to run the checks on the CPU")
            CHECK_FUNCTIONS[args.check](args, emit)
        except Exception as exc:
            traceback.print_exc()
            emit(error=one_line(exc), ok=False)
            return 1
    return 0


def one_line(exc: BaseException) -> str:
    """The error's last line (Ray's errors wrap the worker's traceback, whose last line is the original)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:500]


def torch_device(args: argparse.Namespace):
    import torch

    return torch.device("cpu" if args.cpu else "cuda")


def start_ray(cuda: bool, reserve_cpus: float) -> None:
    """A local Ray as the jobs start one (pipelines.platform.cluster.ensure_ray); on the GPU machine it
    must see the GPU, or what asks for one would wait for it until the budget ran out."""
    import ray

    from pipelines.platform.cluster import ensure_ray

    ensure_ray(reserve_cpus=reserve_cpus)
    if cuda and ray.cluster_resources().get("GPU", 0) < 1:
        ray.shutdown()
        raise RuntimeError(f"the local Ray sees no GPU: {ray.cluster_resources()}")


# ---------------------------------------------------------------------------------------
# 1. env
# ---------------------------------------------------------------------------------------


def check_env(args: argparse.Namespace, emit) -> None:
    import importlib

    import torch

    versions, missing = {}, []
    for module in MODULES:
        try:
            versions[module] = getattr(importlib.import_module(module), "__version__", "?")
        except Exception as exc:  # a missing package, or one that fails to import here
            versions[module] = None
            missing.append(f"{module} ({one_line(exc)})")
    line = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_available": torch.cuda.is_available(),
        "hf_hub_offline": os.environ.get("HF_HUB_OFFLINE") == "1",
        "cpus": os.cpu_count(),
        "packages": versions,
        "missing": missing,
    }
    device = torch_device(args)
    ok = not missing
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(0)
        nccl = torch.cuda.nccl.version()
        line.update(
            gpu=props.name,
            capability=f"{props.major}.{props.minor}",
            gpu_gib=round(props.total_memory / GIB, 1),
            multiprocessors=props.multi_processor_count,
            driver=nvidia_smi("driver_version"),
            cuda_runtime=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
            nccl=".".join(map(str, nccl)) if isinstance(nccl, tuple) else str(nccl),
            bf16_supported=torch.cuda.is_bf16_supported(),
            nccl_all_reduce=nccl_all_reduce(),
        )
        ok = ok and line["bf16_supported"] and line["nccl_all_reduce"] is True
    line.update(bf16_matmul(device))
    emit(**line, ok=bool(ok and line["bf16_finite"]))


def nvidia_smi(field: str) -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={field}", "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None


def nccl_all_reduce() -> bool | str:
    """True when NCCL initialises and all-reduces on this GPU (one rank: two on one device is what
    NCCL refuses), else what went wrong."""
    import torch
    import torch.distributed as dist

    try:
        with tempfile.TemporaryDirectory() as tmp:
            dist.init_process_group("nccl", init_method=f"file://{tmp}/store", rank=0, world_size=1)
            try:
                x = torch.ones(1 << 20, device="cuda")
                dist.all_reduce(x)
                torch.cuda.synchronize()
                return bool((x == 1).all())
            finally:
                dist.destroy_process_group()
    except Exception as exc:
        traceback.print_exc()
        return one_line(exc)


def bf16_matmul(device) -> dict:
    """A bf16 matrix product: finite, and its TFLOP/s (8192^3 on a GPU, the mean of 10 after a warm-up)."""
    import torch

    n = 8192 if device.type == "cuda" else 512
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    c = a @ b
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for _ in range(10):
        c = a @ b
    sync()
    seconds = (time.perf_counter() - start) / 10
    return {"bf16_finite": bool(torch.isfinite(c).all()), "bf16_tflops": round(2 * n**3 / seconds / 1e12, 1)}


# ---------------------------------------------------------------------------------------
# 2. memory_plan
# ---------------------------------------------------------------------------------------


class Later:
    """A call made when its result is asked for: a future's interface where nothing runs beside it."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def result(self):
        return self.fn(*self.args)


def plan_of(preset: str, stage: str, batch: int, gpu_gib: float) -> dict:
    """cmd_model.memory's plan of one stage on one GPU (fake tensors: CPU work, no GPU)."""
    from cmd_model.memory import plan
    from cmd_model.presets import get_preset

    return plan(get_preset(preset), stage, batch, gpu_gib=gpu_gib)


def check_memory_plan(args: argparse.Namespace, emit) -> None:
    import torch

    from cmd_model.memory import STAGES
    from cmd_model.presets import get_preset

    device = torch_device(args)
    cuda = device.type == "cuda"
    gpu_gib = torch.cuda.get_device_properties(0).total_memory / GIB if cuda else 80.0
    jobs = [(preset, stage) for preset in PAPER_PRESETS for stage in STAGES]
    batch = args.memory_batch
    # A plan is seconds of single-threaded Python (FakeTensorMode): where there are cores to spare
    # (16 on the GPU machine), worked out in other processes, one a core pair, while this one
    # measures on the GPU. Spawned: this one holds CUDA.
    processes = min(len(jobs), (os.cpu_count() or 1) // 2)
    with contextlib.ExitStack() as stack:
        if processes > 1:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            spawn = multiprocessing.get_context("spawn")
            pool = stack.enter_context(ProcessPoolExecutor(processes, mp_context=spawn))
            plans = {job: pool.submit(plan_of, *job, batch, gpu_gib) for job in jobs}
        else:
            plans = {job: Later(plan_of, *job, batch, gpu_gib) for job in jobs}
        for preset, stage in jobs:
            line = {"preset": preset, "stage": stage, "batch": batch}
            try:
                measured = measure_step(get_preset(preset), stage, batch, device) if cuda else None
                planned = plans[preset, stage].result()
            except Exception as exc:
                traceback.print_exc()
                emit(**line, error=one_line(exc), ok=False)
                continue
            resident = sum(planned[f"{k}_gib"] for k in ("weights", "gradients", "optimizer", "ema", "frozen"))
            line.update(
                plan_gib=planned["peak_gib"],
                plan_phase=planned["peak_phase"],
                plan_resident_gib=round(resident, 2),
                plan_phases_gib=planned["phases_gib"],
                plan_cpu_s=planned["measured_cpu_s"],
                fits=planned["fits"],
            )
            if measured is None:
                emit(**line, measured_gib=None, measured="not on a CPU: it needs CUDA's allocator", ok=True)
                continue
            ratio = measured["peak_gib"] / planned["peak_gib"]
            within = abs(ratio - 1) <= WITHIN
            emit(
                **line,
                measured_gib=measured["peak_gib"],
                measured_phase=measured["peak_phase"],
                measured_resident_gib=measured["resident_gib"],
                measured_phases_gib=measured["phases_gib"],
                ratio=round(ratio, 3),
                within_15pct=within,
                ok=within,
            )


def measure_step(preset, stage: str, batch: int, device) -> dict:
    """The plan's step (cmd_model.memory.stage_parts) on real CUDA tensors, after one step that makes
    AdamW's states and the gradients: the peak of torch.cuda.max_memory_allocated (GiB), in which
    phase, the resident memory at the step's start, and each phase's peak above it, as the plan's."""
    import gc

    import torch

    from cmd_model import memory

    gc.collect()
    torch.cuda.empty_cache()
    with torch.device(device):  # every tensor stage_parts and its step make: on the GPU
        parts = memory.stage_parts(preset, stage)
        with torch.no_grad():  # stage_parts leaves the weights uninitialised: DiT-like values instead
            for module in (parts.model, *parts.frozen.values()):
                for p in module.parameters():
                    p.normal_(0.0, 0.02)
        model = parts.model.train()
        params = list(model.parameters())
        optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, foreach=True)
        ema = [p.detach().clone() for p in params] if stage in memory.EMA_STAGES else None  # fp32, as make_ema
        for _ in range(2):
            resident, peaks = cuda_step(parts, params, optimizer, ema, batch)
    top = max(peaks, key=peaks.get)
    gib = lambda b: round(b / GIB, 2)  # noqa: E731
    return {
        "peak_gib": gib(peaks[top]),
        "peak_phase": top,
        "resident_gib": gib(resident),
        "phases_gib": {phase: gib(peak - resident) for phase, peak in peaks.items()},
    }


def cuda_step(parts, params, optimizer, ema, batch: int) -> tuple[int, dict[str, int]]:
    """One training step and rank 0's evaluation, as cmd_model.memory._step runs them on fake tensors:
    (bytes allocated at its start, the peak bytes allocated in each phase)."""
    import torch

    peaks: dict[str, int] = {}

    @contextlib.contextmanager
    def phase(name: str):
        torch.cuda.reset_peak_memory_stats()
        yield
        peaks[name] = torch.cuda.max_memory_allocated()

    # Gradients kept (zeroed), not freed: DDP's buckets hold them from the first step on, and the
    # plan counts them resident.
    optimizer.zero_grad(set_to_none=False)
    torch.cuda.synchronize()
    resident = torch.cuda.memory_allocated()
    with phase("inputs"):
        loaded = parts.batch(batch)  # kept to the optimizer's phase, as the plan keeps it
        with torch.no_grad():
            inputs = parts.prepare(loaded)
    with phase("forward"), torch.autocast("cuda", dtype=torch.bfloat16):
        loss = parts.loss(parts.model, inputs)
    with phase("backward"):
        loss.backward()
        del loss
    with phase("optimizer"):
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if ema is not None:
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1e-3)  # loop.update_ema, in place
        del loaded, inputs
    if parts.evaluate is not None:
        with phase("evaluation"), torch.no_grad():
            parts.evaluate()
    torch.cuda.synchronize()
    return resident, peaks


# ---------------------------------------------------------------------------------------
# 3. ddp_agree
# ---------------------------------------------------------------------------------------

DDP_STEPS = 3
DDP_ROWS = 2  # each worker's batch
DDP_CASES = {  # name: (stage, preset); tests/test_ddp_stages.py trains the same cases on the CPU
    "vae": ("vae", "tiny"),
    "autoencoder-latent": ("autoencoder", "tiny"),
    "autoencoder-pixel": ("autoencoder", "tiny-pixel"),
    "content-latent": ("content", "tiny"),  # SD's UNet
    "content-pixel": ("content", "tiny-pixel"),  # the class-conditional DiT
    "motion-latent": ("motion", "tiny"),
    "motion-pixel": ("motion", "tiny-pixel"),
}


def ddp_batch(stage: str, preset: str, rank: int, step: int) -> dict:
    """Rank `rank`'s batch at `step`, as the stage's collate hands it over: its own data, on the CPU."""
    import torch

    from cmd_model.presets import get_preset
    from pipelines.data.latent_shards import CONTENT, MOTION
    from pipelines.data.video.schema import CAPTION, FRAMES, LABEL

    g = torch.Generator().manual_seed(1000 * rank + step)
    p = get_preset(preset)
    if stage in ("vae", "autoencoder"):  # the VAE sees single frames: small ones keep it cheap
        size = (2, 32, 32) if stage == "vae" else (p.autoencoder.num_frames, *p.video_size)
        return {FRAMES: torch.randint(0, 256, (DDP_ROWS, *size, 3), dtype=torch.uint8, generator=g)}
    batch = {CONTENT: torch.randn(DDP_ROWS, *p.content_shape, generator=g)}
    if stage == "motion":
        batch[MOTION] = torch.rand(DDP_ROWS, *p.motion_shape, generator=g) * 2 - 1
    if p.mode == "latent":
        batch[CAPTION] = [f"clip {int(i)}" for i in torch.randint(0, 1000, (DDP_ROWS,), generator=g)]
    else:
        batch[LABEL] = torch.randint(0, getattr(p, stage).num_classes, (DDP_ROWS,), generator=g)
    return batch


def ddp_worker(config: dict) -> None:
    """Ray Train's train_loop_per_worker: every case through build_trainee and train_step, then the
    ranks' weights gathered on every rank; rank 0 writes one line per case to config["lines"] (the
    driver's machine: Ray Train V2 keeps the metrics of reports with a checkpoint only)."""
    import ray.train
    import ray.train.torch
    import torch
    import torch.distributed as dist

    from pipelines.data.video.schema import FRAMES
    from pipelines.training.config import VIDEO_STAGES, TrainConfig
    from pipelines.training.loop import build_trainee, train_step
    from pipelines.training.stage import to_device

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    lines = []
    for case, (stage, preset) in DDP_CASES.items():
        data = {"input": "videos/"} if stage in VIDEO_STAGES else {"latents": "latents/"}
        cfg = TrainConfig(
            stage=stage,
            preset=preset,
            name=f"gpu-check-{case}",
            max_steps=DDP_STEPS,
            num_workers=world,
            batch_size=DDP_ROWS * world,
            use_gpu=device.type == "cuda",
            stable_diffusion=config["sd"],
            storage=config["storage"],
            **data,
        )
        try:
            trainee = build_trainee(cfg, {"plan": {}, "run_id": None, "config": {}}, device, rank)
            before = flat_weights(trainee.raw)
            torch.manual_seed(cfg.seed + 1000 * rank)  # each rank its own noise (loop.train_loop)
            trainee.model.train()
            for step in range(DDP_STEPS):
                batch = ddp_batch(stage, preset, rank, step)
                if FRAMES not in batch:  # frames go to the device in the stage's loss; latents come there
                    batch = to_device(batch, device)
                loss, _ = train_step(trainee, batch, cfg.learning_rate, step)
            after = flat_weights(trainee.raw)
            ranks = [torch.empty_like(after) for _ in range(world)]
            dist.all_gather(ranks, after)  # CPU tensors: gloo
            lines.append(
                {
                    "case": case,
                    "stage": stage,
                    "preset": preset,
                    "workers": world,
                    "backend": dist.get_backend(),
                    "worker_device": str(device),
                    "params": after.numel(),
                    "max_abs_diff": max(float((r - ranks[0]).abs().max()) for r in ranks),
                    "moved": float((after - before).abs().max()),
                    "loss": float(loss),
                }
            )
        except Exception as exc:  # the same code on both ranks: they fail alike, and the next case goes on
            traceback.print_exc()
            lines.append({"case": case, "stage": stage, "preset": preset, "error": one_line(exc)})
    if rank == 0:
        Path(config["lines"]).write_text(json.dumps(lines))


def flat_weights(model):
    """Every floating-point tensor of the model's state, as one float32 CPU vector."""
    import torch

    state = model.state_dict().values()
    return torch.cat([v.detach().float().flatten().cpu() for v in state if v.is_floating_point()])


def check_ddp_agree(args: argparse.Namespace, emit) -> None:
    import ray
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from cmd_model.content import build_tiny_sd
    from cmd_model.presets import get_preset

    cuda = torch_device(args).type == "cuda"
    with tempfile.TemporaryDirectory(prefix="gpu_check_ddp_") as tmp:
        sd = build_tiny_sd(Path(tmp) / "sd", text_dim=get_preset("tiny").motion.text_dim)
        lines = Path(tmp) / "lines.json"
        start_ray(cuda, reserve_cpus=2)
        try:
            trainer = TorchTrainer(
                ddp_worker,
                train_loop_config={"sd": str(sd), "storage": str(Path(tmp) / "runs"), "lines": str(lines)},
                # Both workers on the one GPU, half of it each; gloo, which (unlike NCCL) takes two
                # ranks on one device and all-reduces CUDA tensors.
                scaling_config=ray.train.ScalingConfig(
                    num_workers=2, use_gpu=cuda, resources_per_worker={"CPU": 1, **({"GPU": 0.5} if cuda else {})}
                ),
                torch_config=TorchConfig(backend="gloo", timeout_s=180),
                run_config=ray.train.RunConfig(name="gpu-check-ddp", storage_path=str(Path(tmp) / "ray")),
            )
            trainer.fit()
        finally:
            ray.shutdown()
        results = json.loads(lines.read_text())
    for line in results:
        agree = "error" not in line and line["max_abs_diff"] == 0.0 and line["moved"] > 0
        emit(**line, agree=agree if "error" not in line else None, ok=agree)


# ---------------------------------------------------------------------------------------
# 4. tiny_chain
# ---------------------------------------------------------------------------------------

CHAIN_STEPS = {"gpu": 10, "cpu": 4}  # optimizer steps per training stage: a check that it runs, not that it learns
CHAIN_VIDEOS = (4, 4)  # moving-shapes videos per class, classes: 16 videos, 16 clips


class NoTracking:
    """loop.evaluate's logger: what a stage's evaluation would log, counted, nothing sent."""

    def __init__(self):
        self.logged = Counter()

    def send(self) -> None:
        pass

    def metrics(self, values: dict, step: int) -> None:
        self.logged["metrics"] += 1

    def image(self, *args, **kwargs) -> None:
        self.logged["images"] += 1

    def video(self, *args, **kwargs) -> None:
        self.logged["videos"] += 1


def train_in_process(cfg, device, folder: Path) -> dict:
    """One training stage as a Ray Train worker runs it, in this process on `device`: the stage's
    prepare, dataset (Ray Data), model and export; the loop's batches, train_step and evaluate."""
    import torch

    from pipelines.training.loop import Trainee, batches, evaluate, train_step
    from pipelines.training.optim import make_ema, make_optimizer
    from pipelines.training.stage import get_stage

    stage_cls = get_stage(cfg.stage)
    plan = stage_cls.prepare(cfg)
    torch.manual_seed(cfg.seed)
    stage = stage_cls(cfg, plan, device)
    raw = stage.model.to(device)
    spec = stage_cls.optimizer
    ema = make_ema(raw) if spec.ema_decay else None
    optimizer = make_optimizer(raw.parameters(), cfg.learning_rate, spec)
    trainee = Trainee(stage, raw, raw, ema, spec.ema_decay or 0.0, optimizer, None)
    data = batches(
        stage_cls.dataset(cfg, plan), cfg.worker_batch, stage.collate(), device, cfg.seed, stage.rows_per_fetch
    )
    raw.train()
    losses = [train_step(trainee, next(data), cfg.learning_rate, step)[0] for step in range(cfg.max_steps)]
    logger = NoTracking()
    metrics = evaluate(stage, trainee.evaluated_model, cfg.max_steps, logger)
    stage.export(trainee.evaluated_model, folder)
    losses = torch.stack(losses).float().cpu()
    finite = bool(torch.isfinite(losses).all()) and all(math.isfinite(v) for v in metrics.values())
    return {
        "loss_first": round(float(losses[0]), 4),
        "loss_last": round(float(losses[-1]), 4),
        "eval": {k: round(v, 4) for k, v in metrics.items()},
        "logged": dict(logger.logged),
        "finite": finite,
    }


def check_tiny_chain(args: argparse.Namespace, emit) -> None:
    import ray
    import torch

    from cmd_model.content import build_tiny_sd
    from cmd_model.presets import get_preset
    from pipelines.data.synthetic_videos import make_shapes_dataset
    from pipelines.training.config import TrainConfig

    device = torch_device(args)
    cuda = device.type == "cuda"
    preset = get_preset("tiny")
    steps = args.steps or CHAIN_STEPS["gpu" if cuda else "cpu"]
    decoders = 4 if cuda else 1  # Ray Data's decode tasks beside this process
    if cuda:  # as loop.train_loop sets it
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    def record(step: str, run) -> dict:
        """run() as the chain's `step`: its line, with its seconds; a result that is not finite ends the chain."""
        start = time.perf_counter()
        result = run()
        emit(step=step, **result, seconds=round(time.perf_counter() - start, 1), ok=result["finite"])
        if not result["finite"]:
            raise RuntimeError(f"{step}: a loss, an evaluation or a latent is not finite")
        return result

    with tempfile.TemporaryDirectory(prefix="gpu_check_chain_") as tmp:
        work = Path(tmp)
        manifest = make_shapes_dataset(work / "videos", *CHAIN_VIDEOS, size=preset.video_size)
        with open(manifest) as f:
            prompts = sorted({row["caption"] for row in csv.DictReader(f)})[:2]
        common = dict(
            preset=preset.name,
            storage=str(work / "runs"),
            max_steps=steps,
            batch_size=preset.batch_size,
            num_workers=1,
            use_gpu=cuda,
            eval_samples=2,
        )

        def train(stage: str, **fields) -> Path:
            cfg = TrainConfig(stage=stage, name=f"gpu-check-{stage}", **common, **fields)
            record(stage, lambda: {"steps": steps, **train_in_process(cfg, device, work / stage)})
            return work / stage

        start_ray(cuda, reserve_cpus=1)
        try:
            base = build_tiny_sd(work / "base-sd", text_dim=preset.motion.text_dim)
            sd = train("vae", input=str(manifest), stable_diffusion=str(base), decoders=decoders)
            ae = train("autoencoder", input=str(manifest), stable_diffusion=str(sd), decoders=decoders)
            latents = work / "latents"
            record("precompute", lambda: precompute(preset, manifest, ae, sd, latents, cuda, decoders))
            content = train("content", latents=str(latents), stable_diffusion=str(sd))
            motion = train("motion", latents=str(latents), autoencoder=str(ae), stable_diffusion=str(sd))
        finally:
            ray.shutdown()
        compiled = "reduce-overhead" if cuda else "default"  # CUDA graphs on the GPU; Inductor alone on a CPU
        for mode in (None, compiled):
            for precision in ("bfloat16", "float16"):
                line = {"step": "generate", "compile": mode or "eager", "precision": precision, "prompts": len(prompts)}
                try:
                    line.update(generate(preset, ae, content, motion, sd, prompts, mode, precision, device))
                except Exception as exc:  # CMDGenerator refuses videos that are not finite, in one line
                    traceback.print_exc()
                    emit(**line, finite=False, error=one_line(exc), ok=False)
                    continue
                emit(**line, finite=True, ok=True)


def precompute(preset, manifest: Path, ae: Path, sd: Path, output: Path, cuda: bool, decoders: int) -> dict:
    """The precompute job (Ray Data: decode tasks, the encoder actor on the GPU, a shard sink), and
    whether every latent it wrote is finite."""
    import numpy as np
    import pyarrow.parquet as pq

    from pipelines.data.latent_shards import CONTENT, MOTION
    from pipelines.data.precompute import PrecomputeConfig, actor_counts, run
    from pipelines.training.data import latent_files

    cfg = PrecomputeConfig(
        input=str(manifest),
        output=str(output),
        autoencoder=str(ae),
        preset=preset,
        stable_diffusion=str(sd),
        use_gpu=cuda,
        encoders=1,
        decoders=decoders,
    )
    actors = actor_counts(cfg.decoders, cfg.writers, use_gpu=cfg.use_gpu, encoders=cfg.encoders, preset=preset)
    summary = run(cfg)
    finite = summary["clips_total"] > 0
    for file in latent_files(str(output)):
        table = pq.read_table(file, columns=[CONTENT, MOTION])
        finite &= all(
            bool(np.isfinite(table.column(c).combine_chunks().to_numpy_ndarray()).all()) for c in (CONTENT, MOTION)
        )
    return {
        "clips": summary["clips_total"],
        "failed_videos": summary["videos_failed"],
        "encoder_gpus": actors["gpus"],  # what each encoder actor asks Ray for: 1, the GPU
        "finite": finite,
    }


def generate(preset, ae, content, motion, sd, prompts, mode, precision, device) -> dict:
    """The generator from the chain's folders, as jobs/generate.py loads it; two calls: the first
    compiles when `mode` is set."""
    from cmd_model.generate import CMDGenerator
    from cmd_model.speed import SamplingSpeed

    speed = SamplingSpeed(compile=mode, precision=precision)
    generator = CMDGenerator.from_pretrained(preset, str(ae), str(motion), str(content), str(sd), speed=speed)
    generator = generator.to(device)
    seconds = []
    for seed in range(2):
        start = time.perf_counter()
        videos = generator(prompts=prompts, seed=seed)
        seconds.append(round(time.perf_counter() - start, 2))
    return {"shape": list(videos.shape), "first_call_s": seconds[0], "second_call_s": seconds[1]}


# ---------------------------------------------------------------------------------------
# 5. paper_sampling
# ---------------------------------------------------------------------------------------


def check_paper_sampling(args: argparse.Namespace, emit) -> None:
    import torch

    from benchmarks.sampling import run_cmd
    from cmd_model.presets import get_preset
    from cmd_model.speed import SamplingSpeed

    device = torch_device(args)
    cuda = device.type == "cuda"
    preset = get_preset("webvid-sd21-512x1024" if cuda else "tiny")
    precision = "float16" if cuda else "float32"  # the paper's fp16; emulated on a CPU, so float32 there
    setting = {
        "preset": preset.name,
        "video": f"{preset.autoencoder.num_frames}x{preset.video_size[0]}x{preset.video_size[1]}",
        "content_steps": 50,
        "motion_steps": 50,
        "batch": 1,
        "precision": precision,
        **PAPER_SAMPLING,
    }
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    else:
        setting["note"] = "the tiny preset on a CPU: the paper's step counts, none of its sizes"
    # Eager is the paper's setting; compiling the two big models (--sampling-compile) costs minutes of Inductor.
    for mode in (None, *([args.sampling_compile] if args.sampling_compile else [])):
        line = {**setting, "compile": mode or "eager"}
        timed = run_cmd(preset, device, 50, 50, 1, SamplingSpeed(compile=mode, precision=precision), repeats=3)
        line.update(seconds=timed["seconds"], peak_gb=timed["peak_gb"], first_call_seconds=timed["first_call_seconds"])
        if cuda:  # peak_gb: GB (1e9 bytes), the paper's unit
            line["seconds_vs_paper"] = round(timed["seconds"] / PAPER_SAMPLING["paper_seconds_a100"], 3)
            line["gb_vs_paper"] = round(timed["peak_gb"] / PAPER_SAMPLING["paper_gb_a100"], 3)
        emit(**line, ok=True)
        if cuda:
            torch.cuda.empty_cache()


CHECK_FUNCTIONS = {
    "env": check_env,
    "memory_plan": check_memory_plan,
    "ddp_agree": check_ddp_agree,
    "tiny_chain": check_tiny_chain,
    "paper_sampling": check_paper_sampling,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run every check on the CPU (sized for it)")
    parser.add_argument(
        "--only",
        type=lambda s: [c for c in s.split(",") if c],
        default=list(CHECKS),
        help=f"comma-separated checks, in this order: {','.join(CHECKS)}",
    )
    parser.add_argument("--memory-batch", type=int, default=2, help="memory_plan: the batch of the measured step")
    parser.add_argument("--steps", type=int, help="tiny_chain: optimizer steps per stage (default 10 GPU, 4 CPU)")
    parser.add_argument(
        "--sampling-compile",
        help="paper_sampling: also compiled, in this torch.compile mode (cmd_model.speed: reduce-overhead on a GPU)",
    )
    parser.add_argument("--minutes", type=float, help="the whole run's time (default 8 on a GPU, 30 with --cpu)")
    parser.add_argument("--check", choices=CHECKS, help=argparse.SUPPRESS)  # the child: run this one check
    parser.add_argument("--results", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = [c for c in args.only if c not in CHECKS]
    if unknown:
        parser.error(f"unknown check(s) {', '.join(unknown)}; choose from {', '.join(CHECKS)}")
    if args.check:
        sys.path.insert(0, str(ROOT))  # benchmarks.sampling, pipelines, cmd_model
        return run_check(args)
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
