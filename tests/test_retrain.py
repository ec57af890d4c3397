"""Scheduled retraining end to end: tiny preset, local Ray, real MLflow server.

Round 1 registers version 1; new videos arrive; round 2 processes only those and registers
version 2, promoted only if its held-out metric is better; round 3 finds nothing to do.
"""

import json
import shutil
from pathlib import Path

import pytest

from pipelines.data.synthetic_videos import make_dataset
from pipelines.platform import registry, tracking
from pipelines.retrain import METRIC, RetrainConfig, run_round


@pytest.fixture
def inbox(tmp_path):
    """Where new videos land: round 1 sees three, then two more arrive."""
    make_dataset(tmp_path / "batch1", 3, seed=3)
    make_dataset(tmp_path / "batch2", 2, seed=4)
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    return inbox


def _deliver(batch: Path, inbox: Path) -> None:
    for video in batch.rglob("*.mp4"):
        shutil.copy(video, inbox / f"{batch.name}_{video.parent.name}_{video.name}")


def test_three_rounds(tmp_path, inbox, mlflow_env, tiny_sd_dir, capsys):
    held_out = make_dataset(tmp_path / "held_out", 2, seed=9).parent
    cfg = RetrainConfig(
        input=str(inbox),
        workdir=str(tmp_path / "work"),
        preset="tiny",
        held_out=str(held_out),
        model_name="cmd-test",
        max_steps=3,
        batch_size=2,
        stable_diffusion=str(tiny_sd_dir),
        num_workers=0,  # Ray Train's local mode: the subject is the rounds (checkpoints kept all the same)
    )
    uri = tracking.tracking_uri()

    work = tmp_path / "work"
    _deliver(tmp_path / "batch1", inbox)
    first = run_round(cfg)
    assert first["round"] == 1 and first["new_videos"] == 3 and first["version"] == "1" and first["promoted"]
    assert registry.production(uri, "cmd-test").version == "1"
    processed_after_round_1 = (work / "processed.json").read_text()

    _deliver(tmp_path / "batch2", inbox)
    second = run_round(cfg)
    assert second["round"] == 2 and second["new_videos"] == 2 and second["version"] == "2"
    assert second["clips_written"] == 2 * 3  # only the new videos were precomputed (48 frames: 3 clips each)
    # Production (version 1) is measured again on the same held-out clips, not read from its tag.
    assert second[f"previous_production_{METRIC}"] == pytest.approx(first[METRIC], rel=1e-5)
    better = second[METRIC] < first[METRIC]
    assert second["promoted"] == better
    assert registry.production(uri, "cmd-test").version == ("2" if better else "1")
    version = tracking.client(uri).get_model_version("cmd-test", "2")
    assert version.tags["round"] == "2" and float(version.tags[METRIC]) == pytest.approx(second[METRIC])

    # Round 2 dies after registering (and maybe promoting), before it records its videos as done:
    # the next run finishes round 2 with the same version and decision, and registers nothing new.
    (work / "rounds" / "0002" / "done.json").unlink()
    (work / "processed.json").write_text(processed_after_round_1)
    capsys.readouterr()
    again = run_round(cfg)
    out = capsys.readouterr().out
    assert "[retrain-r0002-content] already finished" in out and "[retrain-r0002-motion] already finished" in out
    assert {k: again[k] for k in ("round", "version", "promoted", "clips_written")} == {
        "round": 2,
        "version": "2",
        "promoted": second["promoted"],
        "clips_written": 0,
    }
    assert len(tracking.client(uri).search_model_versions("name = 'cmd-test'")) == 2

    third = run_round(cfg)
    assert third == {"round": None, "new_videos": 0}
    assert len(json.loads((work / "processed.json").read_text())) == 5

    folder, meta = registry.load_bundle("models:/cmd-test@production")
    assert meta["preset"] == "tiny" and all((folder / part / "config.json").is_file() for part in registry.PARTS)
