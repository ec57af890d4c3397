"""Video metrics: PSNR and SSIM of reconstructions, FVD, and CLIPSIM.

Videos are uint8 arrays [N, L, H, W, 3] throughout.
FVD follows the StyleGAN-V protocol the paper used: one clip per video, Inception-I3D
(Kinetics-400) logits of 16 frames resized (shorter side 224) and centre-cropped to 224,
values in [-1, 1]; the Frechet distance between Gaussians fitted to real and fake features.
CLIPSIM (Wu et al. 2021): mean over frames of the cosine similarity between the CLIP image
embedding of each frame and the CLIP text embedding of the prompt (frames resized to 224).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from scipy import linalg

from cmd_model.i3d import InceptionI3d

# ---------------------------------------------------------------------------------------
# Reconstruction
# ---------------------------------------------------------------------------------------


def psnr(real: np.ndarray, fake: np.ndarray) -> float:
    """Mean over videos of PSNR (dB) over all frames and pixels, for uint8 inputs."""
    mse = ((real.astype(np.float64) - fake.astype(np.float64)) ** 2).reshape(len(real), -1).mean(axis=1)
    return float(np.mean(10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))))


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = (g / g.sum())[:, None] @ (g / g.sum())[None, :]
    return g[None, None].expand(3, 1, size, size)


def ssim(real: np.ndarray, fake: np.ndarray, batch_frames: int = 256) -> float:
    """Mean SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03) over frames.

    Frames go through in batches of `batch_frames` (float64 maps of 2,048 clips at once would
    not fit in memory); every frame has the same size, so the mean of batch sums is the same.
    """
    a_all, b_all = rearrange(real, "n l h w c -> (n l) c h w"), rearrange(fake, "n l h w c -> (n l) c h w")
    window = _gaussian_window(min(11, a_all.shape[-1], a_all.shape[-2]) // 2 * 2 + 1)
    blur = lambda x: F.conv2d(x, window, groups=3)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    total, count = 0.0, 0
    for i in range(0, len(a_all), batch_frames):
        a = torch.from_numpy(np.ascontiguousarray(a_all[i : i + batch_frames])).double()
        b = torch.from_numpy(np.ascontiguousarray(b_all[i : i + batch_frames])).double()
        mu_a, mu_b = blur(a), blur(b)
        var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
        s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
        total, count = total + float(s.sum()), count + s.numel()
    return total / count


# ---------------------------------------------------------------------------------------
# FVD
# ---------------------------------------------------------------------------------------


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))."""
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():  # singular product: nudge the diagonals, as the FID reference code does
        offset = np.eye(sigma1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    covmean = covmean.real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of features [N, D]; the covariance divides by N, as StyleGAN-V's (and cd-fvd's) FVD does."""
    features = features.astype(np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False, bias=True)


def i3d_preprocess(videos: np.ndarray, size: int = 224) -> torch.Tensor:
    """uint8 [N, L, H, W, 3] -> float [N, 3, L, size, size] in [-1, 1] (shorter side resized, centre crop)."""
    x = torch.from_numpy(np.ascontiguousarray(videos)).float()
    n = x.shape[0]
    x = rearrange(x, "n l h w c -> (n l) c h w")
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    x = F.interpolate(
        x, size=(max(size, round(h * scale)), max(size, round(w * scale))), mode="bilinear", align_corners=False
    )
    top, left = (x.shape[-2] - size) // 2, (x.shape[-1] - size) // 2
    x = x[..., top : top + size, left : left + size]
    return rearrange(x / 127.5 - 1, "(n l) c h w -> n c l h w", n=n)


@torch.no_grad()
def i3d_features(model: InceptionI3d, videos: np.ndarray, batch_size: int = 8, size: int = 224) -> np.ndarray:
    """[N, L, H, W, 3] uint8 -> [N, num_classes] I3D logits."""
    device = next(model.parameters()).device
    out = [
        model(i3d_preprocess(videos[i : i + batch_size], size).to(device)).cpu()
        for i in range(0, len(videos), batch_size)
    ]
    return torch.cat(out).double().numpy()


def fvd(model: InceptionI3d, real: np.ndarray, fake: np.ndarray, size: int = 224) -> float:
    return frechet_distance(
        *gaussian_stats(i3d_features(model, real, size=size)), *gaussian_stats(i3d_features(model, fake, size=size))
    )


def cd_fvd(model, real: np.ndarray, fake: np.ndarray) -> float:
    """Content-debiased FVD: the same distance on VideoMAE-v2 features (cmd_model.videomae)."""
    from cmd_model.videomae import videomae_features

    return frechet_distance(
        *gaussian_stats(videomae_features(model, real)), *gaussian_stats(videomae_features(model, fake))
    )


# ---------------------------------------------------------------------------------------
# CLIPSIM
# ---------------------------------------------------------------------------------------


def _embedding(out) -> torch.Tensor:
    """transformers 5 returns an output object (projected embedding in pooler_output); 4.x a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.no_grad()
def clipsim(model, processor, videos: np.ndarray, prompts: list[str]) -> float:
    """Mean over videos and frames of cos(CLIP image(frame), CLIP text(prompt)).

    model / processor: transformers CLIPModel and CLIPProcessor loaded from a local folder.
    """
    scores = []
    for video, prompt in zip(videos, prompts):
        inputs = processor(text=[prompt], images=list(video), return_tensors="pt", padding=True, truncation=True)
        image = F.normalize(_embedding(model.get_image_features(pixel_values=inputs["pixel_values"])), dim=-1)
        text = F.normalize(
            _embedding(model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])),
            dim=-1,
        )
        scores.append((image @ text.T).mean().item())
    return float(np.mean(scores))
