"""The memory plans of the paper presets at the paper's batches and GPU counts (docs/memory.md's table).

    python benchmarks/memory_plans.py            # a markdown table, a few minutes on 2 CPU cores
    python benchmarks/memory_plans.py --json     # one JSON line per plan

Each row: the global batch and GPU count of the paper (CMD_REFERENCE.md, App. B.3), the batch a
GPU takes, then cmd_model.memory's plan without and with gradient checkpointing (GiB).
"""

from __future__ import annotations

import argparse
import json
import time

from cmd_model.memory import plan
from cmd_model.presets import get_preset

# (preset, stage, global batch, GPUs): the paper's. The autoencoder: batch 24 on 8 A100s. Content:
# SD 2.1 on 64 A100s (WebVid), the UCF-101 DiT on 16; SD 1.5's fine-tune (zero-shot UCF, trained on
# WebVid) is given no count, WebVid's 64 is used. Motion: 32 A100s (WebVid), 8 (UCF-101).
PAPER = [
    ("ucf101-64", "autoencoder", 24, 8),
    ("ucf101-64", "content", 256, 16),
    ("ucf101-64", "motion", 256, 8),
    ("webvid-sd15-512", "autoencoder", 24, 8),
    ("webvid-sd15-512", "content", 256, 64),
    ("webvid-sd15-512", "motion", 256, 32),
    ("webvid-sd21-512x1024", "autoencoder", 24, 8),
    ("webvid-sd21-512x1024", "content", 256, 64),
    ("webvid-sd21-512x1024", "motion", 256, 32),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="one JSON line per plan instead of the table")
    parser.add_argument("--gpu-gib", type=float, default=80.0)
    args = parser.parse_args()
    start = time.process_time()
    rows = []
    for name, stage, batch, gpus in PAPER:
        plans = [
            plan(get_preset(name), stage, batch, gpus, grad_checkpointing=c, gpu_gib=args.gpu_gib)
            for c in (False, True)
        ]
        if args.json:
            for p in plans:
                print(json.dumps(p), flush=True)
        rows.append((name, stage, batch, gpus, plans))
    if args.json:
        return
    print("| preset | stage | batch / GPUs | a GPU | resident | activations a sample | peak | with checkpointing |")
    print("|---|---|---|---|---|---|---|---|")
    for name, stage, batch, gpus, (off, on) in rows:
        resident = sum(off[f"{k}_gib"] for k in ("weights", "gradients", "optimizer", "ema", "frozen", "ddp_buckets"))
        acts = f"{off['activations_per_sample_gib']} ({on['activations_per_sample_gib']})"
        peak = lambda p: f"{p['peak_gib']} ({p['peak_phase']}){'' if p['fits'] else ' **no**'}"  # noqa: E731
        print(
            f"| `{name}` | {stage} | {batch} / {gpus} | {off['gpu_batch']} | {resident:.1f} | {acts} | "
            f"{peak(off)} | {peak(on)} |"
        )
    print(f"\n{time.process_time() - start:.0f} s of CPU for {2 * len(rows)} plans")


if __name__ == "__main__":
    main()
