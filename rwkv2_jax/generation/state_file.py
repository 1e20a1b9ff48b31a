"""Save and load an RNN state, to continue a conversation (or a long document) later.

    logits, state = rw.generate(model, [ids], 100, return_state=True)   # or model.prefill(...)
    rw.save_state("chat.safetensors", state, model)
    state = rw.load_state("chat.safetensors", model)
    rw.generate(model, [next_ids], 100, state=state)

Format: one `.safetensors` file with the five State fields (`x_att`, `x_ffn`, `aa`, `bb`,
`pp`, each [L, B, C] float32) and, in its metadata, the format name and the model's
config. Loading checks the shape-defining config fields (n_layer, n_embd, vocab_size,
ffn_pre), so a state cannot be loaded into a different model.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from rwkv2_jax.config import RWKVConfig
from rwkv2_jax.formats import CheckpointError, write_atomically
from rwkv2_jax.model import State

STATE_FORMAT = "rwkv2_jax.state"
STATE_VERSION = "1"
# Config fields that make a state belong to a model (k_eps / k_clamp / ctx_len may differ).
MODEL_FIELDS = ("n_layer", "n_embd", "vocab_size", "ffn_pre")


def _config(model_or_config) -> RWKVConfig:
    if isinstance(model_or_config, RWKVConfig):
        return model_or_config
    config = getattr(model_or_config, "config", None)
    if not isinstance(config, RWKVConfig):
        raise TypeError(f"expected a Model or an RWKVConfig, got {type(model_or_config).__name__}")
    return config


def _describe(d) -> str:
    return f"L{d['n_layer']}-D{d['n_embd']} (vocab_size={d['vocab_size']}, ffn_pre={d['ffn_pre']})"


def save_state(path, state: State, model_or_config) -> Path:
    """Write `state` (a rwkv2_jax.State of any batch size) for this model to `path` (atomically:
    a failed write leaves no partial file and any earlier file at `path` intact)."""
    config = _config(model_or_config)
    if not isinstance(state, State):
        raise TypeError(f"state must be a rwkv2_jax.State, got {type(state).__name__}")
    arrays = {name: np.ascontiguousarray(jax.device_get(x), np.float32) for name, x in state._asdict().items()}
    shape = arrays["x_att"].shape
    for name, a in arrays.items():
        if a.ndim != 3 or a.shape != shape or (a.shape[0], a.shape[2]) != (config.n_layer, config.n_embd):
            raise ValueError(f"state field {name} has shape {list(a.shape)}, expected "
                             f"[{config.n_layer}, B, {config.n_embd}] (L, B, C) for this model")
    metadata = {"format": STATE_FORMAT, "version": STATE_VERSION, "config": json.dumps(config.to_dict())}
    return write_atomically(path, lambda tmp: save_file(arrays, str(tmp), metadata=metadata))


def load_state(path, model_or_config) -> State:
    """Read a state written by `save_state`; errors (one line) if it belongs to another model."""
    config = _config(model_or_config)
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"state file not found: {path}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            arrays = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"cannot read {path} as a safetensors file: {msg}") from None
    if metadata.get("format") != STATE_FORMAT or "config" not in metadata:
        raise CheckpointError(f"{path}: not a {STATE_FORMAT} file (format {metadata.get('format')!r})")
    try:
        saved = json.loads(metadata["config"])
        saved = {k: saved[k] for k in MODEL_FIELDS}
    except (ValueError, TypeError, KeyError) as err:
        raise CheckpointError(f"{path}: bad config in metadata: {err!r}") from None
    ours = {k: getattr(config, k) for k in MODEL_FIELDS}
    if saved != ours:
        raise CheckpointError(f"{path}: state saved for a {_describe(saved)} model, cannot load it into "
                              f"this {_describe(ours)} model")
    missing = [name for name in State._fields if name not in arrays]
    extra = sorted(set(arrays) - set(State._fields))
    if missing or extra:
        raise CheckpointError(f"{path}: state fields missing {missing}, unexpected {extra}")
    shape = arrays["x_att"].shape
    for name in State._fields:
        a = arrays[name]
        if a.ndim != 3 or a.shape != shape or a.shape[0] != config.n_layer or a.shape[2] != config.n_embd:
            raise CheckpointError(f"{path}: state field {name!r} has shape {list(a.shape)}, expected "
                                  f"[{config.n_layer}, B, {config.n_embd}] (L, B, C)")
    return State(*(jnp.asarray(arrays[name], jnp.float32) for name in State._fields))
