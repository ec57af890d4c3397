"""The sweep file's schema and checks (pipelines.training.sweep_file): each mistake is one line naming where it is."""

from __future__ import annotations

import pytest

from pipelines.training.config import TrainConfig
from pipelines.training.sweep_file import SweepError, load_search

SPACE = "space: {lr: {choice: [0.001]}}\n"


@pytest.fixture
def base():
    return TrainConfig(stage="motion", preset="tiny", name="s", max_steps=4, latents="/latents", stable_diffusion="/sd")


@pytest.mark.parametrize(
    "text, message",
    [
        ("- a\n- b\n", "must be a mapping with keys metric, mode, scheduler, space"),
        ("metric: loss\n", "space is empty: name at least one parameter"),
        ("sched: {}\n" + SPACE, "unknown key(s) sched; valid: metric, mode, scheduler, space"),
        ("mode: median\n" + SPACE, "mode must be min or max, got 'median'"),
        (
            "scheduler: {patience: 2}\n" + SPACE,
            "unknown scheduler key 'patience'; valid: grace_period, reduction_factor, brackets",
        ),
        ("scheduler: {grace_period: 0}\n" + SPACE, "scheduler.grace_period must be a positive integer, got 0"),
        ("scheduler: {grace_period: true}\n" + SPACE, "scheduler.grace_period must be a positive integer, got True"),
        ("scheduler: {reduction_factor: 1}\n" + SPACE, "scheduler.reduction_factor must be a number above 1, got 1"),
        (
            "space: {lr: 0.001}\n",
            "space.lr must be one of {choice: ..., uniform: ..., loguniform: ..., randint: ...}, got 0.001",
        ),
        (
            "space: {lr: {normal: [0, 1]}}\n",
            "space.lr: unknown distribution 'normal'; valid: choice, uniform, loguniform, randint",
        ),
        ("space: {lr: {choice: 3}}\n", "space.lr.choice needs a non-empty list, got 3"),
        ("space: {lr: {loguniform: [0, 1]}}\n", "space.lr.loguniform: low must be above 0, got 0"),
        ("space: {lr: {uniform: [0.1, 0.01]}}\n", "space.lr.uniform: low 0.1 must be below high 0.01"),
    ],
)
def test_each_mistake_is_one_line_naming_it(text, message, base, tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    with pytest.raises(SweepError) as caught:
        load_search(str(path), base)
    assert str(caught.value) == f"sweep file {path}: {message}" or str(caught.value).startswith(
        f"sweep file {path}: {message}"
    )
    assert "\n" not in str(caught.value)


def test_a_good_file_gives_its_search(base, tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(
        "metric: eval/loss\nmode: min\nscheduler: {grace_period: 2, reduction_factor: 3}\n"
        "space: {lr: {loguniform: [1.0e-4, 1.0e-3]}, model.depth: {randint: [1, 2]}}\n"
    )
    search = load_search(str(path), base)
    assert (search.metric, search.mode, search.grace_period, search.reduction_factor) == ("eval/loss", "min", 2, 3.0)
    assert search.space == {"lr": ("loguniform", [1e-4, 1e-3]), "model.depth": ("randint", [1, 2])}
