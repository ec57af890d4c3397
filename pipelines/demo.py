"""The whole CMD chain on the CPU, with no network, that shows it learned (`make demo`).

Steps (each a real job: Ray Train, Ray Data, Ray Tune, one MLflow run each):
1. videos     the built-in moving-shapes videos (16 classes: 4 colours x 4 directions), or --videos DIR
2. SD         latent mode: a stand-in Stable Diffusion built from configs, whose VAE is then
              trained on the videos' frames (the vae stage); a real SD folder needs neither
3. train      the video autoencoder (on the videos)
4. precompute content and motion latents (Ray Data -> Parquet)
5. train      the content model (SD UNet on text, or class DiT) and the motion DiT (on the latents)
6. sweep      a small Ray Tune sweep of the motion DiT (one MLflow child run per trial)
7. generate   every prompt or class with several seeds: mp4s, samples/index.csv, a labelled contact sheet
8. judge      pipelines.evaluation.shape_detector reads colour and direction from each generated video alone
9. evaluate   the autoencoder's PSNR/SSIM on held-out videos
Everything lands under --out, the MLflow store (sqlite + artifacts) included.

The terminal shows the demo's own lines only: one per stage (on a terminal, a live line with a
bar of the training steps while it runs), then the table. Ray's and MLflow's output goes to
--out/logs/demo.log, whose last lines are shown if a stage fails; --verbose shows everything.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import os
import re
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PRESET_OF_MODE = {"latent": "shapes-latent", "pixel": "shapes-pixel"}
# Optimizer steps per stage at the default preset sizes; measured to reach the targets of
# benchmarks/learning.py on 2 cores (see the README's figures). --steps N sets them all (tests).
# Steps a stage gets in a 10-minute demo on 2 cores (benchmarks/learning.py --minutes scales them).
TEN_MINUTE_STEPS = {
    "pixel": {"vae": 0, "autoencoder": 1200, "content": 4000, "motion": 1000},
    # The SD UNet costs ~4x the content DiT's step, the autoencoder ~2x (it encodes through the VAE).
    "latent": {"vae": 300, "autoencoder": 600, "content": 1000, "motion": 1000},
}
# Pixel mode reaches its targets in 10 minutes; latent mode learns colour and direction only with
# twice the steps (16 min 25 s: docs/how_the_demo_learns.md), so that is its default.
DEFAULT_STEPS = {
    "pixel": dict(TEN_MINUTE_STEPS["pixel"]),
    "latent": {k: 2 * v for k, v in TEN_MINUTE_STEPS["latent"].items()},
}
BATCH = {"vae": 8, "autoencoder": 16, "content": 32, "motion": 32}  # clips per step (the VAE takes 4 frames of each)
# Built-in data: videos per class (training, held out) and classes (colour x direction, CSS4 colours).
BUILT_IN_PER_CLASS, BUILT_IN_HELD_OUT, BUILT_IN_CLASSES = 24, 3, 16
# One training worker at a time, with the machine's cores (up to 4; Ray gives a worker as many
# torch threads as CPUs it reserves): the data is cached in Ray's object store before training,
# so nothing else needs them. With 1 CPU a 2-core laptop trains at half speed.
TRAIN_THREADS = float(min(4, os.cpu_count() or 1))
EXPERIMENTS = ("cmd-vae", "cmd-autoencoder", "cmd-content", "cmd-motion", "cmd-motion-sweeps", "cmd-demo")


@dataclass
class DemoConfig:
    out: Path
    mode: str = "pixel"
    videos: str = str(BUILT_IN_PER_CLASS)  # built-in videos per class, or a folder / manifest of the user's
    classes: int = BUILT_IN_CLASSES  # of the built-in videos
    steps: dict | None = None  # per stage; None: DEFAULT_STEPS[mode]
    trials: int = 0
    seeds: int = 4  # per class: the spread of places over seeds needs several
    num_workers: int = 1  # Ray Train workers per training stage; 0: Ray Train's local mode (in this process)

    def __post_init__(self):
        if self.steps is None:
            self.steps = dict(DEFAULT_STEPS[self.mode])


def built_in_data(out: Path, per_class: int, num_classes: int) -> tuple[Path, Path]:
    """The built-in shapes: `per_class` training videos of each class, and BUILT_IN_HELD_OUT more per
    class drawn apart (their own places, shapes and backgrounds) for the held-out evaluation."""
    from pipelines.data.synthetic_videos import make_shapes_dataset

    return (
        make_shapes_dataset(out / "videos", per_class, num_classes),
        make_shapes_dataset(out / "held_out", BUILT_IN_HELD_OUT, num_classes, seed=1),
    )


def stratified_split(rows: list[dict], key: str) -> tuple[list[dict], list[dict]]:
    """(train, held out): a tenth of the videos (at least one) held out, spread over the classes.

    Classes take turns, the largest first, each giving up its last video; a class keeps at least
    one video for training, so a class with one video is never held out. With 16 classes of 4
    videos, 6 classes lose one video each (not one class all of its four).
    """
    by_class: dict = {}
    for row in rows:
        by_class.setdefault(row[key], []).append(row)
    want = max(1, len(rows) // 10)
    held: list[dict] = []
    order = sorted(by_class, key=lambda k: (-len(by_class[k]), str(k)))
    while len(held) < want:
        givers = [k for k in order if len(by_class[k]) > 1]
        if not givers:
            break
        for k in givers[: want - len(held)]:
            held.append(by_class[k].pop())
    taken = {id(r) for r in held}
    return [r for r in rows if id(r) not in taken], held


def user_data(videos: str, out: Path, mode: str) -> tuple[Path, Path]:
    """A folder of class folders or a CSV/Parquet manifest -> (train, held-out) manifests under OUT.

    Class folders: the folder name is the class (labels in sorted order) and, in latent mode, the
    caption with '_' as spaces. A tenth of the videos is held out, spread over the classes
    (stratified_split).
    """
    from pipelines.data.sources import list_sources, write_manifest

    if videos.lower().endswith((".csv", ".parquet")):
        rows = [
            {"path": s["source"], "caption": s["caption"] or "", "label": "" if s["label"] is None else s["label"]}
            for s in list_sources(videos)
        ]
    else:
        root = Path(videos).resolve()
        sources = list_sources(str(root), labels="folder")
        names = sorted({Path(s["source"]).resolve().relative_to(root).parts[0] for s in sources})
        rows = []
        for s in sources:
            name = Path(s["source"]).resolve().relative_to(root).parts[0]
            rows.append({"path": s["source"], "caption": name.replace("_", " "), "label": names.index(name)})
    if len(rows) < 2:
        raise SystemExit(f"error: {videos} holds {len(rows)} video(s); the demo needs at least 2")
    if mode == "latent" and not all(r["caption"] for r in rows):
        raise SystemExit(f"error: latent mode needs a caption per video: {videos} has videos without one")
    if mode == "pixel" and not all(r["label"] != "" for r in rows):
        raise SystemExit(f"error: pixel mode needs a class label per video: {videos} has videos without one")
    train, held = stratified_split(rows, "caption" if mode == "latent" else "label")
    if not held:
        raise SystemExit(f"error: {videos} has one video per class; the demo holds one out of a class with 2 or more")
    (out / "data").mkdir(parents=True, exist_ok=True)
    return (
        Path(write_manifest(train, str(out / "data" / "train.csv"))),
        Path(write_manifest(held, str(out / "data" / "held_out.csv"))),
    )


def classes_of(manifest: Path, mode: str) -> list[tuple[str, int | None]]:
    """(prompt or class name, label) of every class in the training manifest, in label order."""
    seen: dict = {}
    with open(manifest) as f:
        for row in csv.DictReader(f):
            label = int(row["label"]) if row.get("label") not in (None, "") else None
            text = row.get("caption") or str(label)
            seen.setdefault(text if mode == "latent" else label, (text, label))
    return sorted(seen.values(), key=lambda item: (item[1] is None, item[1] if item[1] is not None else 0, item[0]))


class Console:
    """The demo's own lines. `say` prints one; `stage` brackets a stage with a line as it starts and
    one as it ends, or, on a terminal (`live`), with one line redrawn while it runs: its seconds and,
    for a training stage, a bar of its steps.

    say: where lines go (benchmarks/learning.py passes its own); by default "[demo  12.3s] msg" to
    `terminal`, the demo's stdout (a copy of it while fds 1 and 2 go to the log).
    """

    REDRAW_S, POLL_S = 0.5, 2.0

    def __init__(self, say=None, terminal=None, live: bool = False, start: float | None = None):
        self.start = time.monotonic() if start is None else start
        self.terminal = terminal if terminal is not None else sys.stdout
        self.live = live
        self._say = say
        self.current: str | None = None  # the stage running, named in the error line when it fails

    def stamp(self) -> str:
        return f"[demo {time.monotonic() - self.start:6.1f}s]"

    def say(self, msg: str) -> None:
        if self._say is not None:
            self._say(msg)
        else:
            print(f"{self.stamp()} {msg}", file=self.terminal, flush=True)

    @contextlib.contextmanager
    def stage(self, name: str, steps=None):
        """steps: (() -> steps done or None, total) for a training stage's bar."""
        self.current = name
        if not self.live:
            self.say(f"{name} ...")
            yield
        else:
            stop = threading.Event()
            drawer = threading.Thread(target=self._draw, args=(name, steps, stop), name="demo-progress", daemon=True)
            drawer.start()
            try:
                yield
            finally:
                stop.set()
                drawer.join()
                self.terminal.write("\r\x1b[K")  # the live line gives way to the stage's last line
                self.terminal.flush()
        self.current = None

    def width(self) -> int:
        try:  # the terminal's own: fd 1, which shutil.get_terminal_size asks, is the log by now
            return os.get_terminal_size(self.terminal.fileno()).columns or 80
        except (OSError, ValueError):
            return 80

    def _draw(self, name: str, steps, stop: threading.Event) -> None:
        started, polled, done = time.monotonic(), 0.0, None
        while not stop.is_set():
            now = time.monotonic()
            if steps is not None and now - polled >= self.POLL_S:
                polled = now
                with contextlib.suppress(Exception):  # progress is a nicety: a failed poll shows the last one
                    done = steps[0]()
            line = f"{self.stamp()} {name:<11} {progress_bar(done, steps[1]) if steps else ''}{now - started:5.0f} s"
            self.terminal.write("\r\x1b[K" + line[: self.width() - 1])
            self.terminal.flush()
            stop.wait(self.REDRAW_S)


def progress_bar(done: int | None, total: int, width: int = 24) -> str:
    """'[#########---------------]  400/1200 steps  ' (done None: not started yet)."""
    filled = round(width * min(done or 0, total) / max(1, total))
    return f"[{'#' * filled}{'-' * (width - filled)}] {done or 0:>{len(str(total))}}/{total} steps  "


def steps_logged(uri: str, stage: str, name: str, storage: str) -> int | None:
    """The last step of training loss the run `name` (of `stage`, under `storage`) has logged to MLflow.

    The source of a training stage's bar: the Ray Train workers log their loss to the job's MLflow
    run (every log_every steps, sent every few logs), which this driver can read while fit() waits,
    whatever store or server the tracking URI names, with no change to the jobs. None before the
    run exists.
    """
    from pipelines.platform import tracking

    client = tracking.client(uri)
    experiment = client.get_experiment_by_name(f"cmd-{stage}")
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=tracking.tag_filter(**{tracking.NAME_TAG: name, tracking.STORAGE_TAG: storage}),
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    if not runs:
        return None
    return max((m.step for m in client.get_metric_history(runs[0].info.run_id, "loss")), default=0)


class StageClock:
    """Seconds per demo stage, in the order they ran; each stage's lines on the console."""

    def __init__(self, console: Console, uri: str | None = None, steps: dict | None = None, storage: str = ""):
        self.seconds: dict[str, float] = {}
        self.console = console
        self.uri, self.steps, self.storage = uri, steps or {}, storage

    def run(self, stage: str, fn, summary=None, train: bool = False):
        """fn() as `stage`; summary(result): what the stage's last line says it made. train: a
        training stage (run demo-<stage>), whose bar counts the steps its MLflow run has logged."""
        steps = None
        if train and self.uri:
            steps = (lambda: steps_logged(self.uri, stage, f"demo-{stage}", self.storage), self.steps[stage])
        start = time.monotonic()
        with self.console.stage(stage, steps):
            result = fn()
        self.seconds[stage] = round(time.monotonic() - start, 1)
        self.console.say(f"{stage:<11} {self.seconds[stage]:6.1f} s" + (f"  {summary(result)}" if summary else ""))
        return result


@dataclass
class TrainedChain:
    """What the training steps made: model folders (sd is None in pixel mode) and the latents."""

    autoencoder: str
    content: str
    motion: str
    latents: str
    held_latents: str
    sd: str | None
    motion_loss: float  # the motion DiT's last validation loss on the held-out latents
    clips: int  # training clips


def chain(cfg: DemoConfig, say=print, console: Console | None = None) -> dict:
    """Run every step; returns seconds per stage, the judge's scores, the evaluation and the paths.

    say: where the demo's lines go (one as each stage starts and ends), unless `console` is given.
    """
    from cmd_model.presets import get_preset
    from pipelines.evaluation.evaluate import evaluate

    console = console or Console(say=say)
    say = console.say
    preset = get_preset(PRESET_OF_MODE[cfg.mode])
    say(mode_name(cfg.mode))
    uri = demo_tracking(cfg.out)
    clock = StageClock(console, uri, cfg.steps, str(cfg.out / "runs"))
    train, held_out, classes = clock.run(
        "videos",
        lambda: demo_data(cfg, preset),
        summary=lambda r: f"{count_rows(r[0])} training videos, {len(r[2])} classes; held out: {r[1]}",
    )
    trained = train_chain(cfg, preset, train, held_out, clock)
    if cfg.trials:
        trained = sweep(cfg, preset, trained, clock, say)
    videos, index = generate(cfg, preset, trained, classes, clock)
    judged = clock.run(
        "judge", lambda: judge_samples(cfg.out, videos, index, classes, train, preset), summary=judge_summary
    )
    evaluation = clock.run(
        "evaluate",
        lambda: evaluate(preset, str(held_out), autoencoder=trained.autoencoder, stable_diffusion=trained.sd),
        summary=lambda e: f"autoencoder on the held-out videos: PSNR {e['psnr']:.2f} dB, SSIM {e['ssim']:.3f}",
    )
    (cfg.out / "evaluation.json").write_text(json.dumps(evaluation, indent=2))
    result = dict(
        mode=cfg.mode,
        preset=preset.name,
        seconds=clock.seconds,
        evaluation=evaluation,
        judged=judged,
        samples=str(cfg.out / "samples"),
        videos=len(videos),
        classes=classes,
        models=dataclasses.asdict(trained),  # model folders and latents: benchmarks/learning.py reloads them
    )
    log_demo_run(uri, cfg.out, cfg, result)
    return result


def demo_tracking(out: Path) -> str:
    """The tracking URI; with a sqlite store the artifacts go beside it, so everything stays under --out."""
    from pipelines.platform import tracking

    uri = tracking.tracking_uri()
    if uri.startswith("sqlite:///"):
        for name in EXPERIMENTS:
            tracking.ensure_experiment(uri, name, artifact_location=str(out / "mlartifacts" / name))
    return uri


def demo_data(cfg: DemoConfig, preset) -> tuple[Path, Path, list[tuple[str, int | None]]]:
    """(training manifest, held-out manifest, classes): built-in videos or the user's.

    Pixel mode's class count comes from the data (the preset's is a default): the content and
    motion stages size their class embeddings from the latents' labels (LatentStage.prepare).
    """
    if cfg.videos.isdigit():
        train, held_out = built_in_data(cfg.out, int(cfg.videos), cfg.classes)
    else:
        train, held_out = user_data(cfg.videos, cfg.out, cfg.mode)
    return train, held_out, classes_of(train, cfg.mode)


def count_rows(manifest: Path) -> int:
    with open(manifest) as f:
        return sum(1 for _ in f) - 1


def stage_args(cfg: DemoConfig, preset, stage: str, clips: int | None = None) -> dict:
    """The TrainConfig fields every demo training job shares, sized from its step count; a batch is
    at most `clips` (the training clips: a user's small data set trains on all of them at once)."""
    steps = cfg.steps[stage]
    return dict(
        preset=preset.name,
        storage=str(cfg.out / "runs"),
        max_steps=steps,
        batch_size=min(BATCH[stage], clips or BATCH[stage]),
        eval_every=max(1, steps // 3),
        checkpoint_every=max(1, steps // 2),
        eval_samples=2,
        cpus_per_worker=TRAIN_THREADS,
        num_workers=cfg.num_workers,
    )


def train_chain(cfg: DemoConfig, preset, train: Path, held_out: Path, clock: StageClock) -> TrainedChain:
    """[stand-in SD's VAE] -> autoencoder -> precompute latents (training and held-out videos) -> content
    model and motion DiT, both evaluated on the held-out latents."""
    from cmd_model.content import build_tiny_sd
    from pipelines.data.precompute import PrecomputeConfig
    from pipelines.data.precompute import run as precompute
    from pipelines.training import TrainConfig, fit

    out = cfg.out
    sd = None
    videos = count_rows(train)  # each gives at least one clip
    if cfg.mode == "latent":
        base = str(build_tiny_sd(out / "stand-in-sd", config=preset.stand_in_sd))
        vae = clock.run(
            "vae",
            lambda: fit(
                TrainConfig(
                    stage="vae",
                    name="demo-vae",
                    input=str(train),
                    stable_diffusion=base,
                    **stage_args(cfg, preset, "vae", videos),
                )
            ),
            summary=lambda r: f"the stand-in SD's VAE on the videos' frames: eval PSNR {psnr(r):.1f} dB -> {r.model}",
            train=True,
        )
        sd = vae.model

    ae = clock.run(
        "autoencoder",
        lambda: fit(
            TrainConfig(
                stage="autoencoder",
                name="demo-autoencoder",
                input=str(train),
                stable_diffusion=sd,
                **stage_args(cfg, preset, "autoencoder", videos),
            )
        ),
        summary=lambda r: f"eval PSNR {psnr(r):.1f} dB -> {r.model}",
        train=True,
    )

    latents, held_latents = str(out / "latents"), str(out / "held_out_latents")

    def encode_both():
        common = dict(autoencoder=ae.model, preset=preset, stable_diffusion=sd)
        return [
            precompute(PrecomputeConfig(input=str(videos), output=folder, **common))
            for videos, folder in ((train, latents), (held_out, held_latents))
        ]

    summary, held_summary = clock.run(
        "precompute",
        encode_both,
        summary=lambda r: f"{r[0]['clips_total']} clips' latents in {latents}, {r[1]['clips_total']} held out",
    )

    content = clock.run(
        "content",
        lambda: fit(
            TrainConfig(
                stage="content",
                name="demo-content",
                latents=latents,
                eval_latents=held_latents,
                stable_diffusion=sd,
                **stage_args(cfg, preset, "content", summary["clips_total"]),
            )
        ),
        summary=lambda r: f"-> {r.model}",
        train=True,
    )
    motion = clock.run(
        "motion",
        lambda: fit(
            TrainConfig(
                stage="motion",
                name="demo-motion",
                latents=latents,
                eval_latents=held_latents,
                autoencoder=ae.model,
                stable_diffusion=sd,
                **stage_args(cfg, preset, "motion", summary["clips_total"]),
            )
        ),
        summary=lambda r: (
            f"eval loss {r.metrics.get('eval/loss', float('nan')):.4f} on the held-out latents -> {r.model}"
        ),
        train=True,
    )
    return TrainedChain(
        ae.model,
        content.model,
        motion.model,
        latents,
        held_latents,
        sd,
        motion.metrics.get("eval/loss", float("inf")),
        summary["clips_total"],
    )


def sweep(cfg: DemoConfig, preset, trained: TrainedChain, clock: StageClock, say) -> TrainedChain:
    """A small Ray Tune sweep of the motion DiT (infra/sweeps/demo.yaml), judged on the held-out latents.

    The demo then generates with the best trial's model if it beats the motion stage's own on the
    same held-out validation loss, else with the motion stage's (short trials rarely do).
    """
    from pipelines.platform import storage
    from pipelines.training.loop import MODEL_DIR
    from pipelines.training.tune import SweepConfig, run_sweep, trial_name

    # Short trials, two at a time on one CPU each: a trial is mostly Ray Train's start-up, which overlaps.
    steps = max(4, cfg.steps["motion"] // 20)
    common = stage_args(cfg, preset, "motion", trained.clips)
    train = dict(
        latents=trained.latents,
        eval_latents=trained.held_latents,
        autoencoder=trained.autoencoder,
        stable_diffusion=trained.sd,
        **{
            **common,
            "max_steps": steps,
            "eval_every": steps,
            "checkpoint_every": max(1, steps // 2),
            "num_workers": max(1, cfg.num_workers),  # Tune's trials run on Ray Train workers
            "cpus_per_worker": 1.0,
        },
    )
    result = clock.run(
        "sweep",
        lambda: run_sweep(
            SweepConfig(
                stage="motion",
                name="demo-sweep",
                search=str(ROOT / "infra" / "sweeps" / "demo.yaml"),
                num_samples=cfg.trials,
                max_concurrent=2,
                train=train,
            )
        ),
    )
    best, own = result["best_value"], trained.motion_loss
    say(
        f"sweep: best trial {result['best_trial']} ({result['metric']}={best:.4f} held out; "
        f"the motion stage's {own:.4f})"
    )
    if result["best_trial"] and result["metric"] == "eval/loss" and best < own:
        model = storage.join(common["storage"], trial_name("demo-sweep", result["best_trial"]), MODEL_DIR)
        say(f"generating with the sweep's best motion DiT: {model}")
        return dataclasses.replace(trained, motion=model)
    return trained


def generate(cfg: DemoConfig, preset, trained: TrainedChain, classes, clock: StageClock) -> tuple[list, list[dict]]:
    """Every prompt or class with cfg.seeds seeds -> (video paths, index rows) under --out/samples."""
    from pipelines.evaluation.generation import GeneratorSpec, generate_per_class

    spec = GeneratorSpec(preset, trained.autoencoder, trained.content, trained.motion, trained.sd)
    samples = cfg.out / "samples"
    return clock.run(
        "generate",
        lambda: generate_per_class(spec, str(samples), classes, seeds=list(range(cfg.seeds))),
        summary=lambda r: (
            f"{len(r[0])} videos ({len(classes)} {'prompts' if cfg.mode == 'latent' else 'classes'} x "
            f"{cfg.seeds} seeds) in {samples}"
        ),
    )


def psnr(fitted) -> float:
    return fitted.metrics.get("eval/psnr", float("nan"))


def judge_summary(judged: dict | None) -> str:
    if not judged:
        return "the class names say no colour and direction: nothing to judge"
    return (
        f"colour right in {judged['colour_accuracy']:.0%}, direction in {judged['direction_accuracy']:.0%} "
        f"of {judged['samples']} videos"
    )


def judge_samples(out: Path, videos: list, index: list[dict], classes, train: Path, preset) -> dict | None:
    """The shape detector's verdict on every video (judged.json), when the class names say a colour and a direction.

    Diversity: per class, the std over seeds of the shape's place across its direction of motion
    (`spread`), beside the same figure over one clip of each training video of that class.
    """
    from pipelines.evaluation.evaluate import one_clip_per_video
    from pipelines.evaluation.shape_detector import judge, parse_class, spread

    if not all(all(parse_class(text)) for text, _ in classes):
        return None
    judged = judge(list(videos), [row["prompt"] for row in index])
    for row, verdict in zip(index, judged["rows"]):
        verdict["file"], verdict["seed"] = row["file"], row["seed"]
    names = {label: text for text, label in classes}  # pixel mode: generated rows ask for the class name
    real, rows = one_clip_per_video(str(train), *preset.video_size)
    asked = [r.get("caption") or names.get(r.get("label"), "") for r in rows]
    judged["spread"], judged["spread_training"] = spread(judged["rows"]), spread(judge(list(real), asked)["rows"])
    (out / "judged.json").write_text(json.dumps(judged, indent=1))
    return judged


def log_demo_run(uri: str, out: Path, cfg: DemoConfig, result: dict) -> None:
    """One MLflow run for the demo itself: the judge's accuracies, the PSNR, the samples and their index."""
    from pipelines.platform import tracking

    run_id = tracking.open_run(
        uri,
        "cmd-demo",
        f"demo-{cfg.mode}",
        str(out / "runs"),
        "demo",
        tracking.flatten("", {"mode": cfg.mode, "videos": cfg.videos, "steps": cfg.steps, "seeds": cfg.seeds}),
    )
    logger = tracking.RunLogger(uri, run_id)
    metrics = {f"seconds.{k}": v for k, v in result["seconds"].items()}
    metrics.update({k: v for k, v in result["evaluation"].items() if isinstance(v, (int, float))})
    if result["judged"]:
        judged = result["judged"]
        metrics.update({k: judged[k] for k in ("colour_accuracy", "direction_accuracy", "both_accuracy")})
        metrics.update({k: judged[k] for k in ("spread", "spread_training") if judged[k] is not None})
    logger.metrics(metrics, step=0)
    logger.artifact(result["samples"], "samples")
    logger.flush()
    tracking.end_run(uri, run_id)


def mode_name(mode: str) -> str:
    return (
        "latent mode (text -> SD UNet content, CLIP-conditioned motion DiT)"
        if mode == "latent"
        else "pixel mode (class -> content DiT, class-conditioned motion DiT)"
    )


def report(result: dict) -> str:
    """The table a user reads at the end: what was asked, what the detector saw, right or wrong."""
    from pipelines.evaluation.shape_detector import parse_class

    lines = []
    judged = result["judged"]
    if judged:
        lines += [f"{'asked for':<30} {'seed':>4}  {'colour seen':<12} {'direction seen':<14} result", "-" * 74]
        for row in judged["rows"]:
            verdict = (
                "right"
                if row["colour_ok"] and row["direction_ok"]
                else "colour wrong"
                if row["direction_ok"]
                else "direction wrong"
                if row["colour_ok"]
                else "both wrong"
            )
            lines.append(
                f"{row['asked']:<30} {row['seed']:>4}  {row['colour'] or '-':<12} "
                f"{row['direction'] or '-':<14} {verdict}"
            )
        colours = len({parse_class(row["asked"])[0] for row in judged["rows"]})
        lines += [
            "",
            f"colour right:    {judged['colour_accuracy']:6.1%} of {judged['samples']} videos",
            f"direction right: {judged['direction_accuracy']:6.1%}",
            f"both right:      {judged['both_accuracy']:6.1%}   "
            f"(chance: {1 / max(1, colours):.0%} colour, 25% direction)",
            f"places across the motion, std over seeds per class: {judged['spread']} px generated, "
            f"{judged['spread_training']} px in the training videos",
        ]
    else:
        lines.append("(the class names do not say a colour and a direction: no detector verdicts; look at the samples)")
    e = result["evaluation"]
    lines.append(
        f"autoencoder on {e['protocol']['real_videos']} held-out videos: PSNR {e['psnr']:.2f} dB, SSIM {e['ssim']:.3f}"
    )
    return "\n".join(lines)


def tracking_experiment_id(uri: str, name: str) -> str:
    from pipelines.platform import tracking

    return tracking.ensure_experiment(uri, name)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo_out")
    p.add_argument(
        "--mode",
        choices=sorted(PRESET_OF_MODE),
        default="pixel",
        help="latent: text-conditional on a stand-in SD (WebVid path); pixel: class-conditional (UCF-101 path)",
    )
    p.add_argument(
        "--videos",
        default=str(BUILT_IN_PER_CLASS),
        help="built-in moving-shapes videos per class, or your own: a folder of class folders, or a CSV/Parquet "
        "manifest with path and caption/label columns",
    )
    p.add_argument(
        "--classes",
        type=int,
        default=BUILT_IN_CLASSES,
        help="classes of the built-in videos (colour x direction: red, green, blue, yellow, ... x right, left, "
        "down, up)",
    )
    p.add_argument(
        "--steps", type=int, help=f"optimizer steps for every stage (default per mode and stage: {DEFAULT_STEPS})"
    )
    p.add_argument(
        "--trials",
        type=int,
        default=0,
        help="Ray Tune trials of the motion DiT on the held-out latents (default 0: no sweep; its short trials "
        "did not beat the motion stage in our runs, so it is not in the timed chain)",
    )
    p.add_argument("--seeds", type=int, default=4, help="videos generated per prompt or class")
    p.add_argument(
        "--num-workers",
        type=int,
        default=1,
        help="Ray Train workers per training stage (default 1); 0 runs each stage's loop in the demo's own "
        "process (Ray Train's local mode: no worker start-up, quicker on a laptop)",
    )
    p.add_argument(
        "--verbose",
        action="store_true",
        help="show Ray's and MLflow's output here as it comes (by default it goes to OUT/logs/demo.log)",
    )
    args = p.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{out / 'mlflow.db'}")
    # The demo prints one line per step; Ray Data's per-operator bars would bury them. The local Ray
    # started below, and so every worker, inherits this variable.
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    steps = {k: args.steps for k in DEFAULT_STEPS[args.mode]} if args.steps else None
    videos = args.videos if args.videos.isdigit() else str(Path(args.videos).resolve())
    cfg = DemoConfig(
        out=out,
        mode=args.mode,
        videos=videos,
        classes=args.classes,
        steps=steps,
        trials=args.trials,
        seeds=args.seeds,
        num_workers=args.num_workers,
    )
    start = time.monotonic()
    if args.verbose:
        return finish(cfg, chain(cfg, console=Console(start=start)), start)
    log = LogFile(out / "logs" / "demo.log")
    console = Console(terminal=log.terminal, live=log.terminal.isatty(), start=start)
    console.say(f"Ray's and MLflow's output: {log.path} (--verbose shows it here)")
    try:
        result = chain(cfg, console=console)
    except BaseException as exc:
        if isinstance(exc, SystemExit) and not isinstance(exc.code, str):
            log.close()
            raise
        log.close(exc)
        tail = log.tail()
        print(f"--- the last {len(tail)} lines of {log.path} ---", *tail, "---", sep="\n", file=sys.stderr)
        print(error_line(exc, console.current), file=sys.stderr)
        return 130 if isinstance(exc, KeyboardInterrupt) else 1
    experiment = tracking_experiment_id(os.environ["MLFLOW_TRACKING_URI"], "cmd-motion")  # MLflow logs: still the log
    log.close()
    return finish(cfg, result, start, experiment, log.path)


def finish(cfg: DemoConfig, result: dict, start: float, experiment: str | None = None, log: Path | None = None) -> int:
    """The table, where everything is, and how to look at it in MLflow."""
    uri = os.environ["MLFLOW_TRACKING_URI"]
    if experiment is None:
        experiment = tracking_experiment_id(uri, "cmd-motion")
    print()
    print(report(result))
    print(f"\nDone in {time.monotonic() - start:.0f} s.")
    print(f"Videos:     {result['samples']}  (contact_sheet.gif shows them all, index.csv lists them)")
    if log is not None:
        print(f"Logs:       {log}  (Ray, Ray Train, Ray Data and MLflow; --verbose shows them here)")
    print(
        f"MLflow UI:  mlflow ui --backend-store-uri {uri} --default-artifact-root "
        f"{cfg.out / 'mlartifacts'} --host 127.0.0.1 --port 5000"
    )
    # MLflow 3.17's UI opens on its GenAI view (traces) unless the URL asks for model training.
    print(
        f"            then open http://127.0.0.1:5000/#/experiments/{experiment}?workflowType=machine_learning"
        "  (runs, curves, and each run's step-indexed sample images)"
    )
    return 0


class LogFile:
    """From now until close(), file descriptors 1 and 2 write to `path`; `terminal` writes where stdout did.

    At the descriptor level, not sys.stdout's, because most of what Ray prints never passes through
    Python's: its C++ core (glog lines such as core_worker.cc's) writes to fd 2 itself, and the
    processes started meanwhile (the local Ray head and its workers, whose output Ray also forwards
    to this driver) inherit fds 1 and 2. So Ray's, Ray Train's, Ray Data's and MLflow's lines,
    library warnings and tracebacks all land in the log; Ray keeps its own per-process logs in its
    session folder as ever.
    """

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        self._saved = os.dup(1), os.dup(2)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        self.terminal = os.fdopen(os.dup(self._saved[0]), "w", buffering=1)

    def close(self, exc: BaseException | None = None) -> None:
        """Stop Ray while its output still goes to the log (its driver thread forwards workers' lines
        until then), write `exc`'s traceback there, and give fds 1 and 2 back."""
        if self._saved is None:
            return
        with contextlib.suppress(Exception):
            shutdown_ray()
        if exc is not None and not isinstance(exc, (SystemExit, KeyboardInterrupt)):
            traceback.print_exception(exc, file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        self.terminal.close()
        for fd, saved in zip((1, 2), self._saved):
            os.dup2(saved, fd)
            os.close(saved)
        self._saved = None

    def tail(self, lines: int = 20) -> list[str]:
        """The log's last lines, without Ray's colours and what a progress bar overwrote."""
        with open(self.path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 64 * 1024))
            text = f.read().decode(errors="replace")
        kept = [re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", line.rsplit("\r", 1)[-1]) for line in text.splitlines()]
        return [line for line in kept if line.strip()][-lines:]


def shutdown_ray() -> None:
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def error_line(exc: BaseException, stage: str | None) -> str:
    """One line: the stage that failed and the error's own last line (Ray's errors wrap the
    worker's traceback, whose last line is the original `Type: message`)."""
    if isinstance(exc, SystemExit):  # the demo's own refusals: "error: ..."
        text = str(exc.code).removeprefix("error: ")
    else:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        text = lines[-1] if len(lines) > 1 else f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return f"error{f' in the {stage} stage' if stage else ''}: {text}"


if __name__ == "__main__":
    raise SystemExit(main())
