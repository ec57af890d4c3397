"""CMDGenerator's speed options (cmd_model.speed) change how the denoisers run, never what they make:
compiled and eager sampling agree, the UNet in channels_last agrees, on the CPU at the tiny presets."""

from __future__ import annotations

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
