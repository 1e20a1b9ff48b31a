"""Sampling on the device (rwkv2_jax.generation.sampling): the draw follows top-p/top-k/temperature
as ChatRWKV defines them, and the sort-free cutoff search equals ChatRWKV's sorted cumulative sum."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from rwkv2_jax.generation.sampling import SamplingParams, draw, inverse_cdf_draw, largest_threshold


def test_draw_matches_top_p_top_k_temperature():
    """Many draws from one distribution: the support is ChatRWKV's nucleus, frequencies follow p^(1/T)."""
    probs = np.array([0.02, 0.30, 0.05, 0.25, 0.18, 0.20])
    logits = jnp.log(jnp.asarray(probs, jnp.float32))
    N = 20000
    keys = jax.random.split(jax.random.key(0), N)

    def freq(**kw):
        p = SamplingParams(ban_tokens=(), **kw)
        tokens = draw(jnp.broadcast_to(logits, (N, probs.size)), keys, p.knobs(), p.static())
        return np.bincount(np.asarray(tokens), minlength=probs.size) / N

    # top_p=0.7: sorted 0.30, 0.25, 0.20 (cumsum 0.75 >= 0.7) -> keep {1, 3, 5}
    f = freq(top_p=0.7)
    assert set(np.flatnonzero(f)) == {1, 3, 5}
    np.testing.assert_allclose(f[[1, 3, 5]], probs[[1, 3, 5]] / 0.75, atol=0.015)
    f = freq(top_k=2, temperature=0.5)
    want = probs[[1, 3]] ** 2 / (probs[[1, 3]] ** 2).sum()
    assert set(np.flatnonzero(f)) == {1, 3}
    np.testing.assert_allclose(f[[1, 3]], want, atol=0.015)
    f = freq(temperature=2.0)
    np.testing.assert_allclose(f, probs**0.5 / (probs**0.5).sum(), atol=0.015)


def test_inverse_cdf_draw_follows_the_weights_and_never_draws_a_zero(rng):
    """The draw (one uniform number per row): frequencies follow softmax(scaled) over a large
    vocabulary, -inf tokens are never drawn, wherever they sit (first, last, runs)."""
    V, N = 300, 40000
    scaled = rng.normal(size=V) * 1.5 - 20.0  # an arbitrary constant: the draw normalises
    scaled[[0, 1, 57, 58, 59, V - 1]] = -np.inf
    keys = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), N)
    tokens = np.asarray(jax.jit(inverse_cdf_draw)(keys, jnp.broadcast_to(jnp.asarray(scaled, jnp.float32), (N, V))))
    assert tokens.dtype == np.int32
    p = np.exp(scaled - scaled[np.isfinite(scaled)].max())
    p /= p.sum()
    f = np.bincount(tokens, minlength=V) / N
    assert f[~np.isfinite(scaled)].sum() == 0
    np.testing.assert_allclose(f, p, atol=5 * np.sqrt(p.max() / N))  # 5 sigma of the largest
    # the totals of a few blocks of tokens, a sharper test of the cumulative sum's position
    blocks = np.arange(V) // 30
    np.testing.assert_allclose(np.bincount(blocks, f), np.bincount(blocks, p), atol=0.012)
    # a single allowed token, at either end, is always the one drawn
    for only in (0, V - 1):
        row = np.full(V, -np.inf, np.float32)
        row[only] = 3.0
        assert set(np.asarray(inverse_cdf_draw(keys[:500], jnp.broadcast_to(row, (500, V)))).tolist()) == {only}


def test_cutoffs_equal_chatrwkvs_sorted_cumsum(rng):
    """The sort-free cutoff search gives ChatRWKV's top-p cutoff and the k-th largest probability."""
    B, V = 64, 150
    logits = rng.normal(size=(B, V)) * rng.uniform(0.1, 8, size=(B, 1))
    logits[::3] = np.round(logits[::3])  # ties
    logits[1::2, : V // 4] = -np.inf  # banned tokens
    p = np.exp(logits - logits.max(1, keepdims=True))
    p = (p / p.sum(1, keepdims=True)).astype(np.float32)
    top_p = rng.uniform(0.01, 0.99, B).astype(np.float32)
    k = rng.integers(1, V + 1, B)
    for radix_bits in (1, 4):  # CPU's and accelerators' search
        search = jax.jit(functools.partial(largest_threshold, radix_bits=radix_bits))
        cut_p = np.asarray(search(p, p, top_p))[:, 0]
        cut_k = np.asarray(search(p, np.ones_like(p), k.astype(np.float32)))[:, 0]
        for b in range(B):
            desc = np.sort(p[b])[::-1]
            cumulative = np.cumsum(desc)
            first = np.argmax(cumulative >= top_p[b])
            assert cut_k[b] == desc[k[b] - 1]
            if abs(cumulative[first] - top_p[b]) > 1e-6:  # away from float-rounding ties of the sum
                assert cut_p[b] == desc[first], (radix_bits, b)
