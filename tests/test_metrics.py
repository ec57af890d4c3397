"""Metrics against closed forms: Frechet distance, PSNR, SSIM; I3D shapes and weight loading; CLIPSIM."""
import numpy as np
import pytest
import torch

from cmd_model.i3d import InceptionI3d
from cmd_model.metrics import clipsim, frechet_distance, fvd, gaussian_stats, i3d_features, psnr, ssim


def test_frechet_distance_of_two_known_gaussians():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    var1, var2 = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    expected = ((mu1 - mu2) ** 2).sum() + (var1 + var2 - 2 * np.sqrt(var1 * var2)).sum()
    assert frechet_distance(mu1, np.diag(var1), mu2, np.diag(var2)) == pytest.approx(expected, rel=1e-9)
    # A rotated (non-diagonal) pair with equal covariance: only the means count.
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    sigma = q @ np.diag(var1) @ q.T
    assert frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(((mu1 - mu2) ** 2).sum(), abs=1e-8)


def test_frechet_distance_from_samples():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 1, (20000, 4)), rng.normal(1, 2, (20000, 4))
    # ||1||^2 * 4 + 4 * (1 + 4 - 2 * 2) = 8
    assert frechet_distance(*gaussian_stats(a), *gaussian_stats(b)) == pytest.approx(8.0, rel=0.05)


def test_psnr_and_ssim():
    rng = np.random.default_rng(0)
    video = rng.integers(20, 230, (2, 4, 32, 32, 3), dtype=np.uint8)
    assert psnr(video, video + 10) == pytest.approx(10 * np.log10(255**2 / 100), rel=1e-9)
    assert ssim(video, video) == pytest.approx(1.0)
    noisy = np.clip(video + rng.normal(0, 30, video.shape), 0, 255).astype(np.uint8)
    assert 0 < ssim(video, noisy) < 0.9


def test_i3d_shapes_and_weights_load_without_pickle(tmp_path):
    full = InceptionI3d()
    assert 12e6 < sum(p.numel() for p in full.parameters()) < 13e6  # Inception-I3D RGB: ~12.7M
    torch.save(full.state_dict(), tmp_path / "i3d_pretrained_400.pt")
    loaded = InceptionI3d.from_file(str(tmp_path / "i3d_pretrained_400.pt"))
    with torch.no_grad():
        x = torch.rand(1, 3, 16, 224, 224) * 2 - 1
        assert loaded(x).shape == (1, 400)


def test_fvd_with_a_tiny_random_i3d():
    """A narrow I3D keeps the I3D input and output shapes; FVD(x, x) = 0 and grows with a shift."""
    torch.manual_seed(0)
    model = InceptionI3d(width=0.125).eval()
    for module in model.modules():  # He init keeps activations O(1) through the ReLUs, so features are not ~0
        if isinstance(module, torch.nn.Conv3d):
            torch.nn.init.kaiming_normal_(module.weight)
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (12, 16, 48, 64, 3), dtype=np.uint8)
    assert i3d_features(model, real, size=64).shape == (12, 400)
    shifted = np.clip(real.astype(int) + 60, 0, 255).astype(np.uint8)
    same, moved = fvd(model, real, real, size=64), fvd(model, real, shifted, size=64)
    assert moved > 0 and abs(same) < 1e-6 * moved


def test_clipsim_with_a_tiny_clip(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from cmd_model.content import _char_level_clip_tokenizer

    tokenizer = _char_level_clip_tokenizer(max_length=16)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(tmp_path / "clip")
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size=32), tokenizer=tokenizer)
    processor.save_pretrained(tmp_path / "clip")
    model, processor = CLIPModel.from_pretrained(tmp_path / "clip"), CLIPProcessor.from_pretrained(tmp_path / "clip")
    videos = np.random.default_rng(0).integers(0, 256, (2, 4, 40, 48, 3), dtype=np.uint8)
    score = clipsim(model, processor, videos, ["a red square", "a blue car"])
    assert -1 <= score <= 1
    assert score == pytest.approx(clipsim(model, processor, videos, ["a red square", "a blue car"]))
