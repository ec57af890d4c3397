"""Every worker trains the same model (issue 30, part 3): two gloo ranks on the CPU run each
stage's training step (loop.train_step: the stage's loss on the model wrapped in DDP, as Ray
Train's prepare_model wraps it), each on its own data; after a few optimizer steps both hold
identical parameters, and they differ from a one-process run on rank 0's data alone: the
gradients were averaged. The ablation: the VAE stage's old loss, which called encode/decode on
the wrapped module and so bypassed DDP's forward, leaves the ranks different, and rank 0 where
that one-process run ends (which shows the reference is the run without averaging).

A parameter that no loss reaches fails here too (DDP refuses the second step). --init-from is read
by rank 0 alone: after loop.build_trainee both ranks' model and EMA hold its weights, though rank 1
was given a path that does not exist. Process start-up and imports dominate the time: rank 0 is this
process and runs every stage, beside one spawned rank."""

from __future__ import annotations

import traceback
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from benchmarks.device.gpu_check import DDP_CASES, DDP_ROWS, ddp_batch
from cmd_model.content import build_tiny_sd
from cmd_model.dit import DiT
from cmd_model.presets import get_preset
from pipelines.data.video.schema import FRAMES
from pipelines.training.config import VIDEO_STAGES, TrainConfig
from pipelines.training.inputs import inputs_on_this_node
from pipelines.training.loop import Trainee, build_trainee, train_step
from pipelines.training.optim import make_optimizer
from pipelines.training.stage import get_stage
from pipelines.training.vae import KL_WEIGHT, VAEStage, vae_forward

WORKERS = 2
STEPS = 3
ROWS = DDP_ROWS  # each worker's batch
BYPASSED = "vae-bypassing-ddp"
# name: (stage, preset); the GPU check (benchmarks/device/gpu_check.py) trains the same cases on a GPU
CASES = {**DDP_CASES, BYPASSED: ("vae", "tiny")}
INIT_FROM = "init-from"  # the result of loop.build_trainee with --init-from, beside the cases'


class BypassedVAEStage(VAEStage):
    """The VAE stage's old loss: encode/decode on the wrapped module, not through DDP's forward."""

    def loss(self, model, batch):
        vae = model.module if isinstance(model, DistributedDataParallel) else model
        x = self.frames(batch[FRAMES])
        recon, kl = vae_forward(vae.vae, x)
        return F.mse_loss(recon.float(), x.float()) + KL_WEIGHT * kl


make_batch = ddp_batch  # rank `rank`'s batch at `step`, as the stage's collate hands it over


def train(case: str, sd: str, data_rank: int, ddp: bool) -> dict[str, torch.Tensor]:
    """STEPS of loop.train_step on rank `data_rank`'s data (DDP-wrapped, or alone); the final weights."""
    stage_name, preset = CASES[case]
    data = {"input": "videos/"} if stage_name in VIDEO_STAGES else {"latents": "latents/"}
    cfg = TrainConfig(
        stage=stage_name,
        preset=preset,
        name="ddp",
        max_steps=STEPS,
        num_workers=WORKERS,
        batch_size=ROWS * WORKERS,
        stable_diffusion=sd,
        **data,
    )
    stage_cls = BypassedVAEStage if case == BYPASSED else get_stage(stage_name)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank (loop.build_trainee)
    stage = stage_cls(cfg, {}, torch.device("cpu"))
    raw = stage.model
    # What ray.train.torch.prepare_model does with several CPU workers.
    model = DistributedDataParallel(raw, gradient_as_bucket_view=True) if ddp else raw
    optimizer = make_optimizer(raw.parameters(), cfg.learning_rate, stage_cls.optimizer)
    trainee = Trainee(stage, model, raw, None, 0.0, optimizer, None)
    torch.manual_seed(cfg.seed + 1000 * data_rank)  # each rank its own noise (loop.train_loop)
    model.train()
    for step in range(STEPS):
        train_step(trainee, make_batch(stage_name, preset, data_rank, step), cfg.learning_rate, step)
    return {k: v.detach().clone() for k, v in raw.state_dict().items()}


def built(rank: int, sd: str, init_from: str) -> dict[str, dict[str, torch.Tensor]]:
    """loop.build_trainee of a motion run with --init-from on this rank, in the Ray Train context
    its local mode sets up for a torchrun process; the model's and EMA's weights before any step."""
    from ray.train.v2._internal.execution.train_fn_utils import LocalTrainFnUtils, set_train_fn_utils

    cfg = TrainConfig(
        stage="motion",
        preset="tiny-pixel",
        name="init",
        max_steps=1,
        num_workers=WORKERS,
        batch_size=ROWS * WORKERS,
        stable_diffusion=sd,
        latents="latents/",
        init_from=init_from,
    )
    context = dict(world_size=WORKERS, world_rank=rank, local_rank=rank, local_world_size=WORKERS)
    set_train_fn_utils(LocalTrainFnUtils("init", **context))
    try:
        trainee = build_trainee(
            inputs_on_this_node(cfg, rank), {"plan": {}, "run_id": None, "config": {}}, torch.device("cpu"), rank
        )
    finally:
        set_train_fn_utils(None)
    assert isinstance(trainee.model, DistributedDataParallel)
    parts = {"model": trainee.raw, "ema": trainee.ema}
    return {part: {k: v.detach().clone() for k, v in m.state_dict().items()} for part, m in parts.items()}


def run_rank(rank: int, sd: str, store: str, init_from: str) -> dict:
    """Every case under DDP, then this rank's share of the one-process runs; case: weights (or the error)."""
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=WORKERS, timeout=timedelta(minutes=3)
    )
    results: dict = {}
    for case in CASES:
        try:
            results[case] = {"ddp": train(case, sd, rank, ddp=True)}
        except Exception:
            results[case] = {"error": traceback.format_exc()}
    try:
        results[INIT_FROM] = built(rank, sd, init_from)
    except Exception:
        results[INIT_FROM] = {"error": traceback.format_exc()}
    dist.destroy_process_group()
    # The one-process runs on rank 0's data, shared out between the ranks (no collectives left).
    for i, case in enumerate(CASES):
        if i % WORKERS == rank and "error" not in results[case]:
            try:
                results[case]["single"] = train(case, sd, 0, ddp=False)
            except Exception:
                results[case]["error"] = traceback.format_exc()
    return results


def _spawned_rank(index: int, sd: str, store: str, out: str) -> None:
    torch.set_num_threads(1)  # the ranks share two cores
    rank = index + 1
    # A path that is nowhere: rank 1 must leave --init-from to rank 0.
    torch.save(run_rank(rank, sd, store, f"{out}.no-such-model"), f"{out}.{rank}")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    """case: (each rank's weights after STEPS under DDP, the one-process run's on rank 0's data), or the error.

    Rank 0 runs in this process, whose imports are done: only rank 1 is spawned, and while it
    starts (imports dominate) this process builds the tiny SD it reads after the rendezvous."""
    tmp = tmp_path_factory.mktemp("ddp")
    sd, store, out, init_from = str(tmp / "sd"), str(tmp / "store"), str(tmp / "weights"), str(tmp / "init")
    spawned = mp.start_processes(
        _spawned_rank, args=(sd, store, out), nprocs=WORKERS - 1, start_method="spawn", join=False
    )
    threads = torch.get_num_threads()
    try:
        with torch.random.fork_rng():  # this process's RNG (and threads) as they were, for the tests after
            torch.set_num_threads(1)
            build_tiny_sd(sd, text_dim=get_preset("tiny").motion.text_dim)
            torch.manual_seed(123)  # not the run's seed: weights a fresh model would not have
            DiT.from_preset_config(get_preset("tiny-pixel").motion).save_pretrained(init_from)
            ranks = [run_rank(0, sd, store, init_from)]
    except BaseException:
        for process in spawned.processes:
            process.terminate()  # or it waits for rank 0 at the rendezvous until the timeout
        raise
    finally:
        torch.set_num_threads(threads)
    while not spawned.join():
        pass
    ranks += [torch.load(f"{out}.{r}", weights_only=True) for r in range(1, WORKERS)]
    results = {}
    for i, case in enumerate(CASES):
        errors = [r[case]["error"] for r in ranks if "error" in r[case]]
        results[case] = errors[0] if errors else ([r[case]["ddp"] for r in ranks], ranks[i % WORKERS][case]["single"])
    errors = [r[INIT_FROM]["error"] for r in ranks if "error" in r[INIT_FROM]]
    results[INIT_FROM] = errors[0] if errors else ([r[INIT_FROM] for r in ranks], init_from)
    return results


def weights_of(trained, case):
    result = trained[case]
    if isinstance(result, str):
        pytest.fail(f"{case} failed:\n{result}")
    return result


def identical(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def close(a: dict, b: dict) -> bool:
    """Equal up to float noise (two processes' runs of the same steps)."""
    return a.keys() == b.keys() and all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in a)


@pytest.mark.parametrize("case", [c for c in CASES if c != BYPASSED])
def test_every_stage_trains_one_model_across_workers(trained, case):
    ranks, alone = weights_of(trained, case)
    assert all(identical(ranks[0], other) for other in ranks[1:]), f"{case}: the ranks' weights differ"
    # Averaged gradients: not where rank 0's data alone takes the model.
    assert not close(ranks[0], alone), f"{case}: rank 0 trained on its own data alone"


def test_a_loss_that_bypasses_ddp_forward_trains_one_model_per_worker(trained):
    ranks, alone = weights_of(trained, BYPASSED)
    assert not identical(ranks[0], ranks[1])  # each rank trained its own VAE
    assert close(ranks[0], alone)  # rank 0's is the one-process run on its data: the reference without averaging


def test_init_from_is_read_on_rank_0_and_every_rank_starts_from_it(trained):
    ranks, init_from = weights_of(trained, INIT_FROM)
    given = DiT.from_pretrained(init_from).state_dict()
    for rank, weights in enumerate(ranks):
        # rank 1's --init-from did not exist: DDP's broadcast brought rank 0's, the EMA copied after it
        assert identical(weights["model"], given), f"rank {rank}: the model is not --init-from's"
        assert identical(weights["ema"], given), f"rank {rank}: the EMA is not --init-from's"
