"""The driver's memory check of a GPU training job: the plan of one worker's step must fit its GPU.

cmd_model.memory measures the stage's step on fake tensors (seconds on the driver's CPU, once per
preset, stage and checkpointing in a process) and adds what stays on the GPU; a batch that cannot
fit is refused in one line naming the flags that make it fit, before any cluster work. Jobs on
CPUs are not checked, nor the vae stage (the offline stand-in SD's, sized for CPUs).
"""

from __future__ import annotations

from pipelines.training.config import ConfigError, TrainConfig
from pipelines.training.stage import get_stage


def plan_args(cfg: TrainConfig) -> dict:
    """cmd_model.memory.plan's arguments for one worker of this job."""
    return dict(
        preset=cfg.model_preset,
        stage=cfg.stage,
        batch_size=cfg.global_batch,
        num_workers=cfg.num_workers,
        grad_accum_steps=cfg.grad_accum_steps,
        grad_checkpointing=cfg.grad_checkpointing,
        gpu_gib=cfg.gpu_gib,
        # As loop.build_trainee keeps an EMA copy: the flag's decay, else the stage's.
        ema=cfg.ema_decay is not None or get_stage(cfg.stage).optimizer.ema_decay is not None,
    )


def check_gpu_memory(cfg: TrainConfig) -> dict | None:
    """With --use-gpu, the job's memory plan; a ConfigError when it does not fit --gpu-gib."""
    if not cfg.use_gpu:
        return None
    from cmd_model import memory

    if cfg.stage not in memory.STAGES:
        return None
    plan = memory.plan(**plan_args(cfg))
    if plan["fits"]:
        return plan
    found = memory.fixes(**plan_args(cfg))
    if found:
        options = [f"{fix['flags']} ({fix['peak_gib']} GiB)" for fix in found]
        fix = "pass " + (", ".join(options[:-1]) + " or " + options[-1] if len(options) > 1 else options[0])
    else:
        smallest = memory.plan(
            **{**plan_args(cfg), "num_workers": cfg.global_batch, "grad_accum_steps": 1, "grad_checkpointing": True}
        )
        fix = (
            f"even one sample a GPU with --grad-checkpointing needs {smallest['peak_gib']} GiB: "
            "use GPUs with more memory (--gpu-gib)"
        )
    setup = f"--batch-size {cfg.global_batch} over --num-workers {cfg.num_workers}"
    if cfg.grad_accum_steps > 1:
        setup += f" in --grad-accum-steps {cfg.grad_accum_steps}"
    if cfg.grad_checkpointing:
        setup += ", --grad-checkpointing"
    raise ConfigError(
        f"--use-gpu: the {cfg.stage} stage of {cfg.preset} at {plan['micro_batch']} a forward pass ({setup}) needs "
        f"{plan['peak_gib']} GiB at its peak ({plan['peak_phase']}), more than the {plan['usable_gib']} GiB its plan "
        f"may use of a {cfg.gpu_gib:g} GiB GPU (--gpu-gib): {fix}; python -m cmd_model.memory prints the whole plan"
    )
