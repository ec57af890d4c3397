"""Video metrics: PSNR and SSIM of reconstructions, FVD, and CLIPSIM.

Videos are uint8 arrays [N, L, H, W, 3] throughout.
FVD follows the StyleGAN-V protocol the paper used: one clip per video, Inception-I3D
(Kinetics-400) logits of 16 frames resized (shorter side 224) and centre-cropped to 224,
values in [-1, 1]; the Frechet distance between Gaussians fitted to real and fake features.
CLIPSIM (Wu et al. 2021): mean over frames of the cosine similarity between the CLIP image
embedding of each frame and the CLIP text embedding of the prompt (frames resized to 224).
Each metric has a per-video form (PSNR, SSIM and CLIPSIM per video, I3D / VideoMAE features per
video) that evaluation keeps while clips stream past in batches, and the whole-array form (their
mean, the distance of their Gaussians) built on it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from einops import rearrange
from scipy import linalg

from cmd_model.content import uint8_to_device
from cmd_model.i3d import InceptionI3d

# ---------------------------------------------------------------------------------------
# Reconstruction
# ---------------------------------------------------------------------------------------


def psnr_per_video(real: np.ndarray, fake: np.ndarray) -> np.ndarray:
    """Each video's PSNR (dB) over all its frames and pixels, for uint8 inputs [N, L, H, W, 3].

    Squared errors are summed as integers a frame at a time: exact (the float64 sums they replace
    were exact too, every partial sum being an integer below 2^53), and no float64 copy of a clip.
    """
    sse = np.array(
        [sum(int(np.square(a.astype(np.int64) - b).sum()) for a, b in zip(r, f)) for r, f in zip(real, fake)]
    )
    mse = sse / real[0].size
    return 10 * np.log10(255.0**2 / np.maximum(mse, 1e-10))


def psnr(real: np.ndarray, fake: np.ndarray) -> float:
    """Mean over videos of PSNR (dB) over all frames and pixels, for uint8 inputs."""
    return float(np.mean(psnr_per_video(real, fake)))


def _gaussian_1d(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - size // 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim_per_video(real: np.ndarray, fake: np.ndarray, batch_frames: int = 16, device="cpu") -> np.ndarray:
    """Each video's mean SSIM (Wang et al. 2004: 11x11 Gaussian window, sigma 1.5, K1 0.01, K2 0.03) over its frames.

    The window is separable, so it is applied as a row then a column filter, to the five maps at
    once (22 instead of 121 multiply-adds a pixel and map). Frames go through `batch_frames` at a
    time, in float64 on `device`: a 512x1024 frame's maps are 12.6 MB each, about a dozen live.
    """
    a_all, b_all = rearrange(real, "n l h w c -> (n l) c h w"), rearrange(fake, "n l h w c -> (n l) c h w")
    size = min(11, a_all.shape[-1], a_all.shape[-2]) // 2 * 2 + 1
    g = _gaussian_1d(size).to(device)
    row, column = g.view(1, 1, 1, size).expand(15, 1, 1, size), g.view(1, 1, size, 1).expand(15, 1, size, 1)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    frames = []  # each frame's mean SSIM
    for i in range(0, len(a_all), batch_frames):
        a = uint8_to_device(np.ascontiguousarray(a_all[i : i + batch_frames]), device).double()
        b = uint8_to_device(np.ascontiguousarray(b_all[i : i + batch_frames]), device).double()
        maps = torch.cat([a, b, a * a, b * b, a * b], dim=1)  # [n, 5 x 3, H, W]
        mu_a, mu_b, aa, bb, ab = F.conv2d(F.conv2d(maps, row, groups=15), column, groups=15).chunk(5, dim=1)
        var_a, var_b, cov = aa - mu_a**2, bb - mu_b**2, ab - mu_a * mu_b
        s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
        frames.append(s.mean(dim=(1, 2, 3)).cpu())
    return torch.cat(frames).view(len(real), -1).mean(dim=1).numpy()


def ssim(real: np.ndarray, fake: np.ndarray, batch_frames: int = 16) -> float:
    """Mean SSIM over all frames (every video has as many frames and pixels: the mean of per-video means)."""
    return float(np.mean(ssim_per_video(real, fake, batch_frames)))


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


def i3d_preprocess(videos: np.ndarray, size: int = 224, device="cpu") -> torch.Tensor:
    """uint8 [N, L, H, W, 3] -> float [N, 3, L, size, size] in [-1, 1] (shorter side resized, centre crop).

    The clips travel to `device` as uint8: on a GPU the float copy and the resize happen there.
    """
    x = uint8_to_device(videos, device).float()
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
        model(i3d_preprocess(videos[i : i + batch_size], size, device)).cpu() for i in range(0, len(videos), batch_size)
    ]
    return torch.cat(out).double().numpy()


def feature_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """The Frechet distance between Gaussians fitted to two sets of per-video features [N, D]."""
    return frechet_distance(*gaussian_stats(real), *gaussian_stats(fake))


def fvd(model: InceptionI3d, real: np.ndarray, fake: np.ndarray, size: int = 224) -> float:
    return feature_distance(i3d_features(model, real, size=size), i3d_features(model, fake, size=size))


def cd_fvd(model, real: np.ndarray, fake: np.ndarray) -> float:
    """Content-debiased FVD: the same distance on VideoMAE-v2 features (cmd_model.videomae)."""
    from cmd_model.videomae import videomae_features

    return feature_distance(videomae_features(model, real), videomae_features(model, fake))


# ---------------------------------------------------------------------------------------
# CLIPSIM
# ---------------------------------------------------------------------------------------


def _embedding(out) -> torch.Tensor:
    """transformers 5 returns an output object (projected embedding in pooler_output); 4.x a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@torch.no_grad()
def clipsim_scores(model, processor, videos: np.ndarray, prompts: list[str]) -> np.ndarray:
    """Each video's mean over frames of cos(CLIP image(frame), CLIP text(its prompt)): [N].

    model / processor: transformers CLIPModel and CLIPProcessor loaded from a local folder; the
    processor resizes on the CPU, the model runs where its weights are.
    """
    device, scores = model.device, []
    for video, prompt in zip(videos, prompts):
        inputs = processor(text=[prompt], images=list(video), return_tensors="pt", padding=True, truncation=True)
        inputs = {key: value.to(device) for key, value in inputs.items()}
        image = F.normalize(_embedding(model.get_image_features(pixel_values=inputs["pixel_values"])), dim=-1)
        text = F.normalize(
            _embedding(model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])),
            dim=-1,
        )
        scores.append((image @ text.T).mean().item())
    return np.array(scores)


def clipsim(model, processor, videos: np.ndarray, prompts: list[str]) -> float:
    """Mean over videos and frames of cos(CLIP image(frame), CLIP text(prompt))."""
    return float(np.mean(clipsim_scores(model, processor, videos, prompts)))
