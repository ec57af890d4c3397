"""Training state on disk: safetensors for every tensor, JSON for the rest, nothing pickled.

A checkpoint folder holds
    model.safetensors      trainable weights (unwrapped from DDP)
    ema.safetensors        EMA weights (absent when the stage keeps no EMA)
    optimizer.safetensors  optimizer tensors, keyed "<param index>.<name>" (Adam: step, exp_avg, exp_avg_sq)
    state.json             step, optimizer param_groups, MLflow run id, the job config
so a reader needs only safetensors and json, and loading can never run code.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

MODEL, EMA, OPTIMIZER, STATE = "model.safetensors", "ema.safetensors", "optimizer.safetensors", "state.json"


@dataclass
class TrainState:
    """What a resumed worker needs beyond the weights."""

    step: int = 0
    run_id: str | None = None
    config: dict = field(default_factory=dict)


def _tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses views sharing storage; a contiguous CPU copy of each tensor is always safe.
    return {k: v.detach().to("cpu").contiguous() for k, v in state.items()}


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Split optimizer.state_dict() into flat tensors and JSON-able param groups."""
    state = optimizer.state_dict()
    tensors = {}
    for index, slots in state["state"].items():
        for name, value in slots.items():
            tensors[f"{index}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, state["param_groups"]


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save(
    directory: str | Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: TrainState,
    ema: nn.Module | None = None,
) -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(_tensors(model.state_dict()), directory / MODEL)
    if ema is not None:
        save_file(_tensors(ema.state_dict()), directory / EMA)
    tensors, groups = optimizer_tensors(optimizer)
    save_file(_tensors(tensors), directory / OPTIMIZER)
    meta = {"step": state.step, "run_id": state.run_id, "config": state.config, "param_groups": groups}
    (directory / STATE).write_text(json.dumps(meta, indent=2, sort_keys=True))
    return directory


def load_weights(directory: str | Path, model: nn.Module, ema: nn.Module | None = None) -> TrainState:
    """Weights into `model` (unwrapped from DDP) and `ema`; returns the step and run id."""
    directory = Path(directory)
    model.load_state_dict(load_file(directory / MODEL))
    if ema is not None:
        # A checkpoint of a stage without EMA seeds the EMA from the weights.
        ema.load_state_dict(load_file(directory / (EMA if (directory / EMA).exists() else MODEL)))
    meta = json.loads((directory / STATE).read_text())
    return TrainState(step=int(meta["step"]), run_id=meta.get("run_id"), config=meta.get("config", {}))


def load_optimizer_state(directory: str | Path, optimizer: torch.optim.Optimizer) -> None:
    """Optimizer tensors (moved to each parameter's device by load_state_dict) and param groups."""
    directory = Path(directory)
    meta = json.loads((directory / STATE).read_text())
    load_optimizer(optimizer, load_file(directory / OPTIMIZER), meta["param_groups"])
