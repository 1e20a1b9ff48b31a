"""RWKV-v2 as Flax (linen) modules: time-mix, channel-mix, block, model.

One code path serves both modes. Every module takes the sequence [B, T, C] and
the state *before* it, and returns its output and the state *after* it:

* GPT mode is a call over the whole sequence from the zero state;
* prefill is the same call, keeping the returned state;
* RNN mode is `lax.scan` over tokens of the same call with T = 1.

The residual is taken around the *normalised* stream (spec, **v2**):
    x = LN1(x); x = x + TimeMix(x); x = LN2(x); x = x + ChannelMix(x)
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rwkv2_jax.config import LN_EPS, RWKVConfig
from rwkv2_jax.wkv import EMPTY_EXP, WKVState, wkv_dispatch

class State(NamedTuple):
    """RNN state of the whole model; every field is [L, B, C] float32.

    x_att: the previous LN1 output (time-mix shift; the ffnPre mix in block 0 of
      that variant). x_ffn: the previous LN2 output (channel-mix shift).
    aa, bb, pp: the WKV sums, scaled by exp(-pp) (see `rwkv2_jax.wkv`).
    """

    x_att: jax.Array
    x_ffn: jax.Array
    aa: jax.Array
    bb: jax.Array
    pp: jax.Array

    @property
    def batch_size(self) -> int:
        return self.x_att.shape[1]


def init_state(config: RWKVConfig, batch_size: int) -> State:
    """The state at the start of a sequence."""
    shape = (config.n_layer, batch_size, config.n_embd)
    zeros = jnp.zeros(shape, jnp.float32)
    return State(zeros, zeros, zeros, zeros, jnp.full(shape, EMPTY_EXP, jnp.float32))


# --- initialisation of the original trainer (spec, "Initialisation") ---------------


def _time_decay_init(layer_id: int, n_layer: int):
    """log(f1 * f2^(7c/(C-1))): f1, f2 interpolated over layers from layer 1 to the last."""

    def init(key, shape, dtype=jnp.float32):
        del key
        (C,) = shape
        first = 1  # block 0 may be the ffnPre channel-mix, so curves start at layer 1
        frac = (layer_id - first) / max(n_layer - 1 - first, 1)
        f1 = 3.0 + frac * (1.2 - 3.0)
        f2 = 0.65 + frac * (0.4 - 0.65)
        if layer_id == first:
            f1 += 0.5
        if layer_id == n_layer - 2:
            f2 = 0.4
        if layer_id == n_layer - 1:
            f2 = 0.37
        c = np.arange(C) / max(C - 1, 1)
        return jnp.asarray(np.log(f1 * np.power(f2, 7.0 * c)), dtype)

    return init


def _time_first_init(key, shape, dtype=jnp.float32):
    del key
    return jnp.full(shape, math.log(0.3), dtype)


def _time_mix_init(key, shape, dtype=jnp.float32):
    """0 for the first half of the channels (pure shift), 1 for the rest."""
    del key
    (C,) = shape
    return jnp.asarray(np.arange(C) >= C // 2, dtype)


_LINEAR_INIT = nn.initializers.normal(0.01)
_ZERO_INIT = nn.initializers.zeros


# --- pieces --------------------------------------------------------------------------


def token_shift(x: jax.Array, prev: jax.Array) -> jax.Array:
    """x_{t-1} for every t: x [B, T, C], prev [B, C] (the vector before x_0) -> [B, T, C]."""
    return jnp.concatenate([prev[:, None, :].astype(x.dtype), x[:, :-1, :]], axis=1)


def _mix(x, prev, time_mix, dtype):
    """xx_t = x_t * mix + x_{t-1} * (1 - mix), one `time_mix` per mix (spec, **v2**), in `dtype`."""
    x, prev, time_mix = x.astype(dtype), prev.astype(dtype), time_mix.astype(dtype)
    return x * time_mix + token_shift(x, prev) * (1 - time_mix)


@jax.custom_vjp
def embed(table: jax.Array, tokens: jax.Array) -> jax.Array:
    """table[tokens]: rows of the embedding table [V, C] for int tokens [...] -> [..., C].

    Its gradient adds each token's rows in a fixed order (`_sorted_row_sums`): repeatable bit
    for bit with no scatter. Under XLA's deterministic ops a scatter-add sorts every gradient
    row along with its index, 3.5 ms of the bf16 L24-D1024 step (B = 8, T = 768) on an H100,
    where this takes about 0.2 ms (python3 bench/profile.py train; docs/PERF.md).
    """
    return jnp.take(table, tokens, axis=0)


def _embed_fwd(table, tokens):
    return embed(table, tokens), (tokens, table.shape[0])


def _embed_bwd(res, d_rows):
    tokens, V = res
    d_rows = d_rows.reshape(-1, d_rows.shape[-1])
    return _sorted_row_sums(tokens.reshape(-1), d_rows, V).astype(d_rows.dtype), None


embed.defvjp(_embed_fwd, _embed_bwd)


def _sorted_row_sums(ids: jax.Array, rows: jax.Array, n: int) -> jax.Array:
    """out[v] = sum of rows[i] where ids[i] == v, for v < n ([N], [N, C] -> [n, C]), with no
    scatter: sort the ids, sum each run of equal ids with a segmented scan, read each run's total."""
    order = jnp.argsort(ids, stable=True)
    ids, rows = ids[order], rows[order]
    starts = jnp.concatenate([jnp.ones((1,), bool), ids[1:] != ids[:-1]])

    def add_within_runs(a, b):
        start_a, sum_a = a
        start_b, sum_b = b
        return start_a | start_b, jnp.where(start_b[:, None], sum_b, sum_a + sum_b)

    _, totals = jax.lax.associative_scan(add_within_runs, (starts, rows))  # a run's total at its last row
    vocab = jnp.arange(n, dtype=ids.dtype)
    last = jnp.maximum(jnp.searchsorted(ids, vocab, side="right") - 1, 0)
    return jnp.where((ids[last] == vocab)[:, None], totals[last], 0)


def token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log softmax(logits)[target] per position: logits [..., V], targets [...] int -> [...] float32.

    The target's logit is picked by a comparison with the vocabulary, not a gather, whose
    gradient is a scatter into [B, T, V]: the loss's share of the bf16 L24-D1024 step on an
    H100 is 0.5 ms this way, 1.1 ms with optax's gather (python3 bench/profile.py train;
    docs/PERF.md).
    """
    logits = logits.astype(jnp.float32)
    is_target = jnp.arange(logits.shape[-1]) == targets[..., None]
    return jax.nn.logsumexp(logits, axis=-1) - jnp.sum(jnp.where(is_target, logits, 0.0), axis=-1)


class Embedding(nn.Module):
    """The embedding table [V, C] ("embedding", as flax's nn.Embed names it) and its lookup."""

    vocab_size: int
    features: int

    @nn.compact
    def __call__(self, tokens):
        table = self.param("embedding", nn.initializers.normal(1e-5), (self.vocab_size, self.features))
        return embed(table, tokens)


def _dense(features: int, name: str, init, dtype, precision):
    return nn.Dense(features, use_bias=False, kernel_init=init, dtype=dtype, precision=precision, name=name)


class _Kernel(nn.Module):
    """A matrix parameter [in, out] named "kernel", as nn.Dense names its own."""

    shape: Tuple[int, int]
    init: Callable

    @nn.compact
    def __call__(self):
        return self.param("kernel", self.init, self.shape)


def _matmul(x: jax.Array, w: jax.Array, precision) -> jax.Array:
    """x [..., in] @ w [in, out], the product nn.Dense takes."""
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


def _head(x: jax.Array, vocab_size: int, multiple: int, dtype, precision) -> jax.Array:
    """x [..., C] -> logits [..., V] through "head/kernel" [C, V], the product taken over V
    rounded up to `multiple` zero columns (see RWKV.head_multiple)."""
    w = _Kernel((x.shape[-1], vocab_size), _LINEAR_INIT, name="head")().astype(dtype)
    pad = -vocab_size % multiple
    if pad:
        w = jnp.pad(w, ((0, 0), (0, pad)))
    return _matmul(x.astype(dtype), w, precision)[..., :vocab_size]


def _layer_norm(name: str):
    return nn.LayerNorm(epsilon=LN_EPS, dtype=jnp.float32, name=name)


def last_valid(x: jax.Array, lengths: Optional[jax.Array]) -> jax.Array:
    """x [B, T, C] -> the vector at each row's last real token [B, C] (the shift state)."""
    if lengths is None:
        return x[:, -1]
    return jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)[:, 0]


class ChannelMix(nn.Module):
    """k = relu(Wk xx)^2;  out = sigmoid(Wr xx) * (Wv k)."""

    config: RWKVConfig
    dtype: jnp.dtype = jnp.float32
    precision: Optional[str] = None
    mix_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, prev, lengths=None):  # x [B, T, C] (LN output), prev [B, C]
        C = self.config.n_embd
        time_mix = self.param("time_mix", _time_mix_init, (C,))
        xx = _mix(x, prev, time_mix, self.mix_dtype).astype(self.dtype)
        # Key and receptance as one product with their matrices side by side: the backward pass
        # then gets d(xx) from one product over one gradient buffer, where XLA would otherwise
        # copy the two gradients into one. The bf16 L24-D1024 training step is 2.8% faster on
        # an H100 (python3 bench/compare.py; docs/PERF.md, "Training step").
        w_key = _Kernel((C, 4 * C), _LINEAR_INIT, name="key")()
        w_receptance = _Kernel((C, C), _ZERO_INIT, name="receptance")()
        w = jnp.concatenate([w_key, w_receptance], axis=1).astype(self.dtype)
        kr = _matmul(xx, w, self.precision)
        k, r = kr[..., : 4 * C], kr[..., 4 * C :]  # [B, T, 4C], [B, T, C]
        k = jnp.square(jax.nn.relu(k))
        kv = _dense(C, "value", _ZERO_INIT, self.dtype, self.precision)(k)  # [B, T, C]
        out = jax.nn.sigmoid(r.astype(jnp.float32)) * kv.astype(jnp.float32)
        return out, last_valid(x, lengths)


class TimeMix(nn.Module):
    """out = Wo( sigmoid(R) * WKV(K, V) )."""

    config: RWKVConfig
    layer_id: int
    dtype: jnp.dtype = jnp.float32
    wkv_impl: str = "auto"
    precision: Optional[str] = None
    mix_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, prev, wkv_state: WKVState, lengths=None):  # x [B, T, C], prev [B, C]
        cfg = self.config
        C = cfg.n_embd
        time_decay = self.param("time_decay", _time_decay_init(self.layer_id, cfg.n_layer), (C,))
        time_first = self.param("time_first", _time_first_init, (C,))
        time_mix = self.param("time_mix", _time_mix_init, (C,))
        xx = _mix(x, prev, time_mix, self.mix_dtype)
        k = _dense(C, "key", _ZERO_INIT, self.dtype, self.precision)(xx)  # [B, T, C] K before exp
        v = _dense(C, "value", _LINEAR_INIT, self.dtype, self.precision)(xx)
        r = _dense(C, "receptance", _ZERO_INIT, self.dtype, self.precision)(xx)
        wkv, wkv_state = wkv_dispatch(
            self.wkv_impl, k, v, time_decay, time_first, wkv_state,
            k_clamp=cfg.k_clamp, k_eps=cfg.k_eps, lengths=lengths,
        )  # [B, T, C] float32
        rwkv = jax.nn.sigmoid(r.astype(jnp.float32)) * wkv
        out = _dense(C, "output", _ZERO_INIT, self.dtype, self.precision)(rwkv)
        return out.astype(jnp.float32), last_valid(x, lengths), wkv_state


class Block(nn.Module):
    config: RWKVConfig
    layer_id: int
    dtype: jnp.dtype = jnp.float32
    wkv_impl: str = "auto"
    precision: Optional[str] = None
    mix_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, x_att, x_ffn, wkv_state: WKVState, lengths=None):
        cfg = self.config
        x = _layer_norm("ln1")(x)
        if cfg.ffn_pre and self.layer_id == 0:
            dx, x_att = ChannelMix(cfg, self.dtype, self.precision, self.mix_dtype, name="ffnPre")(x, x_att, lengths)
        else:
            dx, x_att, wkv_state = TimeMix(
                cfg, self.layer_id, self.dtype, self.wkv_impl, self.precision, self.mix_dtype, name="att"
            )(x, x_att, wkv_state, lengths)
        x = x + dx
        x = _layer_norm("ln2")(x)
        dx, x_ffn = ChannelMix(cfg, self.dtype, self.precision, self.mix_dtype, name="ffn")(x, x_ffn, lengths)
        return x + dx, x_att, x_ffn, wkv_state


class RWKV(nn.Module):
    """The language model: embedding -> L blocks -> ln_out -> head.

    __call__(tokens [B, T] int, state) -> (logits [B, T, V] float32, state after T).
    """

    config: RWKVConfig
    dtype: jnp.dtype = jnp.float32  # matmul compute dtype; LayerNorm and WKV stay float32
    wkv_impl: str = "auto"
    remat: bool = False  # recompute each block in the backward pass (training memory)
    # Matmul precision ("highest", "float32", "tensorfloat32", "bfloat16", "default" or None
    # = JAX's default, which may be TF32 on GPUs). Model() uses "highest" for float32 parity.
    precision: Optional[str] = None
    # The token-shift mixes, which feed only the products. The training step computes them in
    # its matmul dtype: in bf16 that halves their bytes and those of their gradients, and the
    # step is 1.7% faster on an H100 (python3 bench/compare.py; docs/PERF.md). Inference keeps
    # float32: its bf16-weight logits stay twice as close to float32's (tests/test_generate.py).
    mix_dtype: jnp.dtype = jnp.float32
    # The head's product runs over the vocabulary rounded up to this multiple, on zero columns
    # that are sliced off. cuBLAS runs float32 (TF32) products whose rows are not 16-byte
    # aligned (V = 50,277) on slow generic kernels; XLA pads bf16 products itself. With 8 the
    # float32 training step is 11% faster on an H100, bf16 unchanged (python3 bench/compare.py
    # --dtype float32; docs/PERF.md). Inference keeps 1: a padded copy of the head per call.
    head_multiple: int = 1

    @nn.compact
    def __call__(
        self, tokens: jax.Array, state: Optional[State] = None, lengths: Optional[jax.Array] = None
    ) -> Tuple[jax.Array, State]:
        """tokens [B, T]; `lengths` [B] for right-padded rows (state taken at each row's end)."""
        cfg = self.config
        block = nn.remat(Block) if self.remat else Block
        B = tokens.shape[0]
        if state is None:
            state = init_state(cfg, B)
        x = Embedding(cfg.vocab_size, cfg.n_embd, name="emb")(tokens).astype(jnp.float32)  # [B, T, C]
        new = []
        for i in range(cfg.n_layer):
            layer = block(cfg, i, self.dtype, self.wkv_impl, self.precision, self.mix_dtype, name=f"blocks_{i}")
            x, x_att, x_ffn, wkv_state = layer(
                x, state.x_att[i], state.x_ffn[i], WKVState(state.aa[i], state.bb[i], state.pp[i]),
                lengths,
            )
            new.append((x_att, x_ffn, *wkv_state))
        x = _layer_norm("ln_out")(x)
        logits = _head(x, cfg.vocab_size, self.head_multiple, self.dtype, self.precision)
        new_state = State(*(jnp.stack(field).astype(jnp.float32) for field in zip(*new)))
        return logits.astype(jnp.float32), new_state


def rnn_scan(module: RWKV, params, tokens: jax.Array, state: State) -> Tuple[jax.Array, State]:
    """RNN mode: `lax.scan` of the T = 1 step over tokens [B, T] -> (logits [B, T, V], state)."""

    def step(state, token):  # token [B]
        logits, state = module.apply({"params": params}, token[:, None], state)
        return state, logits[:, 0]

    state, logits = jax.lax.scan(step, state, tokens.swapaxes(0, 1))
    return logits.swapaxes(0, 1), state
