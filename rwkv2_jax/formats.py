"""Checkpoint formats: the release `.pth` (torch) and the native `.safetensors` (no torch).

Both use the release key names and shapes (spec, "File format"). The mapping to
Flax parameters is one table, `release_layout`, used in both directions:

    kind     release shape   Flax parameter
    copy     same            same (embedding [V, C], LayerNorm vectors [C])
    linear   W [out, in]     Dense kernel W.T [in, out]
    vector   [C, 1], [1,1,C] [C]

Nothing here changes a value, so release -> Flax -> release is bit-exact in any
dtype (float32, float16, bfloat16).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Dict, List, Mapping, NamedTuple, Tuple

import numpy as np

from rwkv2_jax.config import RWKVConfig

NATIVE_FORMAT = "rwkv2-jax"
NATIVE_VERSION = "1"
ACCEPTED_DTYPES = ("float32", "float16", "bfloat16")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the path or key."""


class Entry(NamedTuple):
    key: str  # release key, e.g. "blocks.3.att.key.weight"
    shape: Tuple[int, ...]  # release shape
    path: Tuple[str, ...]  # Flax parameter path, e.g. ("blocks_3", "att", "key", "kernel")
    kind: str  # "copy" | "linear" | "vector"


def _channel_mix_entries(prefix: str, path: Tuple[str, ...], C: int) -> List[Entry]:
    return [
        Entry(f"{prefix}.time_mix", (1, 1, C), path + ("time_mix",), "vector"),
        Entry(f"{prefix}.key.weight", (4 * C, C), path + ("key", "kernel"), "linear"),
        Entry(f"{prefix}.receptance.weight", (C, C), path + ("receptance", "kernel"), "linear"),
        Entry(f"{prefix}.value.weight", (C, 4 * C), path + ("value", "kernel"), "linear"),
    ]


def release_layout(config: RWKVConfig) -> List[Entry]:
    """Every key of a release checkpoint for `config`, in the order the releases store them."""
    C, V = config.n_embd, config.vocab_size
    entries = [Entry("emb.weight", (V, C), ("emb", "embedding"), "copy")]
    for i in range(config.n_layer):
        b, p = f"blocks.{i}", (f"blocks_{i}",)
        for ln in ("ln1", "ln2"):
            entries.append(Entry(f"{b}.{ln}.weight", (C,), p + (ln, "scale"), "copy"))
            entries.append(Entry(f"{b}.{ln}.bias", (C,), p + (ln, "bias"), "copy"))
        if config.ffn_pre and i == 0:
            entries += _channel_mix_entries(f"{b}.ffnPre", p + ("ffnPre",), C)
        else:
            a, pa = f"{b}.att", p + ("att",)
            entries += [
                Entry(f"{a}.time_decay", (C, 1), pa + ("time_decay",), "vector"),
                Entry(f"{a}.time_first", (C, 1), pa + ("time_first",), "vector"),
                Entry(f"{a}.time_mix", (1, 1, C), pa + ("time_mix",), "vector"),
            ]
            for name in ("key", "value", "receptance", "output"):
                entries.append(Entry(f"{a}.{name}.weight", (C, C), pa + (name, "kernel"), "linear"))
        entries += _channel_mix_entries(f"{b}.ffn", p + ("ffn",), C)
    entries += [
        Entry("ln_out.weight", (C,), ("ln_out", "scale"), "copy"),
        Entry("ln_out.bias", (C,), ("ln_out", "bias"), "copy"),
        Entry("head.weight", (V, C), ("head", "kernel"), "linear"),
    ]
    return entries


def config_from_shapes(shapes: Mapping[str, Tuple[int, ...]], **overrides) -> RWKVConfig:
    """Rebuild the config from release key shapes: V, C from emb.weight, L from the block keys."""
    if "emb.weight" not in shapes:
        raise CheckpointError("missing key 'emb.weight' (needed to read vocab_size and n_embd)")
    emb = tuple(shapes["emb.weight"])
    if len(emb) != 2:
        raise CheckpointError(f"key 'emb.weight': expected shape [V, C], got {list(emb)}")
    V, C = emb
    layers = {int(m.group(1)) for k in shapes if (m := re.match(r"blocks\.(\d+)\.", k))}
    if not layers:
        raise CheckpointError("no 'blocks.N.*' keys: not an RWKV-v2 checkpoint")
    ffn_pre = any(k.startswith("blocks.0.ffnPre.") for k in shapes)
    return RWKVConfig(n_layer=max(layers) + 1, n_embd=C, vocab_size=V, ffn_pre=ffn_pre, **overrides)


def check_keys(shapes: Mapping[str, Tuple[int, ...]], config: RWKVConfig, source: str) -> None:
    """Every key present with its exact shape, and no key left over; errors name the key."""
    layout = release_layout(config)
    expected = {e.key: e.shape for e in layout}
    missing = [k for k in expected if k not in shapes]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{source}: missing key {missing[0]!r}{more}")
    unused = [k for k in shapes if k not in expected]
    if unused:
        more = f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""
        raise CheckpointError(f"{source}: unexpected key {unused[0]!r}{more}")
    for key, shape in expected.items():
        if tuple(shapes[key]) != shape:
            raise CheckpointError(
                f"{source}: key {key!r} has shape {list(shapes[key])}, expected {list(shape)}"
            )


def release_to_params(arrays: Mapping[str, np.ndarray], config: RWKVConfig) -> dict:
    """Release-format arrays (already checked) -> nested Flax params of numpy arrays."""
    params: dict = {}
    for e in release_layout(config):
        a = arrays[e.key]
        if e.kind == "linear":
            a = a.T
        elif e.kind == "vector":
            a = a.reshape(-1)
        node = params
        for name in e.path[:-1]:
            node = node.setdefault(name, {})
        node[e.path[-1]] = np.ascontiguousarray(a)
    return params


def params_to_release(params: Mapping, config: RWKVConfig) -> Dict[str, np.ndarray]:
    """Nested Flax params -> release-format numpy arrays, in release key order."""
    out = {}
    for e in release_layout(config):
        node = params
        for name in e.path:
            node = node[name]
        a = np.asarray(node)
        if e.kind == "linear":
            a = a.T
        elif e.kind == "vector":
            a = a.reshape(e.shape)
        out[e.key] = np.ascontiguousarray(a)
    return out


# --- torch (.pth) --------------------------------------------------------------------


def _torch():
    try:
        import torch
    except ImportError as err:  # torch is an optional extra
        raise ImportError(
            "reading and writing .pth files needs torch: pip install 'rwkv2-jax[torch]' "
            "(or use the native .safetensors format)"
        ) from err
    return torch


def _tensor_to_numpy(t, key: str, source: str) -> np.ndarray:
    torch = _torch()
    if not isinstance(t, torch.Tensor):
        raise CheckpointError(f"{source}: key {key!r} is a {type(t).__name__}, not a tensor")
    name = str(t.dtype).replace("torch.", "")
    if name not in ACCEPTED_DTYPES:
        raise CheckpointError(f"{source}: key {key!r} has dtype {name}; accepted: {ACCEPTED_DTYPES}")
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _numpy_to_tensor(a: np.ndarray):
    torch = _torch()
    a = np.array(a, order="C")  # a writable copy: torch shares the memory
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def read_pth(path) -> Dict[str, np.ndarray]:
    """Load a release `.pth` (an untrusted file: weights_only=True) as numpy arrays by key."""
    torch = _torch()
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):  # legacy (non-zip) files cannot be memory-mapped
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, pickle refused by weights_only, not torch at all, ...
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot read {path} as a PyTorch checkpoint: {msg}") from None
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{path}: expected a state dict (a mapping of tensors), got {type(sd).__name__}")
    return {str(k): _tensor_to_numpy(v, str(k), str(path)) for k, v in sd.items()}


def write_pth(arrays: Mapping[str, np.ndarray], path) -> Path:
    """torch.save a plain dict of tensors, as the releases are stored."""
    torch = _torch()
    path = Path(path)
    if path.parent and not path.parent.exists():
        raise CheckpointError(f"output folder does not exist: {path.parent}")
    tmp = path.with_name(path.name + ".tmp")
    torch.save({k: _numpy_to_tensor(v) for k, v in arrays.items()}, tmp)
    os.replace(tmp, path)  # never leave a half-written checkpoint under the real name
    return path


# --- native (.safetensors) ----------------------------------------------------------


def write_native(arrays: Mapping[str, np.ndarray], config: RWKVConfig, path) -> Path:
    """Release keys and shapes in a safetensors file; the config in its metadata."""
    import jax.numpy as jnp
    from safetensors.flax import save_file

    path = Path(path)
    if path.parent and not path.parent.exists():
        raise CheckpointError(f"output folder does not exist: {path.parent}")
    metadata = {
        "format": NATIVE_FORMAT,
        "version": NATIVE_VERSION,
        "config": json.dumps(config.to_dict()),
    }
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: jnp.asarray(v) for k, v in arrays.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def read_native(path) -> Tuple[Dict[str, np.ndarray], RWKVConfig]:
    """Read a native checkpoint written by `write_native`."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            keys = list(f.keys())
    except Exception as err:
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot read {path} as a safetensors file: {msg}") from None
    if metadata.get("format") != NATIVE_FORMAT or "config" not in metadata:
        raise CheckpointError(f"{path}: not an {NATIVE_FORMAT} checkpoint (metadata {metadata})")
    try:
        config = RWKVConfig.from_dict(json.loads(metadata["config"]))
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: bad config in metadata: {err}") from None
    from safetensors.flax import load_file

    arrays = {k: np.asarray(v) for k, v in load_file(str(path)).items()}
    arrays = {k: arrays[k] for k in keys}
    return arrays, config


def is_native(path) -> bool:
    """True for a native checkpoint (safetensors), by content, not by name."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return False
    # safetensors: 8-byte little-endian header length, then a JSON object.
    return len(head) == 9 and head[8:9] == b"{"
