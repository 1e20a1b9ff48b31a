"""JAX vs the independent PyTorch reference (rwkv2_jax.testing.torch_reference), on release-format files.

The random checkpoints have K beyond the clamp (60) and far below 0, so the clamp and
k_eps both change the logits; every comparison is float32, max |Δlogit| <= 1e-4 (3e-4 at
T = 800, where float32 rounding of the running exponent adds up).
"""

import jax
import numpy as np
import pytest
import torch

import rwkv2_jax as rw
from rwkv2_jax.testing.release_checkpoint import make_release_state_dict, write_release_checkpoint
from rwkv2_jax.testing.torch_reference import TorchRWKV2
from tests.conftest import SMALL

ATOL = 1e-4


def torch_state_dict(path):
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("variant", ["plain", "ffn_pre"])
@pytest.mark.parametrize("k_eps", [1e-9, pytest.param(1e-8, marks=pytest.mark.slow)])
def test_gpt_and_rnn_mode_match_pytorch(release_files, rng, variant, k_eps):
    path = release_files[variant]
    model = rw.load_torch(path, k_eps=k_eps)
    ref = TorchRWKV2(torch_state_dict(path), k_eps=k_eps)
    tokens = rng.integers(0, SMALL["vocab_size"], (2, 40))
    want = ref.forward(torch.as_tensor(tokens)).numpy()
    np.testing.assert_allclose(model(tokens), want, atol=ATOL, rtol=0)
    want_rnn, ref_state = ref.rnn(torch.as_tensor(tokens))
    got_rnn, state = model.rnn(tokens)
    np.testing.assert_allclose(got_rnn, want_rnn.numpy(), atol=ATOL, rtol=0)
    # the RNN state: shift vectors directly, the WKV sums unscaled (aa * e^pp)
    for i, (x_att, x_ffn, aa, bb) in enumerate(ref_state):
        np.testing.assert_allclose(state.x_att[i], x_att.numpy(), atol=ATOL)
        np.testing.assert_allclose(state.x_ffn[i], x_ffn.numpy(), atol=ATOL)
        if variant == "ffn_pre" and i == 0:
            continue  # no time-mix in block 0: its sums stay empty
        # The sums are e^K-weighted, and K (up to the clamp, 60) carries up to ~1e-3 absolute
        # float32 error from the layers below, so each sum differs by up to ~1e-3 relative
        # between two float32 implementations (seen: 1.3e-3), and a signed aa near zero by
        # more. Compared where that error is bounded: log bb, and aa / bb, the weighted
        # average of the values that the WKV outputs.
        got_aa, got_bb = rw.WKVState(state.aa[i], state.bb[i], state.pp[i]).unscaled()
        aa, bb = aa.numpy().astype(np.float64), bb.numpy().astype(np.float64)
        np.testing.assert_allclose(np.log(np.asarray(got_bb, np.float64)), np.log(bb), atol=5e-3)
        want_avg = aa / bb
        np.testing.assert_allclose(np.asarray(got_aa, np.float64) / got_bb, want_avg,
                                   atol=1e-3 * np.abs(want_avg).max())


def test_wrong_k_eps_is_detected(release_files, rng):
    """The parity test above can fail: eps 1e-9 vs 1e-8 moves logits far beyond the tolerance."""
    path = release_files["plain"]
    tokens = rng.integers(0, SMALL["vocab_size"], (2, 40))
    got = rw.load_torch(path, k_eps=1e-9)(tokens)
    want = TorchRWKV2(torch_state_dict(path), k_eps=1e-8).forward(torch.as_tensor(tokens)).numpy()
    assert np.max(np.abs(got - want)) > 100 * ATOL


def test_single_token(release_files, rng):
    path = release_files["plain"]
    model = rw.load_torch(path, verbose=False)
    ref = TorchRWKV2(torch_state_dict(path), k_eps=1e-9)
    tokens = rng.integers(0, SMALL["vocab_size"], (3, 1))
    want = ref.forward(torch.as_tensor(tokens)).numpy()
    np.testing.assert_allclose(model(tokens), want, atol=ATOL, rtol=0)
    np.testing.assert_allclose(model.rnn(tokens)[0], want, atol=ATOL, rtol=0)


def test_longer_than_ctx_len(tmp_path, rng):
    """T = 800 > ctx_len = 768: GPT mode has no cap and agrees with the reference and RNN mode."""
    sd = make_release_state_dict(n_layer=2, n_embd=8, vocab_size=19, seed=11)
    path = write_release_checkpoint(tmp_path / "m.pth", sd)
    model = rw.load_torch(path, verbose=False)
    tokens = rng.integers(0, 19, (1, 800))
    got = model(tokens)
    want = TorchRWKV2(sd, k_eps=1e-9).forward(torch.as_tensor(tokens)).numpy()
    # The running-max exponent decays by adding log d every step; in a channel of slow decay
    # (log d ~ -1e-3 beside an exponent near the clamp, 60) float32 rounds each addition by up
    # to 2e-6, and that adds up between resets. At T = 800 the logits' error against float64
    # reached 1.4e-4 (2 seeds of 241 over 1e-4; the O(T^2) float32 reference stays at 1.2e-5).
    np.testing.assert_allclose(got, want, atol=3 * ATOL, rtol=0)
    np.testing.assert_allclose(model.rnn(tokens)[0], got, atol=ATOL, rtol=0)


@pytest.mark.slow
def test_no_clamp_matches_float64_reference(release_files, rng):
    """k_clamp=None: K up to ~200 (e^200 overflows float32); our running exponent stays exact."""
    path = release_files["plain"]
    model = rw.load_torch(path, k_clamp=None, verbose=False)
    ref = TorchRWKV2(torch_state_dict(path), k_eps=1e-9, k_clamp=None, dtype=torch.float64)
    tokens = rng.integers(0, SMALL["vocab_size"], (2, 30))
    keys = ref.attention_keys(torch.as_tensor(tokens))
    assert max(float(k.max()) for k in keys) > 90  # beyond float32's exp range
    want = ref.forward(torch.as_tensor(tokens)).numpy()
    np.testing.assert_allclose(model(tokens), want, atol=ATOL, rtol=0)
    np.testing.assert_allclose(model.rnn(tokens)[0], want, atol=ATOL, rtol=0)


@pytest.mark.slow
def test_no_clamp_huge_k_stays_finite(tmp_path, rng):
    sd = make_release_state_dict(**SMALL, seed=4, k_scale=5000.0)  # |K| in the thousands
    path = write_release_checkpoint(tmp_path / "huge.pth", sd)
    model = rw.load_torch(path, k_clamp=None, verbose=False)
    tokens = rng.integers(0, SMALL["vocab_size"], (2, 64))
    gpt = model(tokens)
    rnn, state = model.rnn(tokens)
    assert np.all(np.isfinite(gpt)) and np.all(np.isfinite(rnn))
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state))
    # float32 spacing at |K| ~ 5000 is ~5e-4, so the two modes may round K apart by that much
    np.testing.assert_allclose(rnn, gpt, atol=1e-2, rtol=0)
