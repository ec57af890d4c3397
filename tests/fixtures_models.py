"""Tiny models saved in the layouts the jobs read: a Stable Diffusion folder and save_pretrained folders."""
from __future__ import annotations

import pytest
import torch

from cmd_model.autoencoder import VideoAutoencoder
from cmd_model.content import build_tiny_sd
from cmd_model.presets import get_preset


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A tiny SD (diffusers layout: unet/, vae/, text_encoder/, tokenizer/, scheduler/)."""
    return build_tiny_sd(tmp_path_factory.mktemp("sd") / "tiny-sd", text_dim=get_preset("tiny").motion.text_dim)


def save_autoencoder(directory, preset: str = "tiny", seed: int = 0):
    torch.manual_seed(seed)
    VideoAutoencoder.from_preset_config(get_preset(preset).autoencoder).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_autoencoder_dir(tmp_path_factory):
    """An untrained tiny-preset autoencoder in save_pretrained layout (encoding is still deterministic)."""
    return save_autoencoder(tmp_path_factory.mktemp("ae") / "autoencoder")
