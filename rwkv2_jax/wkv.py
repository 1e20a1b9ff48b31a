"""The WKV operator of RWKV-v2 in plain JAX: O(T) time and memory, any length, no overflow.

Per channel, with k_t = exp(min(K_t, k_clamp)), u = exp(time_first) and
d = exp(-exp(time_decay)) (spec, "The network"):

    num_t = u*k_t*v_t + sum_{i<t} d^(t-1-i) * k_i*v_i
    den_t = u*k_t     + sum_{i<t} d^(t-1-i) * k_i     + k_eps
    out_t = num_t / den_t

We carry the two sums as a recurrence (RNN mode of the spec) instead of the
original O(T^2) convolution, and store them scaled by exp(-pp), where pp is a
running maximum exponent (as RWKV-4 later did):

    A_t = aa_t * exp(pp_t),  B_t = bb_t * exp(pp_t)

Every exp() below takes a difference against the current maximum, so it is <= 1
and nothing overflows for any K and any T, with or without the clamp. k_eps is
treated as one more term of the denominator, with exponent log(k_eps), so it is
scaled by the same exp(-p) and the function is unchanged.

This file is the reference that `pallas_kernels.wkv` is tested against, and the
WKV used by GPT mode on CPU.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

# Exponent of an empty sum. Finite (not -inf) so that no inf - inf appears in gradients.
EMPTY_EXP = -1e38


class WKVState(NamedTuple):
    """The WKV part of one layer's RNN state, each [B, C] float32.

    The true accumulators of the spec are aa * exp(pp) and bb * exp(pp):
      aa * exp(pp) = sum_{i<=t} d^(t-i) k_i v_i,   bb * exp(pp) = sum_{i<=t} d^(t-i) k_i.
    """

    aa: jax.Array
    bb: jax.Array
    pp: jax.Array

    @classmethod
    def zeros(cls, batch_size: int, n_embd: int) -> "WKVState":
        """The state at the start of a sequence (all sums empty)."""
        zeros = jnp.zeros((batch_size, n_embd), jnp.float32)
        return cls(zeros, zeros, jnp.full((batch_size, n_embd), EMPTY_EXP, jnp.float32))

    def unscaled(self) -> Tuple[jax.Array, jax.Array]:
        """(aa, bb) of the spec's RNN mode; overflows to inf where pp > ~88 (float32)."""
        scale = jnp.exp(self.pp)
        return self.aa * scale, self.bb * scale


def _log_eps(k_eps: float) -> Optional[float]:
    return math.log(k_eps) if k_eps > 0 else None


def wkv_step(
    state: WKVState,
    k: jax.Array,  # [B, C] K of this token, before exp, already clamped
    v: jax.Array,  # [B, C]
    w_log: jax.Array,  # [C] log d = -exp(time_decay)
    u_log: jax.Array,  # [C] log u = time_first
    log_eps: Optional[float],
) -> Tuple[WKVState, jax.Array]:
    """One token of the recurrence: (state before, token) -> (state after, out [B, C])."""
    aa, bb, pp = state
    # Output: the state's sums plus the current token weighted by u.
    ww = u_log + k
    p = jnp.maximum(pp, ww)
    if log_eps is not None:
        p = jnp.maximum(p, log_eps)
    e1 = jnp.exp(pp - p)
    e2 = jnp.exp(ww - p)
    num = e1 * aa + e2 * v
    den = e1 * bb + e2
    if log_eps is not None:
        den = den + jnp.exp(log_eps - p)
    out = num / den
    # Update: decay the sums by d, add the current token with weight 1.
    pd = pp + w_log
    p2 = jnp.maximum(pd, k)
    e1 = jnp.exp(pd - p2)
    e2 = jnp.exp(k - p2)
    return WKVState(e1 * aa + e2 * v, e1 * bb + e2, p2), out


def wkv_with_state(
    k: jax.Array,  # [B, T, C] K before exp
    v: jax.Array,  # [B, T, C]
    time_decay: jax.Array,  # [C] raw parameter: d = exp(-exp(time_decay))
    time_first: jax.Array,  # [C] raw parameter: u = exp(time_first)
    state: Optional[WKVState] = None,
    *,
    k_clamp: Optional[float] = 60.0,
    k_eps: float = 1e-9,
    lengths: Optional[jax.Array] = None,
) -> Tuple[jax.Array, WKVState]:
    """WKV over a sequence, starting from `state` (None: start of sequence).

    Returns (out [B, T, C] float32, state after the last token). Differentiable
    (JAX autodiff through the scan); the gradient of K is zero where the clamp cuts.
    `lengths` [B] (optional): row b is right-padded after lengths[b] tokens; its
    state is the one after token lengths[b] - 1 (outputs at padded steps are junk).
    """
    B, T, C = k.shape
    if v.shape != k.shape:
        raise ValueError(f"wkv: k and v must have the same shape, got {k.shape=} {v.shape=}")
    if time_decay.shape != (C,) or time_first.shape != (C,):
        raise ValueError(
            f"wkv: time_decay and time_first must be [C={C}], got "
            f"{time_decay.shape=} {time_first.shape=}"
        )
    k = k.astype(jnp.float32)
    v = v.astype(jnp.float32)
    if k_clamp is not None:
        k = jnp.minimum(k, k_clamp)
    w_log = -jnp.exp(time_decay.astype(jnp.float32))
    u_log = time_first.astype(jnp.float32)
    log_eps = _log_eps(k_eps)
    if state is None:
        state = WKVState.zeros(B, C)

    def body(carry, kv):
        return wkv_step(carry, kv[0], kv[1], w_log, u_log, log_eps)

    def masked_body(carry, kvt):
        k_t, v_t, t = kvt
        new, out = wkv_step(carry, k_t, v_t, w_log, u_log, log_eps)
        valid = (t < lengths)[:, None]  # [B, 1]: padded steps keep the state
        return WKVState(*(jnp.where(valid, n, c) for n, c in zip(new, carry))), out

    # Scan over time: [B, T, C] -> [T, B, C].
    xs = (k.swapaxes(0, 1), v.swapaxes(0, 1))
    if lengths is None:
        state, out = jax.lax.scan(body, state, xs)
    else:
        state, out = jax.lax.scan(masked_body, state, xs + (jnp.arange(T),))
    return out.swapaxes(0, 1), state


def wkv_reference(
    k: jax.Array,
    v: jax.Array,
    time_decay: jax.Array,
    time_first: jax.Array,
    *,
    k_clamp: Optional[float] = 60.0,
    k_eps: float = 1e-9,
) -> jax.Array:
    """out [B, T, C] = num / den of the spec, from the start of a sequence."""
    out, _ = wkv_with_state(k, v, time_decay, time_first, k_clamp=k_clamp, k_eps=k_eps)
    return out


def wkv_convolution(
    k: jax.Array,
    v: jax.Array,
    time_decay: jax.Array,
    time_first: jax.Array,
    *,
    k_clamp: Optional[float] = 60.0,
    k_eps: float = 1e-9,
) -> jax.Array:
    """The original O(T^2) form: a causal convolution with lag weights u, 1, d, d^2, ...

    Memory and time grow with T^2 and exp(K) overflows float32 without the clamp;
    kept only as a second reference and for benchmarks.
    """
    B, T, C = k.shape
    kf = k.astype(jnp.float32)
    if k_clamp is not None:
        kf = jnp.minimum(kf, k_clamp)
    ek = jnp.exp(kf)  # [B, T, C]
    ekv = ek * v.astype(jnp.float32)
    w_log = -jnp.exp(time_decay.astype(jnp.float32))  # [C]
    lag = jnp.arange(T)[:, None] - jnp.arange(T)[None, :]  # [T, T] t - i
    weights = jnp.where(
        lag[..., None] >= 1,
        jnp.exp(jnp.maximum(lag[..., None] - 1, 0) * w_log),
        0.0,
    )  # [T, T, C]
    weights = jnp.where((lag == 0)[..., None], jnp.exp(time_first.astype(jnp.float32)), weights)
    num = jnp.einsum("tic,bic->btc", weights, ekv)
    den = jnp.einsum("tic,bic->btc", weights, ek) + k_eps
    return num / den
