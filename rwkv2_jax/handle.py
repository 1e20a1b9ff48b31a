"""The notebook API: a `Model` handle and the functions that load and save it.

    import rwkv2_jax as rw
    model = rw.load_torch("20220615-10803.pth")
    logits = model(tokens)                          # GPT mode: [B, T] -> [B, T, V]
    logits, state = model.rnn(tokens)               # RNN mode via lax.scan
    logits, state = model.prefill(tokens)           # GPT mode + the RNN state after the last token
    rw.save_torch(model, "out.pth")
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from rwkv2_jax import formats as ckpt
from rwkv2_jax.config import K_EPS, RWKVConfig, release_k_eps
from rwkv2_jax.model import RWKV, State, init_state, rnn_scan
from rwkv2_jax.wkv import WKV_IMPLS, ShardedWKV, resolve_wkv_impl
from rwkv2_jax.xla import jit

_UNSET = object()


def check_tokens(tokens, vocab_size: int) -> Tuple[np.ndarray, bool]:
    """Validate token ids on the host: -> (int32 array [B, T], whether the input was 1-D).

    Raises ValueError naming the first bad id and its position; ids are never clamped.
    """
    if isinstance(tokens, jax.core.Tracer):
        raise TypeError("Model methods take concrete tokens; inside jax.jit use model.module.apply")
    arr = np.asarray(tokens)
    if arr.dtype == object or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
        raise ValueError(f"tokens must be integer ids, got dtype {arr.dtype}")
    one_d = arr.ndim == 1
    if one_d:
        arr = arr[None, :]
    if arr.ndim != 2:
        raise ValueError(f"tokens must be [B, T] (or [T]), got shape {list(arr.shape)}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"tokens is empty: shape {list(arr.shape)}")
    bad = (arr < 0) | (arr >= vocab_size)
    if bad.any():
        pos = tuple(int(i) for i in np.argwhere(bad)[0])
        where = f"position {pos[1]}" if one_d else f"position [{pos[0]}, {pos[1]}]"
        raise ValueError(f"token id {int(arr[pos])} at {where} is outside [0, {vocab_size})")
    return arr.astype(np.int32), one_d


class Model:
    """A loaded RWKV-v2: `config`, `params` (a Flax params tree) and jitted modes.

    Args:
      config: the model's RWKVConfig.
      params: Flax params of `RWKV(config)` (any float dtype; kept as given).
      dtype: matmul compute dtype (float32 default; bfloat16 for speed). LayerNorm,
        the WKV and the RNN state are float32 always.
      wkv_impl: "auto" (Pallas kernel on GPU, plain-JAX scan elsewhere),
        "reference", "pallas" or "pallas_interpret".
      precision: matmul precision; None means "highest" for float32 compute (exact
        float32 on GPUs, where JAX's default may use TF32) and JAX's default otherwise.

    How generation runs the decode step on a GPU is not the model's: `rw.generate` and
    `rw.stream` take `decode_options=` (rwkv2_jax.generation.step.DecodeOptions).
    """

    def __init__(self, config: RWKVConfig, params, *, dtype=jnp.float32, wkv_impl: str = "auto",
                 precision: Optional[str] = None):
        if wkv_impl not in WKV_IMPLS:
            raise ValueError(f"unknown wkv_impl={wkv_impl!r}; choose one of {WKV_IMPLS}")
        self.config = config
        self.params = jax.tree.map(jnp.asarray, params)
        self.dtype = jnp.dtype(dtype)
        self.wkv_impl = wkv_impl
        if precision is None and self.dtype == jnp.float32:
            precision = "highest"
        self.precision = precision
        self.module = RWKV(config, dtype=self.dtype, wkv_impl=wkv_impl, precision=precision)
        self._forward = jit(
            lambda p, tokens, state, lengths=None: self.module.apply({"params": p}, tokens, state, lengths)
        )
        self._rnn = jit(lambda p, tokens, state: rnn_scan(self.module, p, tokens, state))
        self._logits = jit(lambda p, tokens: self.logits_module.apply({"params": p}, tokens)[0])

    @property
    def logits_module(self) -> RWKV:
        """The module for GPT mode from the empty state where the state after is not needed
        (logits, losses, scores): with the Pallas WKV it runs the kernel's stateless form
        (`pallas_kernels.wkv.wkv`: linear mode with the clamp, faster than the state-keeping log
        mode; `python3 bench/wkv.py`). Its returned state is meaningless; elsewhere `module`."""
        impl = resolve_wkv_impl(self.wkv_impl)
        if impl not in ("pallas", "pallas_interpret"):
            return self.module
        return self.module.clone(wkv_impl=ShardedWKV(impl, None, from_zero_state=True))

    # -- modes ------------------------------------------------------------------------

    def __call__(self, tokens) -> jax.Array:
        """GPT mode: int [B, T] -> float32 logits [B, T, V] (a 1-D [T] gives [T, V])."""
        arr, one_d = check_tokens(tokens, self.config.vocab_size)
        logits = self._logits(self.params, arr)
        return logits[0] if one_d else logits

    def prefill(self, tokens, state: Optional[State] = None, lengths=None) -> Tuple[jax.Array, State]:
        """GPT mode over tokens, from `state` (None: start), -> (logits, state after the last token).

        `lengths` [B]: rows are right-padded; row b's state is taken after its token
        lengths[b] - 1 (its logits past that are meaningless). Padding ids must be valid ids.
        """
        arr, one_d = check_tokens(tokens, self.config.vocab_size)
        state = self.check_state(state, arr.shape[0])
        if lengths is not None:
            lengths = np.asarray(lengths)
            if lengths.shape != (arr.shape[0],) or not np.issubdtype(lengths.dtype, np.integer):
                raise ValueError(f"lengths must be {arr.shape[0]} ints (one per row), got {lengths!r}")
            if lengths.min() < 1 or lengths.max() > arr.shape[1]:
                raise ValueError(f"lengths must be in [1, T={arr.shape[1]}], got {lengths.tolist()}")
            lengths = jnp.asarray(lengths, jnp.int32)
        logits, state = self._forward(self.params, arr, state, lengths)
        return (logits[0] if one_d else logits), state

    def rnn(self, tokens, state: Optional[State] = None) -> Tuple[jax.Array, State]:
        """RNN mode, one token at a time under lax.scan -> (logits [B, T, V], final state)."""
        arr, one_d = check_tokens(tokens, self.config.vocab_size)
        state = self.check_state(state, arr.shape[0])
        logits, state = self._rnn(self.params, arr, state)
        return (logits[0] if one_d else logits), state

    def init_state(self, batch_size: int = 1) -> State:
        """The RNN state at the start of a sequence: State of [L, B, C] float32 arrays."""
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        return init_state(self.config, int(batch_size))

    def check_state(self, state: Optional[State], batch_size: int) -> State:
        """`state` checked against this model and batch_size (None: the start state)."""
        if state is None:
            return self.init_state(batch_size)
        if not isinstance(state, State):
            raise TypeError(f"state must be a rwkv2_jax.State, got {type(state).__name__}")
        want = (self.config.n_layer, batch_size, self.config.n_embd)
        if tuple(state.x_att.shape) != want:
            raise ValueError(f"state has shape {list(state.x_att.shape)} per field, expected {list(want)} [L, B, C]")
        return state

    # -- conveniences -----------------------------------------------------------------

    def replace(self, **changes) -> "Model":
        """A Model on the same params with config fields (k_eps=, k_clamp=, ...), dtype=,
        wkv_impl= or precision= changed."""
        dtype = changes.pop("dtype", self.dtype)
        wkv_impl = changes.pop("wkv_impl", self.wkv_impl)
        precision = changes.pop("precision", self.precision if dtype == self.dtype else None)
        return Model(self.config.replace(**changes), self.params, dtype=dtype, wkv_impl=wkv_impl,
                     precision=precision)

    @property
    def n_params(self) -> int:
        return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(self.params))

    def __repr__(self) -> str:
        c = self.config
        pdt = sorted({str(x.dtype) for x in jax.tree.leaves(self.params)})
        return (
            f"Model(L{c.n_layer}-D{c.n_embd}, vocab_size={c.vocab_size}, "
            f"params={self.n_params / 1e6:.1f}M {'/'.join(pdt)}, compute={self.dtype.name}, "
            f"k_clamp={c.k_clamp}, k_eps={c.k_eps:g}, ffn_pre={c.ffn_pre}, wkv_impl={self.wkv_impl!r})"
        )


# --- constructors and savers ---------------------------------------------------------


def init(config: RWKVConfig, seed: int = 0, **kwargs) -> Model:
    """A fresh model with the original trainer's initialisation (spec)."""
    module = RWKV(config)
    params = module.init(jax.random.PRNGKey(seed), jnp.zeros((1, 1), jnp.int32))["params"]
    return Model(config, params, **kwargs)


def _load_notice(verbose: bool, message: str) -> None:
    if verbose:
        print(f"rwkv2_jax: {message}", file=sys.stderr)


def _model_from_arrays(arrays, config: RWKVConfig, source: str, *, dtype, wkv_impl: str,
                       allow_nonfinite: bool, verbose: bool) -> Model:
    """Release-format arrays and their config, both checked -> a Model."""
    ckpt.check_config(config, source)
    config = config.replace(k_eps=float(config.k_eps), k_clamp=None if config.k_clamp is None else float(config.k_clamp))
    ckpt.check_keys({k: tuple(v.shape) for k, v in arrays.items()}, config, source)
    ckpt.check_arrays(arrays, source, allow_nonfinite=allow_nonfinite)
    if dtype is None and any(a.dtype == np.float64 for a in arrays.values()):
        kept = ("kept as float64" if jax.config.jax_enable_x64
                else "stored as float32, JAX's default (jax_enable_x64 keeps float64)")
        _load_notice(verbose, f"{source} holds float64 weights: {kept}; matmuls compute in float32")
    params = ckpt.release_to_params(arrays, config)
    if dtype is not None:
        params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
    return Model(config, params, dtype=jnp.float32 if dtype is None else dtype, wkv_impl=wkv_impl)


def _host_array(value, key: str, source: str) -> np.ndarray:
    """numpy arrays as they are; jax arrays (and anything numpy can read) copied to the host."""
    if isinstance(value, np.ndarray):
        return value
    try:
        return np.asarray(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ckpt.CheckpointError(f"{source}: key {key!r} cannot be read as an array: {err}") from None


def from_release_arrays(arrays, *, source: str = "state dict", k_eps=None, k_clamp=_UNSET,
                        dtype=None, wkv_impl: str = "auto", ctx_len: Optional[int] = None,
                        allow_nonfinite: bool = False, verbose: bool = True, **config_overrides) -> Model:
    """A Model from release-format arrays (numpy, by release key); L, C, V and ffn_pre are read
    off the shapes. Every array must be floating point and finite (allow_nonfinite=True: any values)."""
    arrays = {k: _host_array(v, k, source) for k, v in arrays.items()}
    overrides = {"k_eps": K_EPS if k_eps is None else k_eps, **config_overrides}
    if k_clamp is not _UNSET:
        overrides["k_clamp"] = k_clamp
    if ctx_len is not None:
        overrides["ctx_len"] = ctx_len
    shapes = {k: tuple(np.shape(v)) for k, v in arrays.items()}
    config = ckpt.config_from_shapes(shapes).replace(**overrides)
    return _model_from_arrays(arrays, config, source, dtype=dtype, wkv_impl=wkv_impl,
                              allow_nonfinite=allow_nonfinite, verbose=verbose)


def load_any(path, *, k_eps: Optional[float] = None, k_clamp=_UNSET, ctx_len: Optional[int] = None,
             dtype=None, wkv_impl: str = "auto", allow_nonfinite: bool = False, verbose: bool = True,
             **config_overrides) -> Model:
    """Load a checkpoint: a release `.pth` or a native `.safetensors`, told apart by the file's
    content (never its name). Every tensor must be floating point (float32, float16, bfloat16;
    float64 is accepted, with a notice) and finite; allow_nonfinite=True skips the finiteness check.

    Args:
      k_eps: the WKV denominator epsilon. None: a native file's stored value; for a `.pth`,
        looked up from the release name in the file name (1e-8 for 20220615-10803, else 1e-9;
        the choice is printed unless verbose=False).
      k_clamp: 60.0 (every release) or None; not given: the stored value (native) or 60.0.
      ctx_len: the informational training context (not given: stored value, or 768).
      dtype: cast the parameters to this dtype and compute matmuls in it (e.g. jnp.bfloat16);
        None keeps the file's dtype and computes in float32.
      config_overrides: other RWKVConfig fields (their shape-defining values must match the file).
    """
    path = Path(path)
    if ckpt.checkpoint_format(path) == "native":
        arrays, config = ckpt.read_native(path)
        given = dict(config_overrides)
        for name, value, unset in (("k_eps", k_eps, None), ("k_clamp", k_clamp, _UNSET), ("ctx_len", ctx_len, None)):
            if value is not unset:
                given[name] = value
        return _model_from_arrays(arrays, config.replace(**given), str(path), dtype=dtype, wkv_impl=wkv_impl,
                                  allow_nonfinite=allow_nonfinite, verbose=verbose)
    arrays = ckpt.read_pth(path)
    if k_eps is None:
        k_eps = release_k_eps(path.name)
        if k_eps is None:
            _load_notice(verbose, f"k_eps={K_EPS:g} (default: {path.name!r} names no release in the "
                                  "spec's table; pass k_eps= to override)")
        else:
            _load_notice(verbose, f"k_eps={k_eps:g} (release table entry matched by {path.name!r}; "
                                  "pass k_eps= to override)")
    return from_release_arrays(arrays, source=str(path), k_eps=k_eps, k_clamp=k_clamp, dtype=dtype,
                               wkv_impl=wkv_impl, ctx_len=ctx_len, allow_nonfinite=allow_nonfinite,
                               verbose=verbose, **config_overrides)


def load_torch(path, *, k_eps: Optional[float] = None, k_clamp=_UNSET, dtype=None,
               wkv_impl: str = "auto", ctx_len: Optional[int] = None, verbose: bool = True,
               allow_nonfinite: bool = False) -> Model:
    """Load a release `.pth` checkpoint (a native file loads too: the format is read from the
    content). Arguments: `load_any`."""
    return load_any(path, k_eps=k_eps, k_clamp=k_clamp, dtype=dtype, wkv_impl=wkv_impl, ctx_len=ctx_len,
                    verbose=verbose, allow_nonfinite=allow_nonfinite)


def save_torch(model: Model, path) -> Path:
    """Write the model as a release `.pth` (release keys, shapes and the params' dtype)."""
    return ckpt.write_pth(ckpt.params_to_release(jax.device_get(model.params), model.config), path)


def save(model: Model, path) -> Path:
    """Write the native checkpoint: one `.safetensors` file (release keys and shapes,
    the config in its metadata). Needs no torch."""
    return ckpt.write_native(ckpt.params_to_release(jax.device_get(model.params), model.config),
                             model.config, path)


def load(path, *, dtype=None, wkv_impl: str = "auto", allow_nonfinite: bool = False, verbose: bool = True,
         **config_overrides) -> Model:
    """Load a native checkpoint written by `save` (config overrides e.g. k_eps=); a release
    `.pth` loads too, whatever its name: the format is read from the content (`load_any`)."""
    return load_any(path, dtype=dtype, wkv_impl=wkv_impl, allow_nonfinite=allow_nonfinite, verbose=verbose,
                    **config_overrides)
