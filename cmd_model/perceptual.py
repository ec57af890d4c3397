"""LPIPS (Zhang et al. 2018, VGG-16, v0.1), the perceptual term of the released pixel-mode autoencoder loss.

The `lpips` package computes it. Its linear heads ship inside the package; its VGG-16 backbone
would be downloaded by torchvision, so here it is built untrained and loaded from a local file
instead: torchvision's ImageNet VGG-16 state dict (the file torchvision caches as
vgg16-397923af.pth), read with `torch.load(weights_only=True)`. Nothing is downloaded.

    lpips(a, b): images [N, 3, H, W] in [-1, 1] -> distance [N, 1, 1, 1]
"""

from __future__ import annotations

import os

import torch


def load_lpips(vgg16_weights: str):
    """lpips.LPIPS (VGG, v0.1 heads) with the backbone from `vgg16_weights`; frozen, in eval mode."""
    import lpips

    if not os.path.isfile(vgg16_weights):
        raise FileNotFoundError(
            f"--lpips-vgg {vgg16_weights} not found (torchvision's VGG-16 state dict; nothing is downloaded)"
        )
    model = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)  # pnet_rand: no backbone download
    state = torch.load(vgg16_weights, map_location="cpu", weights_only=True)
    # lpips splits torchvision's vgg16().features into slice1..slice5, each layer keeping its index.
    backbone = {
        f"slice{k}.{index}.{p}": state[f"features.{index}.{p}"]
        for k in range(1, 6)
        for index, layer in getattr(model.net, f"slice{k}").named_children()
        for p in ("weight", "bias")
        if hasattr(layer, p)
    }
    model.net.load_state_dict(backbone)
    return model.requires_grad_(False).eval()
