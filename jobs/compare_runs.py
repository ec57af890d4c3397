"""Compare the runs of one MLflow experiment: a table sorted by a metric and a plot of their curves.

    python jobs/compare_runs.py --experiment cmd-motion-sweeps
    python jobs/compare_runs.py --experiment cmd-motion-sweeps --metric eval/loss --top 3 --plot motion.png

Rows: run name, stage, the params that differ between the runs shown (the swept ones), the best
value of the metric over the run, the mean steps/s, and the status. Everything comes from MLflow
(MLFLOW_TRACKING_URI, else ./mlflow.db), so the UI shows the same numbers.
"""

import argparse
import sys

from pipelines.platform import tracking

# Params that name or place a run rather than describe its training: never "key params".
IDENTITY_PARAMS = ("latents", "input", "storage", "experiment", "autoencoder", "stable_diffusion", "init_from")
MAX_KEY_PARAMS = 6  # table width: the first few differing params


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experiment", required=True, help="MLflow experiment name")
    p.add_argument("--metric", default="loss", help="metric to sort by (its best value over each run's history)")
    p.add_argument("--mode", choices=["min", "max"], default="min", help="whether lower or higher is better")
    p.add_argument("--top", type=int, default=5, help="runs in the table and the plot")
    p.add_argument("--plot", help="png of the metric curves of the top runs (default: <experiment>-<metric>.png)")
    return p.parse_args(argv)


def collect(client, experiment_id: str, metric: str, mode: str) -> list[dict]:
    """One row per run that logged `metric`, best first."""
    pick = min if mode == "min" else max
    rows = []
    for run in client.search_runs([experiment_id], max_results=1000):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, metric))
        if not history:
            continue
        speed = [m.value for m in client.get_metric_history(run.info.run_id, "steps_per_s")]
        rows.append(
            {
                "run": run.info.run_name,
                "run_id": run.info.run_id,
                "stage": run.data.tags.get(tracking.STAGE_TAG, "?"),
                "params": run.data.params,
                "best": pick(v for _, v in history),
                "history": history,
                "steps_per_s": sum(speed) / len(speed) if speed else None,
                "status": run.info.status,
            }
        )
    return sorted(rows, key=lambda r: r["best"] if mode == "min" else -r["best"])


def key_params(rows: list[dict]) -> list[str]:
    """The params whose values differ between the rows (what the sweep varied), in name order."""
    names = sorted({k for r in rows for k in r["params"]})
    varied = [
        k
        for k in names
        if len({r["params"].get(k) for r in rows}) > 1
        and not k.startswith("preset.")
        and k.split(".")[0] not in IDENTITY_PARAMS
    ]
    return varied[:MAX_KEY_PARAMS]


def table(rows: list[dict], metric: str) -> str:
    keys = key_params(rows)
    header = ["run", "stage", *keys, f"best {metric}", "steps/s", "status"]
    lines = [
        [
            r["run"],
            r["stage"],
            *(r["params"].get(k, "-") for k in keys),
            f"{r['best']:.4g}",
            f"{r['steps_per_s']:.2f}" if r["steps_per_s"] is not None else "-",
            r["status"],
        ]
        for r in rows
    ]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(
        [fmt.format(*header), fmt.format(*("-" * w for w in widths)), *(fmt.format(*map(str, line)) for line in lines)]
    )


def plot(rows: list[dict], metric: str, path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        steps, values = zip(*r["history"])
        ax.plot(steps, values, marker="." if len(steps) < 30 else None, label=f"{r['run']} ({r['best']:.4g})")
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    uri = tracking.tracking_uri()
    try:
        tracking.check_reachable(uri)
    except tracking.TrackingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    client = tracking.client(uri)
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        print(f"error: no MLflow experiment {args.experiment!r} at {tracking.public_uri(uri)}", file=sys.stderr)
        return 2
    rows = collect(client, experiment.experiment_id, args.metric, args.mode)
    if not rows:
        print(f"error: no run in {args.experiment!r} logged the metric {args.metric!r}", file=sys.stderr)
        return 2
    top = rows[: args.top]
    print(table(top, args.metric))
    path = args.plot or f"{args.experiment}-{args.metric.replace('/', '_')}.png"
    plot(top, args.metric, path, f"{args.experiment}: {args.metric} of the top {len(top)} runs")
    print(f"\n{len(rows)} runs with {args.metric}; curves of the top {len(top)} in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
