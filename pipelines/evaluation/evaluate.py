"""Evaluate CMD models the way the paper reports them, next to the paper's numbers.

- reconstruction: PSNR / SSIM of autoencoder round trips on held-out clips (+ R-FVD with I3D)
- generation: FVD between generated videos and real clips (StyleGAN-V protocol: one clip per video)
- text alignment: CLIPSIM of generated videos against their prompts (a local CLIP)
- content-debiased FVD: the same distance on VideoMAE-v2 features (given its weights)
I3D, VideoMAE and CLIP weights are read from local paths only; nothing is downloaded.
Videos stream through in batches (decode, round trip, features, drop): only per-video features and
scores are kept, so memory is the same for 64 videos or 2,048. Every network runs on the GPU when
there is one. The held-out motion loss (retraining's promotion metric) streams the same way.
"""

from __future__ import annotations

import csv
import io
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from einops import rearrange

from cmd_model.autoencoder import VideoAutoencoder
from cmd_model.content import latents_to_video, load_vae, uint8_to_unit, unit_to_uint8, video_to_latents
from cmd_model.i3d import InceptionI3d
from cmd_model.metrics import clipsim_scores, feature_distance, i3d_features, psnr_per_video, ssim_per_video
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


def video_sources(uri: str) -> list[dict]:
    """The videos under a folder, prefix or manifest (pipelines.data.sources), or the one video a URI names."""
    return list_sources(uri) if not uri.endswith(VIDEO_EXTENSIONS) else [{SOURCE: uri}]


def clip_batches(
    sources: list[dict], height: int, width: int, num_frames: int = 16, seed: int = 0, batch: int = 8
) -> Iterator[tuple[np.ndarray, list[dict]]]:
    """One random `num_frames` window per video (StyleGAN-V's protocol), seeded by (seed, video), `batch` at a time.

    Yields (uint8 clips [n <= batch, L, H, W, 3], rows), in the sources' order: rows[i] is the
    source row of clip i (source, caption / label when known) plus its start_frame, so a clip's
    condition travels with it. Videos are decoded as the batches are asked for, so one batch of
    clips is held whatever the number of videos. Videos that cannot be decoded are skipped (and
    logged); they leave no gap.
    """
    spec = ClipSpec(height=height, width=width, num_frames=num_frames, clips_per_video=1, sampling="random", seed=seed)
    clips, rows, decoded_any = [], [], False
    with IsolatedDecoder(spec) as decoder:
        for source in sources:
            with storage.local_copy(source[SOURCE]) as path:
                decoded, error = decoder.decode(source[SOURCE], open_file=lambda _: path)
            if not decoded:
                log.warning("evaluation video skipped: %s", error)
                continue
            clips.append(decoded[0][FRAMES])
            rows.append({**source, START_FRAME: int(decoded[0][START_FRAME])})
            if len(clips) == batch:
                yield np.stack(clips), rows
                clips, rows, decoded_any = [], [], True
    if clips:
        yield np.stack(clips), rows
    elif not decoded_any:
        raise ValueError(f"no usable {num_frames}-frame clip among {len(sources)} videos")


def one_clip_per_video(
    uri: str, height: int, width: int, limit: int | None = None, num_frames: int = 16, seed: int = 0
) -> tuple[np.ndarray, list[dict]]:
    """clip_batches' clips as one array [N, L, H, W, 3] and their rows: for small sets (the demo, tests)."""
    batches = list(clip_batches(video_sources(uri)[:limit], height, width, num_frames, seed))
    return np.concatenate([clips for clips, _ in batches]), [row for _, rows in batches for row in rows]


LOSSLESS, DECODED = "lossless .npz (the generator's arrays)", "decoded mp4 (H.264, lossy)"


def generated_batches(
    uri: str, height: int, width: int, limit: int | None = None, batch: int = 8
) -> tuple[str, list[str], Iterator[tuple[np.ndarray, list[str]]]]:
    """The generated videos of a `jobs/generate.py --out` folder, `batch` at a time: (which, names, batches).

    The generator's own arrays (<name>.npz, written beside each mp4) when present, so FVD and
    CLIPSIM see exactly what the model made; real clips are never re-encoded, and an H.264 round
    trip of the fakes alone (about 28 dB on textured 64x64 video) would bias FVD upward. Older
    folders without them fall back to decoding the mp4s, and say so. names: every listed video's,
    in order; batches yield (uint8 [n, L, H, W, 3], their names), read as they are asked for.
    """
    arrays = storage.list_files(uri, extensions=(".npz",)) if not uri.endswith(VIDEO_EXTENSIONS) else []
    if not arrays:
        sources = video_sources(uri)[:limit]
        decoded = clip_batches(sources, height, width, batch=batch)
        named = ((clips, [_stem(row[SOURCE]) for row in rows]) for clips, rows in decoded)
        return DECODED, [_stem(source[SOURCE]) for source in sources], named
    paths = sorted(arrays)[:limit]
    names = [_stem(path) for path in paths]
    read = (
        (np.stack([_read_frames(path) for path in paths[i : i + batch]]), names[i : i + batch])
        for i in range(0, len(paths), batch)
    )
    return LOSSLESS, names, read


def _read_frames(path: str) -> np.ndarray:
    with storage.open(path) as f:
        return np.load(io.BytesIO(f.read()), allow_pickle=False)["frames"]


def _stem(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[-1].rsplit(".", 1)[0]


def generated_prompts(uri: str, names: list[str]) -> list[str] | None:
    """Each generated video's prompt from the folder's index.csv (jobs/generate.py writes it), or None."""
    index = storage.join(uri, INDEX)
    if not storage.exists(index):
        return None
    by_name = {_stem(row["file"]): row[PROMPT] for row in csv.DictReader(io.StringIO(storage.read_text(index)))}
    return [by_name[name] for name in names] if all(name in by_name for name in names) else None


def default_device() -> torch.device:
    """Where the evaluation's networks run: the GPU when there is one."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def describe(device: torch.device) -> str:
    return f"{device} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else str(device)


class Reconstructor:
    """The autoencoder's round trip of a batch of uint8 clips [n, L, H, W, 3] (through the SD VAE in latent mode).

    Loads its networks once, onto `device` (default: the GPU when there is one); the clips travel
    there as uint8 and come back as uint8.
    """

    def __init__(self, preset: Preset, autoencoder: str, stable_diffusion: str | None, device=None):
        self.device = torch.device(device) if device is not None else default_device()
        self.ae = VideoAutoencoder.from_pretrained(fetch_model(autoencoder)).eval().to(self.device)
        latent = preset.mode == "latent"
        self.vae = (
            load_vae(node_copy(stable_diffusion or preset.stable_diffusion)).eval().to(self.device) if latent else None
        )

    @torch.no_grad()
    def __call__(self, clips: np.ndarray) -> np.ndarray:
        x = uint8_to_unit(clips, self.device)  # [n, L, 3, H, W]
        if self.vae is not None:
            x = video_to_latents(self.vae, x)
        video = rearrange(self.ae(rearrange(x, "n l c h w -> n c l h w")), "n c l h w -> n l c h w")
        if self.vae is not None:
            video = latents_to_video(self.vae, video)
        return unit_to_uint8(video)


def reconstruct(
    preset: Preset, autoencoder: str, clips: np.ndarray, stable_diffusion: str | None, batch: int = 4
) -> np.ndarray:
    """Autoencoder round trip of a whole array of uint8 clips [N, L, H, W, 3] (benchmarks; evaluate streams)."""
    round_trip = Reconstructor(preset, autoencoder, stable_diffusion)
    return np.concatenate([round_trip(clips[i : i + batch]) for i in range(0, len(clips), batch)])


@dataclass
class Networks:
    """The evaluation's networks, each loaded once onto one device, and what they measure on a batch.

    Every measurement is per video (features, scores), so a batch's clips can go once measured.
    """

    device: torch.device
    reconstructor: Reconstructor | None = None
    i3d: InceptionI3d | None = None
    videomae: torch.nn.Module | None = None
    clip: tuple | None = None  # transformers (CLIPModel, CLIPProcessor)
    i3d_size: int = 224  # I3D's input side: 224 for the published weights (tests run a narrow I3D smaller)
    described: dict = field(default_factory=dict)  # protocol lines: which weights each network is

    @classmethod
    def load(
        cls,
        preset: Preset,
        autoencoder: str | None = None,
        stable_diffusion: str | None = None,
        i3d: str | None = None,
        videomae: str | None = None,
        clip: str | None = None,
        device=None,
    ) -> Networks:
        device = torch.device(device) if device is not None else default_device()
        networks = cls(device)
        if autoencoder:
            networks.reconstructor = Reconstructor(preset, autoencoder, stable_diffusion, device)
        if i3d:
            # A converted folder (cmd-weights i3d: DeepMind's weights, TensorFlow conventions) or the port's .pt:
            # the model says which network and weights it is, so the protocol names what was measured.
            networks.i3d = InceptionI3d.from_file(i3d).to(device)
            networks.described["i3d"] = f"{networks.i3d.reference} from {i3d}"
        if videomae:
            from cmd_model.videomae import VideoMAEv2

            networks.videomae = VideoMAEv2.from_file(videomae).to(device)
            networks.described["videomae"] = f"VideoMAE-v2 ViT-g/14 features (cd-FVD) from {videomae}"
        if clip:
            from transformers import CLIPModel, CLIPProcessor

            networks.clip = (CLIPModel.from_pretrained(clip).eval().to(device), CLIPProcessor.from_pretrained(clip))
        return networks

    def _features(self, videos: np.ndarray, side: str) -> dict[str, np.ndarray]:
        out = {}
        if self.i3d is not None:
            out[f"i3d_{side}"] = i3d_features(self.i3d, videos, size=self.i3d_size)  # [n, 400]
        if self.videomae is not None and side != "recon":
            from cmd_model.videomae import videomae_features

            out[f"videomae_{side}"] = videomae_features(self.videomae, videos)  # [n, 1408]
        return out

    def real(self, clips: np.ndarray) -> dict[str, np.ndarray]:
        """Real clips: their features; with an autoencoder, each round trip's PSNR, SSIM and I3D logits."""
        out = self._features(clips, "real")
        if self.reconstructor is not None:
            recon = self.reconstructor(clips)
            out.update(psnr=psnr_per_video(clips, recon), ssim=ssim_per_video(clips, recon, device=self.device))
            out.update(self._features(recon, "recon"))
        return out

    def generated(self, videos: np.ndarray, prompts: list[str] | None) -> dict[str, np.ndarray]:
        """Generated videos: their features, and each one's CLIPSIM against its prompt."""
        out = self._features(videos, "fake")
        if self.clip is not None:
            out["clipsim"] = clipsim_scores(*self.clip, videos, prompts)
        return out


def measure(
    networks: Networks,
    preset: Preset,
    real: str,
    generated: str | None = None,
    prompts: list[str] | None = None,
    max_videos: int = 2048,
    seed: int = 0,
    batch: int = 8,
) -> dict:
    """The metrics the networks and inputs allow (psnr, ssim, r_fvd, fvd, cd_fvd, clipsim), unrounded,
    and the protocol they were measured under.

    Real and generated videos stream through in batches of `batch`: a batch is decoded, resized for
    each network by its preprocessing, measured, and dropped; only per-video features and scores
    are kept (400 I3D logits a video), so memory does not grow with the number of videos.
    """
    h, w = preset.video_size
    if generated:  # listed first, so missing prompts fail before any video is decoded
        which, names, fake_batches = generated_batches(generated, h, w, max_videos, batch)
        prompt_of = _prompts(generated, names, prompts) if networks.clip is not None else {}
    kept = defaultdict(list)  # per-video features and scores, one array per batch
    real_videos, frames = 0, None
    for clips, _ in clip_batches(video_sources(real)[:max_videos], h, w, seed=seed, batch=batch):
        real_videos, frames = real_videos + len(clips), clips.shape[1]
        for key, value in networks.real(clips).items():
            kept[key].append(value)
    protocol: dict = {
        "real_videos": real_videos,
        "clips_per_video": 1,
        "clip": "one random window per video (StyleGAN-V)",
        "frames": frames,
        "resolution": f"{h}x{w}",
        "seed": seed,
        "i3d": None,
        "videomae": None,
        "device": describe(networks.device),  # where the networks ran
        **networks.described,
    }
    if generated:
        fakes = 0
        for videos, batch_names in fake_batches:
            fakes += len(videos)
            for key, value in networks.generated(videos, [prompt_of.get(name) for name in batch_names]).items():
                kept[key].append(value)
        protocol.update(generated_videos=fakes, fakes=which)
    got = {key: np.concatenate(values) for key, values in kept.items()}
    results: dict = {}
    if "psnr" in got:
        results.update(psnr=float(got["psnr"].mean()), ssim=float(got["ssim"].mean()))
    if "i3d_recon" in got:
        results["r_fvd"] = feature_distance(got["i3d_real"], got["i3d_recon"])
    if "i3d_fake" in got:
        results["fvd"] = feature_distance(got["i3d_real"], got["i3d_fake"])
    if "videomae_fake" in got:
        results["cd_fvd"] = feature_distance(got["videomae_real"], got["videomae_fake"])
    if "clipsim" in got:
        results["clipsim"] = float(got["clipsim"].mean())
    return {**results, "protocol": protocol}


def _prompts(generated: str, names: list[str], prompts: list[str] | None) -> dict[str, str]:
    """Each generated video's prompt, by name: one given per video (file-name order), one for all, or index.csv's."""
    prompts = prompts or generated_prompts(generated, names)
    if not prompts:
        raise ValueError(
            "CLIPSIM needs the prompts of the generated videos: an index.csv in --generated "
            "(jobs/generate.py writes one), --prompt or --prompts-file"
        )
    return dict(zip(names, prompts)) if len(prompts) == len(names) else dict.fromkeys(names, prompts[0])


ROUNDING = {"psnr": 3, "ssim": 4, "r_fvd": 2, "fvd": 2, "cd_fvd": 2, "clipsim": 4}


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
    """The metrics the given inputs allow (psnr, ssim, r_fvd, fvd, cd_fvd, clipsim), rounded, and the
    protocol they were measured under; each network on the GPU when there is one."""
    # VideoMAE and CLIP measure generated videos only: without them they are not loaded.
    networks = Networks.load(
        preset, autoencoder, stable_diffusion, i3d, videomae if generated else None, clip if generated else None
    )
    results = measure(networks, preset, real, generated, prompts, max_videos, seed)
    return {key: round(value, ROUNDING[key]) if key in ROUNDING else value for key, value in results.items()}


def table(results: dict) -> str:
    lines = [f"{key}: {value}" for key, value in results.get("protocol", {}).items() if value is not None]
    lines += [f"{'metric':<10} {'ours':>12}   paper", "-" * 72]
    for key in ("psnr", "ssim", "r_fvd", "fvd", "cd_fvd", "clipsim"):
        if key in results:
            lines.append(f"{key:<10} {results[key]:>12}   {PAPER[key]}")
    return "\n".join(lines)


def clip_noise(seed: int, index: int, timesteps: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The held-out loss's noise for clip `index` (its place among the decoded clips) at every timestep:
    [timesteps, *shape], from a generator of its own, so a clip's noise does not depend on the batch
    it shares. Drawn on the CPU: the same noise wherever the model runs."""
    generator = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, index]).generate_state(1)[0]))
    return torch.randn(timesteps, *shape, generator=generator)


@torch.no_grad()
def heldout_motion_loss(
    preset: Preset,
    held_out: str,
    autoencoder: str,
    motion: str,
    stable_diffusion: str | None,
    timesteps: int = 10,
    seed: int = 0,
    batch: int = 8,
) -> float:
    """The motion DiT's loss (MSE to its prediction target) on held-out clips, at fixed timesteps
    and fixed noise (lower is better).

    Deterministic for given weights and clips, so model versions trained on different data are
    compared on exactly the same problem (the retraining job's promotion metric). The clips stream
    through `batch` at a time (decode, encode, loss) on the GPU when there is one; each clip's
    noise is its own (clip_noise), so the value does not depend on `batch`: it is the mean over
    clips and timesteps of each clip's MSE, which is the mean over all elements (every clip has as many).
    """
    from cmd_model.content import StableDiffusion
    from cmd_model.diffusion import dit_scheduler
    from cmd_model.dit import DiT

    device = default_device()
    h, w = preset.video_size
    ae = VideoAutoencoder.from_pretrained(fetch_model(autoencoder)).eval().to(device)
    dit = DiT.from_pretrained(fetch_model(motion)).eval().to(device)
    sd = None
    if preset.mode == "latent":  # its VAE and text encoder are used, not its UNet: only they move
        sd = StableDiffusion.from_pretrained(node_copy(stable_diffusion or preset.stable_diffusion))
        sd.vae.to(device)
        sd.text_encoder.to(device)
    scheduler = dit_scheduler(dit.config.prediction_type)
    steps = torch.linspace(0, scheduler.config.num_train_timesteps - 1, timesteps).long().to(device)
    errors = []  # [n, timesteps] per batch: each clip's MSE at each timestep
    done = 0  # clips measured so far: the next clip's index
    for clips, rows in clip_batches(video_sources(held_out), h, w, seed=seed, batch=batch):
        x = uint8_to_unit(clips, device)  # [n, L, 3, H, W]
        cond = {}  # each clip with its own video's condition
        if sd is not None:
            x = video_to_latents(sd.vae, x)
            cond["text"] = sd.encode_prompts([r.get("caption") or "" for r in rows])[1]
            unconditioned = [not r.get("caption") for r in rows]
        else:
            labels = [int(r["label"]) if r.get("label") is not None else 0 for r in rows]
            cond["labels"] = torch.tensor(labels, device=device)
            unconditioned = [r.get("label") is None for r in rows]
        # A clip without a caption or label is scored with the model's null condition, as it was trained.
        drop = torch.tensor(unconditioned, dtype=torch.bool, device=device)
        content, z = ae.encode(rearrange(x, "n l c h w -> n c l h w"))
        noise = torch.stack([clip_noise(seed, done + i, timesteps, z.shape[1:]) for i in range(len(z))]).to(device)
        done += len(z)
        per_step = []
        for k, t in enumerate(steps):
            tt = t.expand(len(z))
            predicted = dit(scheduler.add_noise(z, noise[:, k], tt), tt, context=content, drop=drop, **cond)
            target = (
                {"epsilon": noise[:, k], "sample": z}.get(dit.config.prediction_type)
                if dit.config.prediction_type != "v_prediction"
                else scheduler.get_velocity(z, noise[:, k], tt)
            )
            per_step.append((predicted.float() - target.float()).square().flatten(1).mean(dim=1))
        errors.append(torch.stack(per_step, dim=1).cpu())
    return float(torch.cat(errors).double().mean())
