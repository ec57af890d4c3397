"""One scheduled retraining round: new videos only -> precompute -> train -> evaluate -> register.

WORKDIR/
  processed.json        every source a finished round used: {uri: "size:etag-or-mtime"}
  rounds/NNNN/plan.json the new sources of round N (written first: a rerun finishes this round)
  rounds/NNNN/start.json the production version when round N began (what it must beat, even on a rerun)
  rounds/NNNN/done.json the round's result (written last)
  latents/              one precompute output for all rounds (same autoencoder, appended)
  runs/                 Ray Train checkpoints; run names are retrain-rNNNN-<stage>, never timestamps

Steps:
1. list      the input prefix; a source is new when its uri + size + ETag/mtime is not in processed.json
2. plan      an unfinished round is resumed with its own plan; else nothing new -> say so and stop
3. train AE  round 1 only: later rounds keep the autoencoder, so old latents stay valid
             (a new autoencoder would need every latent recomputed)
4. latents   precompute the plan's videos into WORKDIR/latents (resumable, digest-guarded)
5. train     content and motion, starting from the production version's weights
6. evaluate  the motion DiT's diffusion loss on fixed held-out clips (fixed noise): comparable
             across rounds because the autoencoder, and so the held-out latents, do not change
7. register  a new version with the data version and metric as tags; alias `production` moves
             to it only if its metric beats the production version's when the round began.
             A rerun of a round that died after registering reuses that version (tag `round`)
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass

from pipelines.data.sources import list_sources, write_manifest
from pipelines.data.video.schema import SOURCE
from pipelines.platform import model_store, registry, storage, tracking

log = logging.getLogger(__name__)
METRIC = "heldout_motion_loss"  # lower is better


@dataclass(frozen=True)
class RetrainConfig:
    input: str
    workdir: str
    preset: str
    held_out: str  # fixed held-out videos the metric is computed on
    model_name: str = "cmd"
    max_steps: int = 1000
    batch_size: int | None = None
    num_workers: int = 1
    use_gpu: bool = False
    decoders: int | None = None  # video decoding beside the workers (None: from the cluster as it is)
    # The memory flags of the three training jobs (TrainConfig's; docs/memory.md).
    grad_accum_steps: int = 1
    grad_checkpointing: bool = False
    gpu_gib: float = 80.0
    stable_diffusion: str | None = None
    experiment: str = "cmd-retrain"


def _fingerprint(info: dict) -> str:
    return f"{info['size']}:{info.get('etag') or info.get('mtime')}"


def _round_dir(cfg: RetrainConfig, n: int) -> str:
    return storage.join(cfg.workdir, "rounds", f"{n:04d}")


def _read_json(uri: str, default):
    return json.loads(storage.read_text(uri)) if storage.exists(uri) else default


def plan_round(cfg: RetrainConfig) -> tuple[int, list[dict]] | None:
    """(round number, new sources with their fingerprints), resuming an unfinished round; None if nothing is new."""
    rounds = storage.join(cfg.workdir, "rounds")
    numbers = sorted(int(u.rstrip("/").rsplit("/", 1)[-1]) for u in _list_dirs(rounds))
    if numbers and not storage.exists(storage.join(_round_dir(cfg, numbers[-1]), "done.json")):
        n = numbers[-1]
        return n, _read_json(storage.join(_round_dir(cfg, n), "plan.json"), [])
    processed = _read_json(storage.join(cfg.workdir, "processed.json"), {})
    new = []
    for src in list_sources(cfg.input):
        fingerprint = _fingerprint(storage.file_info(src[SOURCE]))
        if processed.get(src[SOURCE]) != fingerprint:
            new.append({**src, "fingerprint": fingerprint})
    if not new:
        return None
    n = (numbers[-1] if numbers else 0) + 1
    storage.write_text(storage.join(_round_dir(cfg, n), "plan.json"), json.dumps(new, indent=1))
    return n, new


def _production_at_start(cfg: RetrainConfig, uri: str, round_dir: str):
    """The production version when this round first began (recorded then), or None.

    A rerun must not read the alias again: the dead run may already have moved it to its own version.
    """
    marker = storage.join(round_dir, "start.json")
    start = _read_json(marker, None)
    if start is None:
        current = registry.production(uri, cfg.model_name)
        start = {"production": str(current.version) if current is not None else None}
        storage.write_text(marker, json.dumps(start))
    if start["production"] is None:
        return None
    return tracking.client(uri).get_model_version(cfg.model_name, start["production"])


def _list_dirs(uri: str) -> list[str]:
    if not storage.exists(uri):
        return []
    fs, path = storage.get_filesystem(uri)
    return [p for p in fs.ls(path, detail=False) if fs.isdir(p)]


def _manifest(rows: list[dict], uri: str) -> str:
    return write_manifest(
        [{SOURCE: r[SOURCE], "caption": r.get("caption"), "label": r.get("label")} for r in rows], uri
    )


def check_memory(cfg: RetrainConfig) -> None:
    """On GPUs, each training job's memory plan fits, checked before the round starts: the content and
    motion jobs start hours later, after precompute."""
    if not cfg.use_gpu:
        return
    from cmd_model.presets import get_preset
    from pipelines.training import TrainConfig
    from pipelines.training.gpu_memory import check_gpu_memory

    for stage in ("autoencoder", "content", "motion"):
        data = {"input": cfg.input} if stage == "autoencoder" else {"latents": storage.join(cfg.workdir, "latents")}
        check_gpu_memory(
            TrainConfig(
                stage=stage,
                name=f"retrain-{stage}",
                preset=cfg.preset,
                max_steps=cfg.max_steps,
                batch_size=cfg.batch_size,
                num_workers=cfg.num_workers,
                use_gpu=cfg.use_gpu,
                stable_diffusion=cfg.stable_diffusion or get_preset(cfg.preset).stable_diffusion,
                grad_accum_steps=cfg.grad_accum_steps,
                grad_checkpointing=cfg.grad_checkpointing,
                gpu_gib=cfg.gpu_gib,
                **data,
            )
        )


def run_round(cfg: RetrainConfig) -> dict:
    """One round; returns what it did (also written to rounds/NNNN/done.json)."""
    from cmd_model.presets import get_preset
    from pipelines.evaluation.evaluate import heldout_motion_loss

    check_memory(cfg)
    planned = plan_round(cfg)
    if planned is None:
        print(f"nothing new under {cfg.input}: every video was processed by an earlier round")
        return {"round": None, "new_videos": 0}
    n, new = planned
    round_dir = _round_dir(cfg, n)
    print(f"round {n}: {len(new)} new videos")
    preset = get_preset(cfg.preset)
    uri = tracking.tracking_uri()
    tracking.check_reachable(uri)
    current = _production_at_start(cfg, uri, round_dir)
    sd = cfg.stable_diffusion or preset.stable_diffusion
    # A local SD exists on this machine only: the round's jobs and the registered bundle (which
    # `generate --model` reads on any node) name its copy in the workdir instead.
    sd = model_store.for_every_node(sd, cfg.workdir, storage.join(cfg.workdir, "inputs"), "--stable-diffusion")
    trained = _train_round(cfg, n, _manifest(new, storage.join(round_dir, "videos.csv")), current, preset, sd)

    metric = heldout_motion_loss(preset, cfg.held_out, trained["autoencoder"], trained["motion"], sd)
    latents = trained["latents"]
    data_version = {
        "latents": latents,
        "autoencoder_digest": json.loads(storage.read_text(storage.join(latents, "_manifest.json")))[
            "autoencoder_digest"
        ],
        "round": str(n),
        "videos_total": str(trained["summary"]["videos_with_latents"]),
    }
    version, metric = _register_round(cfg, uri, n, sd, trained, metric, data_version)
    # Production's value measured now, on the same held-out clips and noise: the value tagged when it
    # was registered may be from other held-out videos (the folder grows) or an older protocol.
    best = float("inf")
    if current is not None:
        parts, _ = registry.bundle_parts(f"models:/{cfg.model_name}/{current.version}")
        best = heldout_motion_loss(preset, cfg.held_out, parts["autoencoder"], parts["motion"], sd)
    promoted = metric < best
    if promoted:
        registry.promote(uri, cfg.model_name, version)
    result = {
        "round": n,
        "new_videos": len(new),
        "clips_written": trained["summary"]["clips_written_this_run"],
        "version": version,
        METRIC: metric,
        "previous_production": current.version if current else None,
        f"previous_production_{METRIC}": best if current else None,
        "promoted": promoted,
    }

    processed = _read_json(storage.join(cfg.workdir, "processed.json"), {})
    processed.update({r[SOURCE]: r["fingerprint"] for r in new})
    storage.write_text(storage.join(cfg.workdir, "processed.json"), json.dumps(processed, indent=1))
    storage.write_text(storage.join(round_dir, "done.json"), json.dumps(result, indent=1))
    print(json.dumps(result))
    return result


def _train_round(cfg: RetrainConfig, n: int, manifest: str, current, preset, sd: str | None) -> dict:
    """The new videos -> [autoencoder, first round only] -> latents -> content and motion, each
    starting from the production bundle when there is one. Returns the model folders, latents and
    precompute's summary."""
    from pipelines.data.precompute import PrecomputeConfig
    from pipelines.data.precompute import run as precompute
    from pipelines.training import TrainConfig, fit

    common = dict(
        preset=cfg.preset,
        storage=storage.join(cfg.workdir, "runs"),
        max_steps=cfg.max_steps,
        batch_size=cfg.batch_size,
        num_workers=cfg.num_workers,
        use_gpu=cfg.use_gpu,
        stable_diffusion=sd,
        grad_accum_steps=cfg.grad_accum_steps,
        grad_checkpointing=cfg.grad_checkpointing,
        gpu_gib=cfg.gpu_gib,
        checkpoint_every=max(1, cfg.max_steps // 4),
        eval_every=max(1, cfg.max_steps // 2),
        experiment=cfg.experiment,
    )
    previous = None
    if current is not None:
        previous, _ = registry.load_bundle(f"models:/{cfg.model_name}/{current.version}")
        autoencoder = str(previous / "autoencoder")
    else:
        autoencoder = fit(
            TrainConfig(
                stage="autoencoder",
                name=f"retrain-r{n:04d}-autoencoder",
                input=manifest,
                decoders=cfg.decoders,
                **common,
            )
        ).model

    latents = storage.join(cfg.workdir, "latents")
    summary = precompute(
        PrecomputeConfig(
            input=manifest,
            output=latents,
            autoencoder=autoencoder,
            preset=preset,
            stable_diffusion=sd,
            # Encoding runs on the GPUs the round trains on; the cluster may have none up yet.
            use_gpu=cfg.use_gpu,
            encoders=cfg.num_workers if cfg.use_gpu else None,
            decoders=cfg.decoders,
        )
    )
    init = (lambda part: str(previous / part)) if previous is not None else (lambda part: None)
    content = fit(
        TrainConfig(
            stage="content", name=f"retrain-r{n:04d}-content", latents=latents, init_from=init("content"), **common
        )
    )
    motion = fit(
        TrainConfig(
            stage="motion",
            name=f"retrain-r{n:04d}-motion",
            latents=latents,
            autoencoder=autoencoder,
            init_from=init("motion"),
            **common,
        )
    )
    return dict(autoencoder=autoencoder, content=content.model, motion=motion.model, latents=latents, summary=summary)


def _register_round(
    cfg: RetrainConfig, uri: str, n: int, sd: str | None, trained: dict, metric: float, data_version: dict
) -> tuple[str, float]:
    """Register this round's bundle once; a round that registered before it died returns that
    version (and its metric)."""
    registered = registry.find_version(uri, cfg.model_name, {"round": str(n), "latents": data_version["latents"]})
    if registered is not None:
        print(f"round {n} already registered version {registered.version}")
        return str(registered.version), float(registered.tags[METRIC])
    with tempfile.TemporaryDirectory() as tmp:
        bundle = registry.make_bundle(
            tmp,
            cfg.preset,
            sd,
            autoencoder=trained["autoencoder"],
            content=trained["content"],
            motion=trained["motion"],
        )
        client = tracking.client(uri)
        run = client.create_run(
            client.get_experiment_by_name(cfg.experiment).experiment_id,
            run_name=f"retrain-r{n:04d}",
            tags={f"data.{k}": v for k, v in data_version.items()},
        )
        client.log_metric(run.info.run_id, METRIC, metric)
        version = registry.register_bundle(
            uri, cfg.model_name, run.info.run_id, bundle, {METRIC: metric, **data_version}
        )
        client.set_terminated(run.info.run_id)
    return version, metric
