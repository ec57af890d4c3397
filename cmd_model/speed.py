"""How the denoisers run while sampling: eager or compiled, their precision, the UNet's memory layout.

A denoiser is called once per DDIM step with the same shapes, so on a big GPU a step of the
motion DiT (512 tokens) is bound by kernel launches, not arithmetic: torch.compile fuses them,
and its "reduce-overhead" mode replays the whole step as one CUDA graph. Attention already goes
through PyTorch's SDPA (timm's Attention in the DiTs, diffusers' AttnProcessor2_0 in the UNet),
which picks the flash or memory-efficient kernel for fp16/bf16 on CUDA by itself.

Only the denoisers get this treatment: the autoencoder and the SD VAE decode once per video, and
SD's VAE is known to overflow in fp16, so they stay in float32.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
PRECISIONS = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class SamplingSpeed:
    """compile: a torch.compile mode (COMPILE_MODES; "reduce-overhead" = CUDA graphs), None = eager.
    precision: "auto" (bfloat16 on CUDA: the models train under bf16 autocast, and bf16 keeps
    float32's range where float16, the paper's Table 9 setting, can overflow to inf and NaN;
    float32 on the CPU) or a PRECISIONS key.
    channels_last: convolutions (the SD UNet) in NHWC, the layout tensor cores read; outputs are unchanged."""

    compile: str | None = None  # off by default: compiling costs tens of seconds, worth it for many videos
    precision: str = "auto"
    channels_last: bool = True

    def __post_init__(self):
        if self.compile is not None and self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)} or None, got {self.compile!r}")
        if self.precision != "auto" and self.precision not in PRECISIONS:
            raise ValueError(f"precision must be auto or one of {', '.join(PRECISIONS)}, got {self.precision!r}")

    def dtype(self, device: torch.device | str) -> torch.dtype:
        if self.precision == "auto":
            return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
        return PRECISIONS[self.precision]

    def autocast(self, device: torch.device | str):
        """The denoisers' precision: autocast (matmuls and convolutions in the low precision, the
        sampler's arithmetic in float32), or nothing at float32."""
        dtype, kind = self.dtype(device), torch.device(device).type
        return torch.autocast(kind, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()

    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        """The module the sampler calls: the same module (in place to channels_last where it has
        convolutions), compiled when `compile` is set. Call once per module and keep the result."""
        if self.channels_last and any(isinstance(m, torch.nn.Conv2d) for m in module.modules()):
            module.to(memory_format=torch.channels_last)
        if self.compile is None:
            return module
        # dynamic=False: every step has the same shapes (guidance doubles the batch, always).
        return torch.compile(module, mode=self.compile, dynamic=False)
