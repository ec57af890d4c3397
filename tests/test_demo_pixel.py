"""The pixel demo on a user's class folders: more classes than the preset, every one generated.

Its own file so that pytest-xdist (one file per worker) runs it beside tests/test_demo.py's latent run.
"""

import json

from tests.test_demo import index_rows, run_demo, users_folders


def test_pixel_demo_takes_its_classes_from_the_users_folders(tmp_path):
    # 20 class folders of 3 videos each, more than the preset's 16 (it once refused more than 12):
    # the content and motion DiTs get 20 classes from the latents' labels.
    videos = users_folders(tmp_path / "mine", 20, 3)
    out = tmp_path / "demo"
    stdout = run_demo(out, "--videos", str(videos), "--steps", "4", "--seeds", "1").stdout
    rows = index_rows(out / "samples")
    assert len(rows) == 20 and {int(r["label"]) for r in rows} == set(range(20))  # every class generated
    assert "colour right:" in stdout  # magenta, yellow and the rest are CSS4 names: judged
    for stage in ("content", "motion"):
        config = json.loads((out / "runs" / f"demo-{stage}" / "model" / "config.json").read_text())
        assert config["num_classes"] == 20
