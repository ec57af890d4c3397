"""Evaluate CMD models the way the paper reports them, next to the paper's numbers.

- reconstruction: PSNR / SSIM of autoencoder round trips on held-out clips (+ R-FVD with I3D)
- generation: FVD between generated videos and real clips (StyleGAN-V protocol: one clip per video)
- text alignment: CLIPSIM of generated videos against their prompts (a local CLIP)
- content-debiased FVD: the same distance on VideoMAE-v2 features (given its weights)
I3D, VideoMAE and CLIP weights are read from local paths only; nothing is downloaded.
"""

from __future__ import annotations

import csv
import io
import logging

import numpy as np
import torch
from einops import rearrange

from cmd_model.autoencoder import VideoAutoencoder
from cmd_model.content import latents_to_video, load_vae, uint8_to_unit, unit_to_uint8, video_to_latents
from cmd_model.i3d import InceptionI3d
from cmd_model.metrics import cd_fvd, clipsim, fvd, psnr, ssim
from cmd_model.presets import Preset
from pipelines.data.sources import VIDEO_EXTENSIONS, list_sources
from pipelines.data.video.isolated import IsolatedDecoder
from pipelines.data.video.schema import FRAMES, SOURCE, START_FRAME, ClipSpec
from pipelines.evaluation.generation import INDEX, PROMPT
from pipelines.platform import storage
from pipelines.platform.model_store import fetch_model, node_copy

log = logging.getLogger(__name__)

# Paper v1 numbers (reference Tables 1-4); PSNR/SSIM are not reported there.
PAPER = {
    "r_fvd": "7.72 (UCF-101), 69.5 (WebVid, D=8), 56.8 (D=16)",
    "fvd": "107 (UCF-101, 2,048 samples), 238.3 (WebVid, 5k)",
    "clipsim": "0.2894 (MSR-VTT), 0.3020 (WebVid)",
    "cd_fvd": "not reported (content-debiased FVD, Ge et al. 2024)",
    "psnr": "not reported",
    "ssim": "not reported",
}


def one_clip_per_video(
    uri: str, height: int, width: int, limit: int | None = None, num_frames: int = 16, seed: int = 0
) -> tuple[np.ndarray, list[dict]]:
    """One random 16-frame window per video (StyleGAN-V's protocol), seeded by (seed, video).

    Returns (uint8 clips [N, L, H, W, 3], rows): rows[i] is the source row of clip i (source,
    caption / label when known) plus its start_frame, so a clip's condition travels with it.
    Videos that cannot be decoded are skipped (and logged); they leave no gap in either list.
    """
    sources = list_sources(uri) if not uri.endswith(VIDEO_EXTENSIONS) else [{SOURCE: uri}]
    spec = ClipSpec(height=height, width=width, num_frames=num_frames, clips_per_video=1, sampling="random", seed=seed)
    clips, rows = [], []
    with IsolatedDecoder(spec) as decoder:
        for source in sources[:limit]:
            with storage.local_copy(source[SOURCE]) as path:
                decoded, error = decoder.decode(source[SOURCE], open_file=lambda _: path)
            if decoded:
                clips.append(decoded[0][FRAMES])
                rows.append({**source, START_FRAME: int(decoded[0][START_FRAME])})
            else:
                log.warning("evaluation video skipped: %s", error)
    if not clips:
        raise ValueError(f"no usable {num_frames}-frame clip in {uri}")
    return np.stack(clips), rows


LOSSLESS, DECODED = "lossless .npz (the generator's arrays)", "decoded mp4 (H.264, lossy)"


def generated_videos(uri: str, height: int, width: int, limit: int | None = None) -> tuple[np.ndarray, list[str], str]:
    """The generated videos of a `jobs/generate.py --out` folder: (uint8 [N, L, H, W, 3], names, which).

    The generator's own arrays (<name>.npz, written beside each mp4) when present, so FVD and
    CLIPSIM see exactly what the model made; real clips are never re-encoded, and an H.264 round
    trip of the fakes alone (about 28 dB on textured 64x64 video) would bias FVD upward. Older
    folders without them fall back to decoding the mp4s, and say so.
    """
    arrays = storage.list_files(uri, extensions=(".npz",)) if not uri.endswith(VIDEO_EXTENSIONS) else []
    if not arrays:
        clips, rows = one_clip_per_video(uri, height, width, limit)
        return clips, [_stem(r[SOURCE]) for r in rows], DECODED
    videos = []
    for path in sorted(arrays)[:limit]:
        with storage.open(path) as f:
            videos.append(np.load(io.BytesIO(f.read()), allow_pickle=False)["frames"])
    return np.stack(videos), [_stem(p) for p in sorted(arrays)[:limit]], LOSSLESS


def _stem(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]


def generated_prompts(uri: str, names: list[str]) -> list[str] | None:
    """Each generated video's prompt from the folder's index.csv (jobs/generate.py writes it), or None."""
    index = storage.join(uri, INDEX)
    if not storage.exists(index):
        return None
    by_name = {_stem(row["file"]): row[PROMPT] for row in csv.DictReader(io.StringIO(storage.read_text(index)))}
    return [by_name[name] for name in names] if all(name in by_name for name in names) else None


@torch.no_grad()
def reconstruct(
    preset: Preset, autoencoder: str, clips: np.ndarray, stable_diffusion: str | None, batch: int = 4
) -> np.ndarray:
    """Autoencoder round trip of uint8 clips [N, L, H, W, 3] (through the SD VAE in latent mode)."""
    ae = VideoAutoencoder.from_pretrained(fetch_model(autoencoder)).eval()
    vae = load_vae(node_copy(stable_diffusion or preset.stable_diffusion)).eval() if preset.mode == "latent" else None
    out = []
    for i in range(0, len(clips), batch):
        x = uint8_to_unit(clips[i : i + batch])  # [n, L, 3, H, W]
        if vae is not None:
            x = video_to_latents(vae, x)
        video = rearrange(ae(rearrange(x, "n l c h w -> n c l h w")), "n c l h w -> n l c h w")
        if vae is not None:
            video = latents_to_video(vae, video)
        out.append(unit_to_uint8(video))
    return np.concatenate(out)


def evaluate(
    preset: Preset,
    real: str,
    autoencoder: str | None = None,
    generated: str | None = None,
    stable_diffusion: str | None = None,
    i3d: str | None = None,
    clip: str | None = None,
    prompts: list[str] | None = None,
    max_videos: int = 2048,
    seed: int = 0,
    videomae: str | None = None,
) -> dict:
    """The metrics the given inputs allow (psnr, ssim, r_fvd, fvd, clipsim) and the protocol they
    were measured under."""
    h, w = preset.video_size
    real_clips, real_rows = one_clip_per_video(real, h, w, max_videos, seed=seed)
    results: dict = {}
    protocol: dict = {
        "real_videos": len(real_clips),
        "clips_per_video": 1,
        "clip": "one random window per video (StyleGAN-V)",
        "frames": real_clips.shape[1],
        "resolution": f"{h}x{w}",
        "seed": seed,
        "i3d": None,
        "videomae": f"VideoMAE-v2 ViT-g/14 features (cd-FVD) from {videomae}" if videomae else None,
    }
    # A converted folder (cmd-weights i3d: DeepMind's weights, TensorFlow conventions) or the port's .pt:
    # the model says which network and weights it is, so the protocol names what was measured.
    i3d_model = InceptionI3d.from_file(i3d) if i3d else None
    if i3d_model is not None:
        protocol["i3d"] = f"{i3d_model.reference} from {i3d}"
    if autoencoder:
        recon = reconstruct(preset, autoencoder, real_clips, stable_diffusion)
        results.update(psnr=round(psnr(real_clips, recon), 3), ssim=round(ssim(real_clips, recon), 4))
        if i3d_model is not None:
            results["r_fvd"] = round(fvd(i3d_model, real_clips, recon), 2)
    if generated:
        fake, names, which = generated_videos(generated, h, w, max_videos)
        protocol.update(generated_videos=len(fake), fakes=which)
        if i3d_model is not None:
            results["fvd"] = round(fvd(i3d_model, real_clips, fake), 2)
        if videomae:
            from cmd_model.videomae import VideoMAEv2

            results["cd_fvd"] = round(cd_fvd(VideoMAEv2.from_file(videomae), real_clips, fake), 2)
        if clip:
            from transformers import CLIPModel, CLIPProcessor

            prompts = prompts or generated_prompts(generated, names)
            if not prompts:
                raise ValueError(
                    "CLIPSIM needs the prompts of the generated videos: an index.csv in --generated "
                    "(jobs/generate.py writes one), --prompt or --prompts-file"
                )
            prompts = prompts if len(prompts) == len(fake) else [prompts[0]] * len(fake)
            results["clipsim"] = round(
                clipsim(CLIPModel.from_pretrained(clip).eval(), CLIPProcessor.from_pretrained(clip), fake, prompts), 4
            )
    return {**results, "protocol": protocol}


def table(results: dict) -> str:
    lines = [f"{key}: {value}" for key, value in results.get("protocol", {}).items() if value is not None]
    lines += [f"{'metric':<10} {'ours':>12}   paper", "-" * 72]
    for key in ("psnr", "ssim", "r_fvd", "fvd", "cd_fvd", "clipsim"):
        if key in results:
            lines.append(f"{key:<10} {results[key]:>12}   {PAPER[key]}")
    return "\n".join(lines)


@torch.no_grad()
def heldout_motion_loss(
    preset: Preset,
    held_out: str,
    autoencoder: str,
    motion: str,
    stable_diffusion: str | None,
    timesteps: int = 10,
    seed: int = 0,
) -> float:
    """The motion DiT's loss (MSE to its prediction target) on held-out clips, at fixed timesteps
    and fixed noise (lower is better).

    Deterministic for given weights and clips, so model versions trained on different data are
    compared on exactly the same problem (the retraining job's promotion metric).
    """
    from cmd_model.content import StableDiffusion
    from cmd_model.diffusion import dit_scheduler
    from cmd_model.dit import DiT

    h, w = preset.video_size
    clips, rows = one_clip_per_video(held_out, h, w, seed=seed)  # each clip with its own video's condition
    ae = VideoAutoencoder.from_pretrained(fetch_model(autoencoder)).eval()
    dit = DiT.from_pretrained(fetch_model(motion)).eval()
    x = uint8_to_unit(clips)
    cond = {}
    if preset.mode == "latent":
        sd = StableDiffusion.from_pretrained(node_copy(stable_diffusion or preset.stable_diffusion))
        x = video_to_latents(sd.vae, x)
        cond["text"] = sd.encode_prompts([r.get("caption") or "" for r in rows])[1]
        unconditioned = [not r.get("caption") for r in rows]
    else:
        cond["labels"] = torch.tensor([int(r["label"]) if r.get("label") is not None else 0 for r in rows])
        unconditioned = [r.get("label") is None for r in rows]
    # A clip without a caption or label is scored with the model's null condition, as it was trained.
    drop = torch.tensor(unconditioned, dtype=torch.bool)
    content, z = ae.encode(rearrange(x, "n l c h w -> n c l h w"))
    scheduler, generator = dit_scheduler(dit.config.prediction_type), torch.Generator().manual_seed(seed)
    losses = []
    for t in torch.linspace(0, scheduler.config.num_train_timesteps - 1, timesteps).long():
        noise = torch.randn(z.shape, generator=generator)
        tt = t.expand(z.shape[0])
        predicted = dit(scheduler.add_noise(z, noise, tt), tt, context=content, drop=drop, **cond)
        target = (
            {"epsilon": noise, "sample": z}.get(dit.config.prediction_type)
            if dit.config.prediction_type != "v_prediction"
            else scheduler.get_velocity(z, noise, tt)
        )
        losses.append(torch.nn.functional.mse_loss(predicted, target).item())
    return float(np.mean(losses))
