"""The plain-JAX WKV reference (pallas_kernels.wkv) against a float64 numpy loop written from the spec."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.wkv import WKVState, wkv_convolution, wkv_reference
from pallas_kernels.wkv import wkv_with_state_reference as wkv_with_state


def numpy_wkv(k, v, time_decay, time_first, k_clamp=60.0, k_eps=1e-9):
    """num/den of the spec, float64, directly from the definition (O(T^2))."""
    k, v = np.asarray(k, np.float64), np.asarray(v, np.float64)
    B, T, C = k.shape
    if k_clamp is not None:
        k = np.minimum(k, k_clamp)
    ek = np.exp(k)
    u = np.exp(np.asarray(time_first, np.float64))
    d = np.exp(-np.exp(np.asarray(time_decay, np.float64)))
    out = np.zeros((B, T, C))
    for t in range(T):
        num = u * ek[:, t] * v[:, t]
        den = u * ek[:, t] + k_eps
        for i in range(t):
            w = d ** (t - 1 - i)
            num = num + w * ek[:, i] * v[:, i]
            den = den + w * ek[:, i]
        out[:, t] = num / den
    return out


def random_inputs(seed, B, T, C, k_scale=5.0):
    rng = np.random.default_rng(seed)
    k = rng.normal(0, k_scale, (B, T, C)).astype(np.float32)
    v = rng.normal(0, 1, (B, T, C)).astype(np.float32)
    time_decay = rng.uniform(-3, 1.5, C).astype(np.float32)
    time_first = rng.normal(math.log(0.3), 1, C).astype(np.float32)
    return k, v, time_decay, time_first


@pytest.mark.parametrize("B,T,C", [(1, 1, 3), (2, 3, 5), (3, 17, 7)])
@pytest.mark.parametrize("k_eps", [1e-9, 1e-8])
def test_matches_float64_loop(seed, B, T, C, k_eps):
    k, v, td, tf = random_inputs(seed, B, T, C, k_scale=40.0)  # some K > 60, some << 0
    want = numpy_wkv(k, v, td, tf, k_eps=k_eps)
    # out is a weighted average of v; float32 exponents near the clamp (|K - pp| ~ 60) and
    # the running decay carry ~1e-5 relative error into each weight, so the error scales
    # with the same average of |v| (cancellation in v), not with out itself.
    scale = numpy_wkv(k, np.abs(v), td, tf, k_eps=k_eps)
    got = np.asarray(wkv_reference(k, v, td, tf, k_eps=k_eps))
    assert np.all(np.abs(got - want) <= 1e-4 * scale + 2e-6), np.max(np.abs(got - want) / scale)
    conv = np.asarray(wkv_convolution(k, v, td, tf, k_eps=k_eps))
    assert np.all(np.abs(conv - want) <= 5e-4 * scale + 1e-5), np.max(np.abs(conv - want) / scale)


def test_eps_matters_where_k_is_small(seed):
    k, v, td, tf = random_inputs(seed, 1, 9, 4)
    k = k - 30.0  # e^-30 ≈ 1e-13 << k_eps
    a = wkv_reference(k, v, td, tf, k_eps=1e-9)
    b = wkv_reference(k, v, td, tf, k_eps=1e-8)
    np.testing.assert_allclose(a, numpy_wkv(k, v, td, tf, k_eps=1e-9), rtol=1e-4, atol=1e-7)
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3


def test_state_chains_and_matches_unscaled_sums(seed):
    k, v, td, tf = random_inputs(seed, 2, 23, 6)
    full, state = wkv_with_state(k, v, td, tf)
    split = 1 + seed % 21
    first, s1 = wkv_with_state(k[:, :split], v[:, :split], td, tf)
    second, s2 = wkv_with_state(k[:, split:], v[:, split:], td, tf, s1)
    np.testing.assert_allclose(jnp.concatenate([first, second], 1), full, rtol=1e-5, atol=1e-6)
    # aa * exp(pp) = sum_i d^(T-1-i) e^k_i v_i (spec, prefill builds the RNN state)
    kk = np.minimum(k.astype(np.float64), 60.0)
    d = np.exp(-np.exp(td.astype(np.float64)))
    lag = (k.shape[1] - 1 - np.arange(k.shape[1]))[None, :, None]
    want_aa = np.sum(d**lag * np.exp(kk) * v, axis=1)
    want_bb = np.sum(d**lag * np.exp(kk), axis=1)
    aa, bb = state.unscaled()
    # aa sums terms of both signs (v): its float32 error scales with the sum of |terms|
    # (seed 1941050026: 3.7737 vs 3.7732 out of terms of ~1e3); bb's terms are all positive.
    # Both share exp(pp), and pp carries the rounding of every decay step: 1.6e-5 relative
    # in aa and in bb was the largest in 401 seeds.
    scale = np.sum(d**lag * np.exp(kk) * np.abs(v), axis=1)
    assert np.all(np.abs(aa - want_aa) <= 5e-5 * scale), np.max(np.abs(aa - want_aa) / scale)
    np.testing.assert_allclose(bb, want_bb, rtol=1e-4)
    for x, y in zip(s2, state):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_no_clamp_huge_k_long_sequence_stays_finite():
    rng = np.random.default_rng(0)
    T, C = 65536, 4
    k = jnp.asarray(rng.uniform(-1e4, 1e4, (1, T, C)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(1, T, C)), jnp.float32)
    td = jnp.zeros(C)
    tf = jnp.zeros(C)
    out, state = jax.jit(lambda k, v: wkv_with_state(k, v, td, tf, k_clamp=None))(k, v)
    assert bool(jnp.all(jnp.isfinite(out))) and all(bool(jnp.all(jnp.isfinite(s))) for s in state)
    # where one K dominates everything so far, out is that token's v (or the running max's)
    assert float(jnp.max(jnp.abs(out))) <= float(jnp.max(jnp.abs(v))) + 1e-5


def test_no_clamp_matches_float64_when_representable(seed):
    k, v, td, tf = random_inputs(seed, 2, 11, 5, k_scale=200.0)
    k = np.clip(k, -600, 600)  # float64 exp stays finite
    want = numpy_wkv(k, v, td, tf, k_clamp=None)
    got = wkv_reference(k, v, td, tf, k_clamp=None)
    # Exponents up to 600 carry float32 rounding of ~600 * 6e-8 = 4e-5 each, so the weights of
    # the average of v (|v| ~ 1) are off by that much: an absolute, not relative, error scale
    # (seed 2051542557 gave 1.7e-5 on an output of 0.057).
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_gradients_finite_and_clamp_cuts_k_gradient(seed):
    k, v, td, tf = random_inputs(seed, 2, 13, 5, k_scale=60.0)
    grads = jax.grad(lambda *a: jnp.sum(wkv_reference(*a) ** 2), argnums=(0, 1, 2, 3))(k, v, td, tf)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    assert np.all(np.asarray(grads[0])[k > 60.0] == 0.0)
    grads_none = jax.grad(lambda k: jnp.sum(wkv_reference(k * 100, v, td, tf, k_clamp=None) ** 2))(k)
    assert bool(jnp.all(jnp.isfinite(grads_none)))


def test_zero_state_is_start_of_sequence(seed):
    k, v, td, tf = random_inputs(seed, 2, 5, 3)
    a, _ = wkv_with_state(k, v, td, tf, WKVState.zeros(2, 3))
    b = wkv_reference(k, v, td, tf)
    np.testing.assert_array_equal(a, b)
