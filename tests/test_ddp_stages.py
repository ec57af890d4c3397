"""Every worker trains the same model (issue 30, part 3): two gloo processes on the CPU run a
stage's loss under DDP, as Ray Train's prepare_model wraps it, each on its own data; after a few
optimizer steps both hold identical parameters. The ablation: the VAE stage's old loss, which
called encode/decode on the wrapped module and so bypassed DDP's forward, leaves them different."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from cmd_model.content import build_tiny_sd, load_vae
from cmd_model.presets import get_preset
from pipelines.training.vae import KL_WEIGHT, TrainableVAE, vae_forward

STEPS = 3


def old_vae_loss(model, x):
    vae = model.module if hasattr(model, "module") else model
    recon, kl = vae_forward(vae.vae, x)
    return F.mse_loss(recon, x) + KL_WEIGHT * kl


def new_vae_loss(model, x):
    recon, kl = model(x)
    return F.mse_loss(recon, x) + KL_WEIGHT * kl


def _rank(rank: int, sd: str, store: str, loss_name: str, out: str) -> None:
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    torch.manual_seed(0)  # the same initial weights on both ranks
    model = DistributedDataParallel(TrainableVAE(load_vae(sd)))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = {"old": old_vae_loss, "new": new_vae_loss}[loss_name]
    torch.manual_seed(100 + rank)  # each rank its own data, as a data-parallel shard
    for _ in range(STEPS):
        x = torch.rand(2, 3, 32, 32) * 2 - 1
        opt.zero_grad()
        loss_fn(model, x).backward()
        opt.step()
    torch.save({k: v.detach().clone() for k, v in model.module.state_dict().items()}, f"{out}.{rank}")
    dist.destroy_process_group()


def ranks_agree(tmp_path, loss_name: str) -> bool:
    sd = build_tiny_sd(tmp_path / f"sd-{loss_name}", text_dim=get_preset("tiny").motion.text_dim)
    out = str(tmp_path / loss_name)
    mp.start_processes(
        _rank, args=(str(sd), str(tmp_path / f"store-{loss_name}"), loss_name, out), nprocs=2, start_method="spawn"
    )
    a, b = (torch.load(f"{out}.{r}", weights_only=True) for r in (0, 1))
    return all(torch.equal(a[k], b[k]) for k in a)


def test_the_vae_stage_trains_one_model_across_workers(tmp_path):
    assert ranks_agree(tmp_path, "new")
    assert not ranks_agree(tmp_path, "old")  # the bypassed DDP: each rank trained its own VAE
