"""The demo's judge: right on every ground-truth video, no better than chance on noise."""

import av
import numpy as np

from pipelines.data.synthetic_videos import (
    CLASSES,
    COLOURS,
    PALETTE,
    caption,
    css4_rgb,
    draw,
    draw_shape_video,
    make_dataset,
    make_shapes_dataset,
    shape_caption,
    shape_classes,
    textured_background,
)
from pipelines.evaluation.shape_detector import detect, judge, parse_class, spread


def decode(path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def test_every_ground_truth_clip_is_judged_right(tmp_path):
    videos, asked = [], []
    # Every class twice, as the demo trains on it and as it holds out (4 places per lane), H.264 round trip.
    for folder, starts in (("train", 1), ("held_out", 4)):
        manifest = make_dataset(tmp_path / folder, 24, starts=starts)
        videos_and_texts(manifest, videos, asked)
    scores = judge(videos, asked)
    assert scores["samples"] == 2 * 72
    assert scores["colour_accuracy"] == 1.0 and scores["direction_accuracy"] == 1.0


def videos_and_texts(manifest, videos: list, asked: list) -> None:
    """Every 16-frame clip of every video in the manifest, as precompute cuts them, with its caption."""
    for line in manifest.read_text().splitlines()[1:]:
        path, text, _ = line.rsplit(",", 2)
        frames = decode(manifest.parent / path)
        for start in range(0, len(frames) - 15, 16):
            videos.append(frames[start : start + 16])
            asked.append(text)


def test_wrap_around_and_other_sizes():
    # A square crossing the right edge (it wraps to the left) still moves right, at any frame size.
    for width, height in ((32, 32), (96, 64)):
        video = np.stack([draw("green", "right", i, width, height, start=(width - 6, 3)) for i in range(16)])
        assert detect(video).colour == "green" and detect(video).direction == "right"
        video = np.stack([draw("blue", "up", i, width, height, start=(5, 2)) for i in range(16)])
        assert (detect(video).colour, detect(video).direction) == ("blue", "up")


def test_noise_scores_no_better_than_chance():
    rng = np.random.default_rng(0)
    asked = [caption(*CLASSES[i % 12]) for i in range(96)]
    white = [rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8) for _ in asked]
    blank = [np.full((16, 32, 32, 3), 235, np.uint8) for _ in asked]
    # Squares of a random colour that jump to a random place every frame: foreground and colour
    # are there, a direction is not.
    jumping = []
    for _ in asked:
        colour = list(COLOURS)[rng.integers(3)]
        jumping.append(
            np.stack([draw(colour, "right", 0, 32, 32, start=tuple(rng.integers(0, 32, 2))) for _ in range(16)])
        )
    for videos in (white, blank):
        scores = judge(videos, asked)
        assert scores["colour_accuracy"] == 0 and scores["direction_accuracy"] == 0
    scores = judge(jumping, asked)
    assert scores["colour_accuracy"] < 0.5  # chance is 1/3: the colour is random
    assert scores["direction_accuracy"] < 0.4  # chance is 1/4


def test_parse_class_reads_prompts_and_folder_names():
    assert parse_class("a red square moving up") == ("red", "up")
    assert parse_class("blue_left") == ("blue", "left")
    assert parse_class("a dog surfing") == (None, None)


def test_every_built_in_shape_video_is_judged_right(tmp_path):
    # The demo's data: three shapes anywhere on textured, noisy backgrounds, 16 classes of CSS4
    # colours (yellow beside red and green), through H.264 as the demo writes them.
    manifest = make_shapes_dataset(tmp_path / "shapes", 6, 16, seed=3)
    videos, asked = [], []
    videos_and_texts(manifest, videos, asked)
    scores = judge(videos, asked)
    assert scores["samples"] == 96
    assert scores["colour_accuracy"] == 1.0 and scores["direction_accuracy"] == 1.0, [
        r for r in scores["rows"] if not (r["colour_ok"] and r["direction_ok"])
    ]
    # The place across the motion spreads over the frame (rows for right/left, columns for down/up).
    assert spread(scores["rows"]) > 4.0


def test_any_css4_colour_is_named_among_the_asked_ones():
    rng = np.random.default_rng(0)
    asked, videos = [], []
    for colour in ("orange", "purple", "teal", "gold", "crimson", "navy"):
        video, _ = draw_shape_video(rng, colour, "up", "circle")
        videos.append(video)
        asked.append(f"{colour}_up")
    scores = judge(videos, asked)
    assert scores["colour_accuracy"] == 1.0 and scores["direction_accuracy"] == 1.0, scores["rows"]
    assert parse_class("dark_green_down") == ("darkgreen", "down")
    assert parse_class("a light sea green shape moving left") == ("lightseagreen", "left")


def test_noise_on_the_new_data_scores_no_better_than_chance():
    rng = np.random.default_rng(1)
    asked = [shape_caption(*c) for c in shape_classes(16)] * 4
    white = [rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8) for _ in asked]
    # One textured background with a shape of a random palette colour at a new random place every frame.
    jumping = []
    for _ in asked:
        background, rgb = textured_background(rng, 32, 32), css4_rgb(PALETTE[rng.integers(4)])
        frames = []
        for _ in range(16):
            frame = background.copy()
            x, y = rng.integers(0, 25, 2)
            frame[y : y + 7, x : x + 7] = rgb
            frames.append(np.clip(frame + rng.normal(0, 3, frame.shape), 0, 255).astype(np.uint8))
        jumping.append(np.stack(frames))
    assert judge(white, asked)["both_accuracy"] == 0
    scores = judge(jumping, asked)
    assert scores["colour_accuracy"] < 0.45  # chance is 1/4
    assert scores["direction_accuracy"] < 0.4  # chance is 1/4
