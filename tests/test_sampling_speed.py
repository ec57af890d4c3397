"""CMDGenerator's speed options (cmd_model.speed) change how the denoisers run, never what they make:
compiled and eager sampling agree, the UNet in channels_last agrees, on the CPU at the tiny presets.
Neither does batching: a row of the generate job's Ray batch is the video its seed gives alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cmd_model.autoencoder import VideoAutoencoder
from cmd_model.content import StableDiffusion
from cmd_model.dit import DiT
from cmd_model.generate import CMDGenerator
from cmd_model.presets import get_preset
from cmd_model.speed import SamplingSpeed


def pixel_generator(speed: SamplingSpeed) -> CMDGenerator:
    p = get_preset("tiny-pixel")
    torch.manual_seed(0)
    parts = (
        VideoAutoencoder.from_preset_config(p.autoencoder),
        DiT.from_preset_config(p.motion),
        DiT.from_preset_config(p.content),
    )
    return CMDGenerator(p, parts[0], parts[1], content_dit=parts[2], speed=speed)


def test_compiled_sampling_matches_eager():
    # One video: the benchmark test below compiles the same graphs (batch 1, guidance doubles it)
    # and finds them in Inductor's on-disk cache.
    eager = pixel_generator(SamplingSpeed())(labels=[3], seed=5)
    compiled_generator = pixel_generator(SamplingSpeed(compile="default"))
    compiled = compiled_generator(labels=[3], seed=5)
    # Compiled, not eager again
    assert all(type(m).__name__ == "OptimizedModule" for m in compiled_generator._prepared.values())
    # Inductor fuses and reorders float32 arithmetic: a few uint8 levels apart at most, on average far less.
    difference = np.abs(eager.astype(int) - compiled.astype(int))
    assert difference.max() <= 3 and difference.mean() < 0.1, (difference.max(), difference.mean())
    np.testing.assert_array_equal(compiled, compiled_generator(labels=[3], seed=5))  # the compiled graphs are reused


@pytest.mark.parametrize("preset", ["tiny-pixel", "tiny"])
def test_each_video_of_a_batch_is_the_one_its_seed_gives_alone(preset, tiny_sd_dir, tmp_path):
    """The Ray Data stage of `generate --prompts-file` samples its batch in one call, each row with its seed."""
    from pipelines.evaluation.generation import LABEL, NAME, PROMPT, SEED, GenerateVideos, GeneratorSpec

    p = get_preset(preset)
    torch.manual_seed(0)
    VideoAutoencoder.from_preset_config(p.autoencoder).save_pretrained(tmp_path / "autoencoder")
    DiT.from_preset_config(p.motion).save_pretrained(tmp_path / "motion")
    if p.mode == "latent":
        StableDiffusion.from_pretrained(str(tiny_sd_dir)).unet.save_pretrained(tmp_path / "content")
    else:
        DiT.from_preset_config(p.content).save_pretrained(tmp_path / "content")
    spec = GeneratorSpec(
        p,
        *(str(tmp_path / part) for part in ("autoencoder", "content", "motion")),
        stable_diffusion=str(tiny_sd_dir) if p.mode == "latent" else None,
        content_steps=3,
        motion_steps=3,
    )
    stage = GenerateVideos(spec, str(tmp_path / "out"))
    prompts, labels, seeds = ["a red ball", "fireworks", "a red ball"], [1, 4, 1], [3, 7, 3]
    names = ["first", "second", "first-again"]
    batch = {NAME: np.array(names, dtype=object), PROMPT: np.array(prompts, dtype=object)}
    rows = stage({**batch, LABEL: np.array(labels), SEED: np.array(seeds)})
    assert [Path(path).name for path in rows["path"]] == [f"{name}.mp4" for name in names]
    assert not (tmp_path / "out" / "contact_sheet.gif").exists()  # each batch would overwrite the last one's
    videos = [np.load(tmp_path / "out" / f"{name}.npz")["frames"] for name in names]
    for i, video in enumerate(videos):
        asked = {"prompts": [prompts[i]]} if p.mode == "latent" else {"labels": [labels[i]]}
        alone = stage.generator(seed=seeds[i], **asked, **spec.sampling_kwargs())[0]
        # Batched matmuls may round differently from a batch of one's: a uint8 level at most.
        assert np.abs(video.astype(int) - alone.astype(int)).max() <= 1, i
    assert np.abs(videos[0].astype(int) - videos[2].astype(int)).max() <= 1
    assert np.abs(videos[0].astype(int) - videos[1].astype(int)).mean() > 10  # another seed: another video
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        stage.generator(seed=[1, 2], **({"prompts": prompts} if p.mode == "latent" else {"labels": labels}))


def test_channels_last_unet_matches(tiny_sd_dir):
    p = get_preset("tiny")
    torch.manual_seed(0)
    ae, motion = VideoAutoencoder.from_preset_config(p.autoencoder), DiT.from_preset_config(p.motion)
    videos = {}
    for layout in (False, True):
        sd = StableDiffusion.from_pretrained(str(tiny_sd_dir))
        videos[layout] = CMDGenerator(p, ae, motion, sd=sd, speed=SamplingSpeed(channels_last=layout))(
            prompts=["a red ball"], seed=2
        )
        assert sd.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last) == layout
    assert np.abs(videos[False].astype(int) - videos[True].astype(int)).max() <= 1


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"compile": "fast"}, "compile must be one of default"),
        ({"precision": "int8"}, "precision must be auto or one of float32"),
    ],
)
def test_wrong_speed_options_fail_readably(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingSpeed(**kwargs)


def test_auto_precision_is_bfloat16_on_cuda_and_float32_on_the_cpu():
    # bfloat16 as the models trained; the paper's float16 by flag (it can overflow: samples are checked).
    assert SamplingSpeed().dtype("cuda") == torch.bfloat16 and SamplingSpeed().dtype("cpu") == torch.float32
    assert SamplingSpeed(precision="float16").dtype("cuda") == torch.float16
    assert SamplingSpeed(precision="bfloat16").dtype("cpu") == torch.bfloat16


def test_the_sampling_benchmark_runs_the_paper_setting_eager_and_compiled():
    """benchmarks/sampling.py --paper-setting on the CPU at a tiny preset: the GPU figures' code path."""
    import json
    import subprocess
    import sys

    from tests.test_train import ROOT

    out = subprocess.run(
        [
            sys.executable,
            "benchmarks/sampling.py",
            "--preset",
            "tiny-pixel",
            "--device",
            "cpu",
            "--paper-setting",
            "--compile",
            "default",
            "--batches",
            "1",
            "--repeats",
            "1",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    lines = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert lines[0]["flops_ratio"] > 1 and "cmd_seconds" in lines[0]  # our defaults against the video-UNet baseline
    paper = {line["compile"]: line for line in lines[1:]}
    assert set(paper) == {"eager", "default"}
    assert all(
        line["content_steps"] == line["motion_steps"] == 50 and line["batch"] == 1 and line["seconds"] > 0
        for line in paper.values()
    )
    assert paper["default"]["first_call_seconds"] > 0  # compiling is timed apart from the sampling it speeds up
