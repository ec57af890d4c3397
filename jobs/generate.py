"""Generate videos with trained CMD models: prompt or class -> mp4 files and a gif contact sheet.

    python jobs/generate.py --preset tiny --autoencoder out/ae --content out/content --motion out/motion \
        --stable-diffusion out/tiny-sd --prompt "a red square moving right" --num 4 --out out/samples
    ray job submit --working-dir . -- python jobs/generate.py --preset webvid-sd21-512x1024 \
        --autoencoder runs:/<id>/autoencoder --content runs:/<id>/content --motion runs:/<id>/motion \
        --prompts-file s3://bucket/prompts.txt --out s3://bucket/samples/v3
--prompts-file (one prompt, or class index in pixel mode, per line) runs as a Ray Data job with the
generator as an actor (one per GPU). --mlflow-run-id logs the videos to that run.
"""

from __future__ import annotations

import argparse
import sys

from cmd_model.presets import PRESETS, get_preset
from cmd_model.speed import COMPILE_MODES, PRECISIONS, SamplingSpeed
from pipelines.evaluation.generation import LABEL, NAME, PROMPT, SEED, GeneratorSpec, generate, generate_many
from pipelines.platform import storage


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="a registered CMD bundle holding all three, e.g. models:/cmd-webvid@production")
    p.add_argument("--preset", choices=list(PRESETS), help="required unless --model gives it")
    p.add_argument("--autoencoder")
    p.add_argument("--content", help="latent mode: the fine-tuned UNet folder; pixel mode: the content DiT")
    p.add_argument("--motion")
    p.add_argument("--stable-diffusion", help="latent mode: SD folder (VAE, text encoder, tokenizer) or hub id")
    cond = p.add_mutually_exclusive_group(required=True)
    cond.add_argument("--prompt")
    cond.add_argument("--label", type=int)
    cond.add_argument("--prompts-file", help="one prompt (or class index) per line; runs as a Ray Data job")
    p.add_argument("--num", type=int, default=1, help="videos per prompt/label")
    guidance = "guidance scale s in eps(null) + s * (eps(c) - eps(null)); 1 = none; the paper's Algorithm 1 w is s - 1"
    p.add_argument("--cfg-content", type=float, help=f"content model: {guidance} (default: the preset's)")
    p.add_argument("--cfg-motion", type=float, help=f"motion DiT: {guidance} (default: the preset's)")
    p.add_argument("--steps-content", type=int)
    p.add_argument("--steps-motion", type=int)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--compile",
        choices=COMPILE_MODES,
        help="torch.compile the denoisers (reduce-overhead: CUDA graphs); default: eager",
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", *PRECISIONS],
        help="the denoisers' precision (auto: bfloat16 on CUDA, as trained; float32 on the CPU; the paper: float16)",
    )
    p.add_argument(
        "--use-gpu", action="store_true", help="--prompts-file: a generator per GPU (default: on when GPUs are up)"
    )
    p.add_argument(
        "--generators",
        type=int,
        help="--prompts-file: generator actors (default: one per GPU up now, else 1; give it on a cluster "
        "that scales from zero)",
    )
    p.add_argument("--out", required=True, help="output folder or s3:// prefix")
    p.add_argument("--mlflow-run-id", help="log the videos to this MLflow run (MLFLOW_TRACKING_URI)")
    return p.parse_args(argv)


def generator_spec(args) -> GeneratorSpec:
    """The models and sampling settings from --model (a registered bundle) or the separate folders."""
    if args.model:
        from pipelines.platform.registry import bundle_parts

        # URIs, not a download here: each generator fetches the models on its own node.
        parts, meta = bundle_parts(args.model)
        args.preset = args.preset or meta["preset"]
        args.stable_diffusion = args.stable_diffusion or meta["stable_diffusion"]
        args.autoencoder, args.content, args.motion = (parts[p] for p in ("autoencoder", "content", "motion"))
    missing = [f"--{f}" for f in ("preset", "autoencoder", "content", "motion") if not getattr(args, f)]
    if missing:
        raise ValueError(f"pass --model, or all of {', '.join(missing)}")
    preset = get_preset(args.preset)
    if (args.prompt is not None or args.prompts_file) and preset.mode == "pixel" and not args.prompts_file:
        raise ValueError(f"preset {preset.name} is class-conditional: use --label")
    if args.label is not None and preset.mode == "latent":
        raise ValueError(f"preset {preset.name} is text-conditional: use --prompt")
    speed = SamplingSpeed(compile=args.compile, precision=args.precision)
    return GeneratorSpec(
        preset,
        args.autoencoder,
        args.content,
        args.motion,
        args.stable_diffusion,
        args.steps_content,
        args.steps_motion,
        args.cfg_content,
        args.cfg_motion,
        speed=speed,
    )


def generate_prompts_file(spec: GeneratorSpec, args) -> list[str]:
    """--prompts-file: one video per line and seed, as a Ray Data job over the cluster's GPUs."""
    from pipelines.platform import tracking
    from pipelines.platform.cluster import ensure_ray, nothing_up, resources_now

    lines = [line.strip() for line in storage.read_text(args.prompts_file).splitlines() if line.strip()]
    pixel = spec.preset.mode == "pixel"
    rows = [
        {NAME: f"video_{i:04d}_{k}", PROMPT: line, LABEL: int(line) if pixel else -1, SEED: args.seed + k}
        for i, line in enumerate(lines)
        for k in range(args.num)
    ]
    # The generators fetch runs:/ and models:/ URIs themselves: they reach the same MLflow server.
    ensure_ray(tracking.env_vars(tracking.tracking_uri()))
    gpus_now, _ = resources_now()
    use_gpu = args.use_gpu or gpus_now > 0
    if use_gpu and args.generators is None and gpus_now == 0:
        raise ValueError(nothing_up("GPU", "--generators N (one GPU each)", "--use-gpu, and the cluster"))
    if args.generators is not None and args.generators < 1:
        raise ValueError(f"--generators must be a positive integer, got {args.generators}")
    return generate_many(spec, args.out, rows, generators=args.generators or max(gpus_now, 1), use_gpu=use_gpu)


def log_samples(run_id: str, out: str) -> None:
    """The generated videos as artifacts (samples/) of an MLflow run."""
    import tempfile

    from pipelines.platform import tracking

    with tempfile.TemporaryDirectory() as tmp:
        storage.download_dir(out, tmp)
        tracking.client(tracking.tracking_uri()).log_artifacts(run_id, tmp, "samples")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        spec = generator_spec(args)
        if args.prompts_file:
            paths = generate_prompts_file(spec, args)
        else:
            prompts = [args.prompt] * args.num if args.prompt is not None else None
            labels = [args.label] * args.num if args.label is not None else None
            paths = generate(spec, args.out, prompts=prompts, labels=labels, seed=args.seed)
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.mlflow_run_id:
        log_samples(args.mlflow_run_id, args.out)
    print("\n".join(paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
