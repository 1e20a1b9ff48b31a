"""Self-tests of the independent PyTorch RWKV-v2 reference and the release-checkpoint generator.

The reference is the oracle for the JAX port, so it is checked here against itself (GPT mode
vs RNN mode, one pass vs continued state), against a naive double loop written directly from
the spec's num/den formula, and against finite differences; the generator is checked against
the spec's key/shape table and for producing models where k_clamp and k_eps matter.
"""

import math

import numpy as np
import pytest
import torch

from rwkv2_jax.testing.release_checkpoint import make_release_state_dict, write_release_checkpoint
from rwkv2_jax.testing.torch_reference import TorchRWKV2, wkv_num_den

F64 = torch.float64


def spec_shapes(L: int, C: int, V: int, ffn_pre: bool) -> dict[str, tuple[int, ...]]:
    """The spec's key/shape table, written out independently of the generator."""
    s = {"emb.weight": (V, C), "ln_out.weight": (C,), "ln_out.bias": (C,), "head.weight": (V, C)}
    for i in range(L):
        b = f"blocks.{i}."
        for n in ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias"):
            s[b + n] = (C,)
        mixes = ["ffn"]
        if ffn_pre and i == 0:
            mixes.append("ffnPre")
        else:
            s[b + "att.time_decay"] = (C, 1)
            s[b + "att.time_first"] = (C, 1)
            s[b + "att.time_mix"] = (1, 1, C)
            for n in ("key", "value", "receptance", "output"):
                s[b + f"att.{n}.weight"] = (C, C)
        for m in mixes:
            s[b + f"{m}.time_mix"] = (1, 1, C)
            s[b + f"{m}.key.weight"] = (4 * C, C)
            s[b + f"{m}.receptance.weight"] = (C, C)
            s[b + f"{m}.value.weight"] = (C, 4 * C)
    return s


def random_tokens(rng: np.random.Generator, B: int, T: int, V: int) -> torch.Tensor:
    return torch.as_tensor(rng.integers(0, V, (B, T)))


def model(ffn_pre=False, dtype=F64, k_eps=1e-9, seed=0, **kw) -> TorchRWKV2:
    sd = make_release_state_dict(seed=seed, ffn_pre=ffn_pre, dtype=F64, **kw)
    return TorchRWKV2(sd, k_eps=k_eps, dtype=dtype)


VARIANTS = pytest.mark.parametrize("ffn_pre", [False, True], ids=["plain", "ffnPre"])


# ---------------------------------------------------------------------------------------
# Generator
# ---------------------------------------------------------------------------------------


@VARIANTS
@pytest.mark.parametrize("L,C,V", [(2, 16, 53), (3, 24, 67), (1, 8, 11)])
def test_state_dict_keys_and_shapes(ffn_pre, L, C, V):
    sd = make_release_state_dict(L, C, V, seed=3, ffn_pre=ffn_pre)
    want = spec_shapes(L, C, V, ffn_pre)
    assert set(sd) == set(want)
    for k, t in sd.items():
        assert isinstance(t, torch.Tensor) and t.dtype == torch.float32, k
        assert tuple(t.shape) == want[k], k
        assert torch.isfinite(t).all(), k
    assert not any("ln0" in k or "time_mix_" in k for k in sd)
    m = TorchRWKV2(sd, k_eps=1e-9)
    assert (m.n_layer, m.n_embd, m.vocab_size, m.ffn_pre) == (L, C, V, ffn_pre)


def test_generator_deterministic_values_and_ranges():
    a = make_release_state_dict(seed=5)
    b = make_release_state_dict(seed=5)
    c = make_release_state_dict(seed=6)
    a64 = make_release_state_dict(seed=5, dtype=F64)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert a64["head.weight"].dtype == F64
    assert all(torch.equal(a[k], a64[k].float()) for k in a)
    for i in range(2):
        d = torch.exp(-torch.exp(a64[f"blocks.{i}.att.time_decay"]))
        assert 0.049 < d.min() < 0.06 and 0.99 < d.max() < 0.9991
        tf = a64[f"blocks.{i}.att.time_first"]
        assert (tf - math.log(0.3)).abs().max() <= 1.0
        for mix in ("att", "ffn"):
            tm = a64[f"blocks.{i}.{mix}.time_mix"]
            assert 0 <= tm.min() and tm.max() <= 1


def test_write_release_checkpoint_roundtrip(tmp_path):
    sd = make_release_state_dict(ffn_pre=True)
    path = write_release_checkpoint(tmp_path / "x.pth", sd)
    loaded = torch.load(path, map_location="cpu", weights_only=True)
    assert type(loaded) is dict and list(loaded) == list(sd)
    assert all(torch.equal(loaded[k], sd[k]) for k in sd)


@pytest.mark.parametrize(
    "ffn_pre,model_seed,kw",
    [(False, 0, {}), (True, 0, {}), (False, 1, dict(n_layer=3, n_embd=24, vocab_size=67)),
     (True, 2, dict(n_layer=3, n_embd=24, vocab_size=67))],
)
def test_generated_models_exercise_clamp_and_eps(rng, ffn_pre, model_seed, kw):
    m9 = model(ffn_pre, k_eps=1e-9, seed=model_seed, **kw)
    tokens = random_tokens(rng, 2, 40, m9.vocab_size)
    K = torch.cat([k.reshape(-1) for k in m9.attention_keys(tokens)])
    assert K.max() > 60, f"max K {K.max():.1f}: the clamp is never active"
    assert K.min() < -30, f"min K {K.min():.1f}"
    logits9 = m9.forward(tokens)
    m8 = model(ffn_pre, k_eps=1e-8, seed=model_seed, **kw)
    assert (m8.forward(tokens) - logits9).abs().max() > 1e-4, "k_eps does not matter"
    unclamped = TorchRWKV2(m9.params, k_eps=1e-9, k_clamp=None, dtype=F64)
    assert (unclamped.forward(tokens) - logits9).abs().max() > 1e-4, "k_clamp does not matter"
    # ... and the logits stay O(1..10)
    assert 0.3 < logits9.std() < 10 and logits9.abs().max() < 30


# ---------------------------------------------------------------------------------------
# WKV: the O(T^2) convolution against a naive double loop from the formula
# ---------------------------------------------------------------------------------------


def naive_wkv(K, V, time_first, time_decay, k_eps, k_clamp):
    """num_t/den_t directly from the spec, python loops, float64.  K, V: [B, T, C]."""
    B, T, C = K.shape
    out = np.zeros((B, T, C))
    for b in range(B):
        for c in range(C):
            u = math.exp(time_first[c])
            d = math.exp(-math.exp(time_decay[c]))
            k = [math.exp(min(K[b, t, c], k_clamp)) for t in range(T)]
            for t in range(T):
                num = u * k[t] * V[b, t, c]
                den = u * k[t] + k_eps
                for i in range(t):
                    num += d ** (t - 1 - i) * k[i] * V[b, i, c]
                    den += d ** (t - 1 - i) * k[i]
                out[b, t, c] = num / den
    return out


def test_convolution_matches_naive_double_loop(rng):
    B, T, C = 2, 9, 5
    K = torch.as_tensor(rng.normal(0, 40, (B, T, C)))
    K[0, 2, 1], K[1, 6, 3] = 75.0, -45.0  # at least one above the clamp and one << 0
    V = torch.as_tensor(rng.normal(0, 1, (B, T, C)))
    tf = torch.as_tensor(math.log(0.3) + rng.uniform(-1, 1, C))
    td = torch.linspace(math.log(-math.log(0.999)), math.log(-math.log(0.05)), C, dtype=F64)
    for k_eps in (1e-9, 1e-8):
        num, den = wkv_num_den(K, V, tf, td, k_eps=k_eps, k_clamp=60.0)
        want = naive_wkv(K.numpy(), V.numpy(), tf.tolist(), td.tolist(), k_eps, 60.0)
        np.testing.assert_allclose((num / den).numpy(), want, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------
# GPT mode vs RNN mode
# ---------------------------------------------------------------------------------------


@VARIANTS
@pytest.mark.parametrize("T", [1, 50])
def test_gpt_equals_rnn_float64(rng, ffn_pre, T):
    m = model(ffn_pre, dtype=F64)
    tokens = random_tokens(rng, 2, T, m.vocab_size)
    gpt = m.forward(tokens)
    rnn, state = m.rnn(tokens)
    assert gpt.shape == (2, T, m.vocab_size) and gpt.dtype == F64
    assert rnn.shape == gpt.shape and rnn.dtype == F64
    assert len(state) == m.n_layer and all(len(s) == 4 for s in state)
    torch.testing.assert_close(rnn, gpt, rtol=1e-10, atol=1e-10)


@VARIANTS
@pytest.mark.parametrize("T", [1, 50])
def test_gpt_equals_rnn_float32(rng, ffn_pre, T):
    m64 = model(ffn_pre, dtype=F64)
    m32 = model(ffn_pre, dtype=torch.float32)
    tokens = random_tokens(rng, 2, T, m32.vocab_size).numpy()  # numpy input works too
    gpt = m32.forward(tokens)
    rnn, _ = m32.rnn(tokens)
    assert gpt.dtype == torch.float32 and rnn.dtype == torch.float32
    torch.testing.assert_close(rnn, gpt, rtol=0, atol=1e-4)
    torch.testing.assert_close(gpt.double(), m64.forward(tokens), rtol=0, atol=1e-4)


@pytest.mark.slow
@VARIANTS
def test_rnn_continued_from_state_equals_one_pass(rng, ffn_pre):
    m = model(ffn_pre, dtype=F64)
    tokens = random_tokens(rng, 3, 30, m.vocab_size)
    full, full_state = m.rnn(tokens)
    first, state = m.rnn(tokens[:, :17])
    saved = [tuple(s.clone() for s in layer) for layer in state]
    second, end_state = m.rnn(tokens[:, 17:], state)
    # the state passed in is not mutated
    assert all(torch.equal(a, b) for la, lb in zip(saved, state) for a, b in zip(la, lb))
    torch.testing.assert_close(torch.cat([first, second], 1), full, rtol=1e-12, atol=1e-12)
    for la, lb in zip(end_state, full_state):
        for a, b in zip(la, lb):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=0)
    # an explicit zero state is the start of a sequence
    torch.testing.assert_close(m.rnn(tokens, m.init_state(3))[0], full, rtol=0, atol=0)


def test_init_state_shapes():
    m = model(dtype=torch.float32)
    st = m.init_state(5)
    assert len(st) == m.n_layer
    for layer in st:
        assert len(layer) == 4
        for s in layer:
            assert s.shape == (5, m.n_embd) and s.dtype == torch.float32 and not s.any()


def test_rnn_state_accumulators_match_definition(rng):
    """bb_T = sum_i d^(T-1-i) k_i (unscaled, from the recorded K), for the last layer."""
    m = model(dtype=F64)
    tokens = random_tokens(rng, 1, 12, m.vocab_size)
    _, state = m.rnn(tokens)
    p, i = m.params, m.n_layer - 1
    K = m.attention_keys(tokens)[-1]  # [1, T, C] pre-clamp keys of the last layer (GPT mode)
    d = torch.exp(-torch.exp(p[f"blocks.{i}.att.time_decay"].reshape(-1)))  # [C]
    k = torch.exp(torch.clamp(K[0], max=60.0))  # [T, C]
    T = k.shape[0]
    want_bb = sum(d ** (T - 1 - t) * k[t] for t in range(T))
    torch.testing.assert_close(state[i][3][0], want_bb, rtol=1e-12, atol=0)


def test_long_sequence_beyond_ctx_len(rng):
    """No ctx_len cap: GPT mode runs for T > 768 and matches RNN mode at the end."""
    m = model(n_layer=1, n_embd=8, vocab_size=11, dtype=F64)
    tokens = random_tokens(rng, 1, 800, m.vocab_size)
    gpt = m.forward(tokens)
    rnn, _ = m.rnn(tokens)
    assert gpt.shape == (1, 800, 11) and torch.isfinite(gpt).all()
    torch.testing.assert_close(rnn, gpt, rtol=1e-9, atol=1e-9)


# ---------------------------------------------------------------------------------------
# Loss and gradients
# ---------------------------------------------------------------------------------------


def test_loss_is_mean_cross_entropy(rng):
    m = model(dtype=F64)
    tokens = random_tokens(rng, 2, 10, m.vocab_size)
    targets = random_tokens(rng, 2, 10, m.vocab_size)
    logits = m.forward(tokens).numpy().reshape(-1, m.vocab_size)
    t = targets.numpy().reshape(-1)
    mx = logits.max(-1, keepdims=True)
    logz = (mx + np.log(np.exp(logits - mx).sum(-1, keepdims=True)))[:, 0]
    want = float(np.mean(logz - logits[np.arange(t.size), t]))
    assert float(m.loss(tokens, targets)) == pytest.approx(want, rel=1e-12)
    loss, _ = m.loss_and_grad(tokens, targets)
    assert isinstance(loss, float) and loss == pytest.approx(want, rel=1e-12)


@pytest.mark.slow
@VARIANTS
def test_loss_and_grad_keys_shapes_and_finite_difference(rng, ffn_pre):
    sd = make_release_state_dict(seed=4, ffn_pre=ffn_pre, dtype=F64)
    m = TorchRWKV2(sd, k_eps=1e-9, dtype=F64)
    tokens = random_tokens(rng, 2, 12, m.vocab_size)
    targets = random_tokens(rng, 2, 12, m.vocab_size)
    loss, grads = m.loss_and_grad(tokens, targets)
    assert set(grads) == set(sd)
    for k, g in grads.items():
        assert isinstance(g, np.ndarray) and g.shape == tuple(sd[k].shape), k
        assert np.isfinite(g).all(), k
    last = f"blocks.{m.n_layer - 1}."
    keys = [last + "att.time_decay", last + "att.time_first", last + "att.time_mix", last + "att.key.weight",
            "blocks.0.ffnPre.value.weight" if ffn_pre else "blocks.0.att.output.weight",
            "blocks.0.ffn.key.weight", "emb.weight", "head.weight"]
    h = 1e-6
    for key in keys:
        def loss_at(idx, delta):
            p = {k: v.clone() for k, v in sd.items()}
            p[key][idx] += delta
            return float(TorchRWKV2(p, k_eps=1e-9, dtype=F64).loss(tokens, targets))

        g = grads[key]
        # The most sensitive entry (many entries only feed clamped or negligible k, or unused
        # token rows, and have a zero gradient) and one entry at random.
        top = np.unravel_index(np.abs(g).argmax(), g.shape)
        assert abs(g[top]) > 1e-8, f"{key}: zero gradient"
        for idx in (top, tuple(int(rng.integers(n)) for n in g.shape)):
            fd = (loss_at(idx, h) - loss_at(idx, -h)) / (2 * h)
            assert g[idx] == pytest.approx(fd, rel=1e-5, abs=1e-8), f"{key}{idx}"
    # loss_and_grad does not change the model's parameters
    assert all(torch.equal(m.params[k], sd[k]) for k in sd)
    assert loss == pytest.approx(float(m.loss(tokens, targets)), rel=1e-14)
