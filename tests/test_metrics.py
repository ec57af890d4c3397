"""Metrics against closed forms (Frechet distance, PSNR, SSIM), against a peer implementation (the cd-fvd
package: I3D features and FVD on the same weights), I3D shapes and weight loading, CLIPSIM."""

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


def _i3d_with_trained_like_statistics(path) -> InceptionI3d:
    """The full I3D with random weights and batch-norm statistics measured on data, as a trained
    network has (small running variances, where eps 1e-3 vs 1e-5 is visible); saved to `path`."""
    torch.manual_seed(0)
    model = InceptionI3d()
    for module in model.modules():
        if isinstance(module, torch.nn.Conv3d):
            torch.nn.init.kaiming_normal_(module.weight)
            module.weight.data *= 0.05  # pre-norm variances ~1e-3: eps matters as in the real weights
        if isinstance(module, torch.nn.BatchNorm3d):
            module.momentum = None  # a cumulative average: one pass sets the statistics
    with torch.no_grad():
        model.train()(torch.rand(2, 3, 16, 224, 224) * 2 - 1)
    torch.save(model.state_dict(), path)
    return model.eval()


def test_i3d_and_fvd_match_the_cd_fvd_package(tmp_path):
    """Parity with an implementation nobody here wrote: the I3D of cd-fvd (the piergiaj PyTorch port
    that the TATS/PVDM/CMD evaluator uses) and its FVD, on the same weights and the same videos."""
    cdfvd = pytest.importorskip("cdfvd.fvd")
    model = _i3d_with_trained_like_statistics(tmp_path / "i3d_pretrained_400.pt")
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (6, 16, 8, 8, 3)).astype(np.float64).repeat(4, axis=2).repeat(4, axis=3)  # 32x32 blocks
    real = base.astype(np.uint8)
    fake = np.clip(base + rng.normal(20, 30, base.shape), 0, 255).astype(np.uint8)
    peer = cdfvd.cdfvd("i3d", ckpt_path=str(tmp_path / "i3d_pretrained_400.pt"), device="cpu", compute_feats=True)
    peer_fvd = peer.compute_fvd(real, fake)
    ours_real, ours_fake = i3d_features(model, real), i3d_features(model, fake)
    for ours, theirs in ((ours_real, peer.real_stats.get_all()), (ours_fake, peer.fake_stats.get_all())):
        assert np.abs(ours - theirs).max() <= 1e-4 * np.abs(theirs).max()
    ours_fvd = frechet_distance(*gaussian_stats(ours_real), *gaussian_stats(ours_fake))
    assert ours_fvd > 0 and ours_fvd == pytest.approx(float(peer_fvd), rel=1e-3)


def test_cd_fvd_matches_the_cd_fvd_package_on_a_small_videomae(tmp_path):
    """Content-debiased FVD: our VideoMAE-v2 encoder against the cd-fvd package's, same weights
    (a narrow, shallow copy of ViT-g/14: the same code path at 224 px and 16 frames)."""
    from functools import partial

    pytest.importorskip("cdfvd.fvd")
    from cdfvd.fvd import cdfvd as PeerFVD
    from cdfvd.fvd import get_videomae_features
    from cdfvd.third_party.VideoMAEv2.videomaev2_finetune import VisionTransformer
    from cdfvd.utils.metric_utils import FeatureStats

    from cmd_model.metrics import cd_fvd
    from cmd_model.videomae import VideoMAEConfig, VideoMAEv2, videomae_features

    cfg = VideoMAEConfig(embed_dim=48, depth=2, num_heads=4)
    torch.manual_seed(0)
    peer = VisionTransformer(
        img_size=224,
        patch_size=14,
        embed_dim=48,
        depth=2,
        num_heads=4,
        mlp_ratio=48 / 11,
        qkv_bias=True,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        num_classes=174,
        all_frames=16,
        tubelet_size=2,
        use_mean_pooling=True,
    ).eval()
    for name, weight in peer.named_parameters():  # non-zero biases and norms, so every term is exercised
        if "bias" in name or "norm" in name:
            torch.nn.init.normal_(weight, mean=1.0 if name.endswith("norm1.weight") else 0.0, std=0.1)
    torch.save(peer.state_dict(), tmp_path / "videomae.pt")
    ours = VideoMAEv2.from_file(str(tmp_path / "videomae.pt"), cfg)
    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (6, 16, 20, 28, 3), dtype=np.uint8)  # not square: resized to 224x224, as cd-fvd does
    fake = np.clip(real.astype(int) + rng.normal(15, 25, real.shape), 0, 255).astype(np.uint8)
    stats = {}
    for side, videos in (("real", real), ("fake", fake)):
        stats[side] = get_videomae_features(
            FeatureStats(capture_all=True, capture_mean_cov=True), peer, videos, device="cpu"
        )
        features = videomae_features(ours, videos)
        assert np.abs(features - stats[side].get_all()).max() <= 1e-4 * np.abs(stats[side].get_all()).max()
    peer_value = PeerFVD.compute_fvd_from_stats(None, stats["fake"], stats["real"])
    assert cd_fvd(ours, real, fake) == pytest.approx(float(peer_value), rel=1e-3)


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


def test_clipsim_with_a_tiny_clip(tiny_clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    model, processor = CLIPModel.from_pretrained(tiny_clip_dir), CLIPProcessor.from_pretrained(tiny_clip_dir)
    videos = np.random.default_rng(0).integers(0, 256, (2, 4, 40, 48, 3), dtype=np.uint8)
    score = clipsim(model, processor, videos, ["a red square", "a blue car"])
    assert -1 <= score <= 1
    assert score == pytest.approx(clipsim(model, processor, videos, ["a red square", "a blue car"]))
