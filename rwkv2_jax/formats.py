"""Checkpoint formats: the release `.pth` (torch) and the native `.safetensors` (no torch).

Both use the release key names and shapes (spec, "File format"). The mapping to
Flax parameters is one table, `release_layout`, used in both directions:

    kind     release shape   Flax parameter
    copy     same            same (embedding [V, C], LayerNorm vectors [C])
    linear   W [out, in]     Dense kernel W.T [in, out]
    vector   [C, 1], [1,1,C] [C]

Nothing here changes a value, so release -> Flax -> release is bit-exact in any
dtype (float32, float16, bfloat16, float64).

Everything read is checked before use: the format is read off the content, never the file
name (`checkpoint_format`); every tensor must be a dense floating-point array
(`check_arrays`: finite too, unless allowed); a native file's config must be usable
(`check_config`). Everything written goes through `write_atomically`: a temporary file in
the same folder, renamed into place, so a failed write never leaves a partial file.
"""

from __future__ import annotations

import json
import math
import os
import re
import secrets
import warnings
from pathlib import Path
from typing import Callable, Dict, List, Mapping, NamedTuple, Optional, Tuple

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import load_file as load_safetensors
from safetensors.numpy import save_file as save_safetensors

from rwkv2_jax.config import K_CLAMP, K_EPS, RWKVConfig

NATIVE_FORMAT = "rwkv2-jax"
NATIVE_VERSION = "1"
ACCEPTED_DTYPES = ("float32", "float16", "bfloat16", "float64")
# e^88 ≈ 1.7e38 is just under float32's largest value: a larger clamp no longer keeps exp(K) finite.
K_CLAMP_MAX = 88.0
# The releases use 1e-8 and 1e-9; an epsilon this large already shifts small WKV averages visibly.
K_EPS_MAX = 1e-3


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


# --- validation -----------------------------------------------------------------------


def _is_number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))


def check_config(config: RWKVConfig, source: str) -> None:
    """The numeric fields a file (or a caller) can get wrong: k_clamp None or in (0, K_CLAMP_MAX],
    k_eps in (0, K_EPS_MAX], both finite numbers (a JSON `true` is not a number here)."""
    check_k_values(config.k_clamp, config.k_eps, source)


def check_k_values(k_clamp, k_eps, source: str) -> None:
    """`check_config` on the two values, before they make a config."""
    if k_clamp is not None and not (_is_number(k_clamp) and math.isfinite(k_clamp) and 0 < k_clamp <= K_CLAMP_MAX):
        raise CheckpointError(f"{source}: k_clamp={k_clamp!r} must be None or a finite number in (0, {K_CLAMP_MAX:g}]")
    if not (_is_number(k_eps) and math.isfinite(k_eps) and 0 < k_eps <= K_EPS_MAX):
        raise CheckpointError(f"{source}: k_eps={k_eps!r} must be a finite number in (0, {K_EPS_MAX:g}]")


def check_arrays(arrays: Mapping[str, np.ndarray], source: str, *, allow_nonfinite: bool = False) -> None:
    """Every array floating point (ACCEPTED_DTYPES) and, unless allow_nonfinite, finite;
    the error names the first bad key."""
    for key, a in arrays.items():
        if not isinstance(a, np.ndarray):
            raise CheckpointError(f"{source}: key {key!r} is a {type(a).__name__}, not an array")
        if a.dtype.name not in ACCEPTED_DTYPES:
            raise CheckpointError(f"{source}: key {key!r} has dtype {a.dtype.name}; accepted: {ACCEPTED_DTYPES}")
    if allow_nonfinite:
        return
    for key, a in arrays.items():
        finite = np.isfinite(a)
        if not finite.all():
            bad = np.argwhere(~finite)[0]
            where = tuple(int(i) for i in bad)
            raise CheckpointError(
                f"{source}: key {key!r} holds {int((~finite).sum())} non-finite values (first {a[where]} at "
                f"{list(where)}); pass allow_nonfinite=True (--allow-nonfinite) to load it anyway")


# --- format detection and atomic writes ----------------------------------------------------


def checkpoint_format(path) -> str:
    """"pth" (a zip or legacy pickle, what torch.save writes) or "native" (safetensors), read
    off the first bytes whatever the file is called; a one-line error for anything else."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    try:
        with open(path, "rb") as f:
            head = f.read(9)
        size = path.stat().st_size
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint not found: {path}") from None
    except OSError as err:
        raise CheckpointError(f"cannot read {path}: {err.strerror or err}") from None
    # safetensors: an 8-byte little-endian header length, then the JSON header.
    header_fits = len(head) == 9 and int.from_bytes(head[:8], "little") <= size - 8
    if header_fits and head[8:9] == b"{":
        return "native"
    if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        return "pth"  # torch.save's zip, or a (legacy) pickle
    if head[8:9] == b"{":  # a safetensors file with a broken header length: the reader says what is wrong
        return "native"
    what = "an empty file" if size == 0 else f"first bytes {head!r}"
    raise CheckpointError(f"{path} is neither a PyTorch checkpoint (zip or pickle) nor a safetensors file ({what})")


def _create_temp(path: Path) -> Tuple[Path, int]:
    """A new empty file next to `path` -> (its path, the mode open() gives new files here)."""
    for _ in range(8):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)  # 0666 minus the umask
        except FileExistsError:
            continue
        mode = os.fstat(fd).st_mode & 0o777
        os.close(fd)
        return tmp, mode
    raise CheckpointError(f"cannot create a temporary file next to {path}")


def write_atomically(path, write: Callable[[Path], None], check: Optional[Callable[[Path], None]] = None) -> Path:
    """Write `path` through a temporary file in the same folder: `write(tmp)` fills it, `check(tmp)`
    (optional) verifies it, then it is renamed over `path`. On any error the temporary file is
    removed and `path` is left as it was; OS and writer errors become one-line CheckpointErrors.
    The file gets the mode open() would give it (0666 minus the umask), whatever the writer set."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"cannot write {path}: it is a directory (give a file path)")
    if not path.parent.is_dir():
        raise CheckpointError(f"output folder does not exist: {path.parent}")
    try:
        tmp, mode = _create_temp(path)
    except OSError as err:
        raise CheckpointError(f"cannot write in {path.parent}: {err.strerror or err}") from None
    try:
        write(tmp)
        if check is not None:
            check(tmp)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, (OSError, RuntimeError, SafetensorError)):  # torch's writer raises RuntimeError
            raise CheckpointError(f"cannot write {path}: {_first_line(err)}") from None
        raise
    return path


def _first_line(err: BaseException) -> str:
    """An exception's message in one line, without torch's advice to turn weights_only off."""
    text = getattr(err, "strerror", None) or str(err).strip()
    if "weights_only" in text or "Weights only" in text:  # never steer a user to unpickling an untrusted file
        found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
        what = f" ({found.group(1)})" if found else ""
        return f"it holds objects other than tensors{what}, which are refused (unpickling them could run code)"
    return text.splitlines()[0] if text else type(err).__name__


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
    if t.layout != torch.strided or t.is_quantized or t.is_nested:
        kind = "quantized" if t.is_quantized else "nested" if t.is_nested else str(t.layout).replace("torch.", "")
        raise CheckpointError(f"{source}: key {key!r} is a {kind} tensor; only dense tensors are accepted")
    name = str(t.dtype).replace("torch.", "")
    if name not in ACCEPTED_DTYPES:
        raise CheckpointError(f"{source}: key {key!r} has dtype {name}; accepted: {ACCEPTED_DTYPES}")
    if t.is_meta:
        raise CheckpointError(f"{source}: key {key!r} is a meta tensor (a shape without data)")
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits
        import ml_dtypes  # installed with jax; needed only here

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _numpy_to_tensor(a: np.ndarray):
    torch = _torch()
    a = np.array(a, order="C")  # a writable copy: torch shares the memory
    if a.dtype.name == "bfloat16":
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def read_pth(path) -> Dict[str, np.ndarray]:
    """Load a release `.pth` (an untrusted file: weights_only=True) as numpy arrays by key.
    Checks the structure (a mapping of dense floating-point tensors), not the values:
    `check_arrays` does."""
    torch = _torch()
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # e.g. "pickle protocol 4": the error below says what matters
            warnings.simplefilter("ignore")
            if path.name.endswith(".safetensors"):  # torch.load would read a path so named as safetensors
                with open(path, "rb") as f:
                    sd = torch.load(f, map_location="cpu", weights_only=True)
            else:
                try:
                    sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as err:
                    if "mmap" not in str(err):  # legacy (non-zip) files cannot be memory-mapped
                        raise
                    sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, pickle refused by weights_only, not torch at all, ...
        raise CheckpointError(f"cannot read {path} as a PyTorch checkpoint: {_first_line(err)}") from None
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{path}: expected a state dict (a mapping of tensors), got {type(sd).__name__}")
    return {str(k): _tensor_to_numpy(v, str(k), str(path)) for k, v in sd.items()}


def write_pth(arrays: Mapping[str, np.ndarray], path, *, check: Optional[Callable[[Path], None]] = None) -> Path:
    """torch.save a plain dict of tensors, as the releases are stored (atomically: see
    `write_atomically`, whose `check` may verify the written file before it takes the name)."""
    torch = _torch()
    tensors = {k: _numpy_to_tensor(v) for k, v in arrays.items()}
    return write_atomically(path, lambda tmp: torch.save(tensors, tmp), check)


# --- native (.safetensors) ----------------------------------------------------------


def write_native(arrays: Mapping[str, np.ndarray], config: RWKVConfig, path, *,
                 check: Optional[Callable[[Path], None]] = None) -> Path:
    """Release keys and shapes in a safetensors file (dtypes as given); the config in its metadata."""
    metadata = {
        "format": NATIVE_FORMAT,
        "version": NATIVE_VERSION,
        "config": json.dumps(config.to_dict()),
    }
    arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
    return write_atomically(path, lambda tmp: save_safetensors(arrays, str(tmp), metadata=metadata), check)


def config_from_metadata(text: str, source: str) -> RWKVConfig:
    """The config stored in a native file's metadata, every field checked (errors name it)."""
    try:
        raw = json.loads(text)
    except ValueError as err:
        raise CheckpointError(f"{source}: bad config in metadata: {err}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{source}: bad config in metadata: expected a JSON object, got {text[:80]!r}")
    for name in ("n_layer", "n_embd", "vocab_size", "ctx_len"):
        value = raw.get(name, 1)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise CheckpointError(f"{source}: config field {name}={value!r} must be a positive int")
    if not isinstance(raw.get("ffn_pre", False), bool):
        raise CheckpointError(f"{source}: config field ffn_pre={raw['ffn_pre']!r} must be true or false")
    check_k_values(raw.get("k_clamp", K_CLAMP), raw.get("k_eps", K_EPS), source)
    try:
        return RWKVConfig.from_dict(raw)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{source}: bad config in metadata: {err}") from None


def read_native(path) -> Tuple[Dict[str, np.ndarray], RWKVConfig]:
    """Read a native checkpoint written by `write_native`, dtypes as stored (numpy; no cast)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            keys = list(f.keys())
        if metadata.get("format") != NATIVE_FORMAT or "config" not in metadata:
            raise CheckpointError(f"{path}: not an {NATIVE_FORMAT} checkpoint (metadata {metadata})")
        config = config_from_metadata(metadata["config"], str(path))
        arrays = load_safetensors(str(path))
    except CheckpointError:
        raise
    except Exception as err:  # a bad header, a dtype numpy cannot hold, a truncated file, ...
        raise CheckpointError(f"cannot read {path} as a safetensors file: {_first_line(err)}") from None
    return {k: arrays[k] for k in keys}, config
