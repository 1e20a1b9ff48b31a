"""The notebook API: token validation, state handling, GPT ≡ RNN ≡ prefill, init, sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rwkv2_jax as rw
from rwkv2_jax.generation.generator import stream
from rwkv2_jax.generation.sampling import ban_mask, sample_logits


@pytest.fixture(scope="module")
def model(release_files):
    return rw.load_torch(release_files["plain"], verbose=False)


def test_token_ids_out_of_range_raise_naming_the_id(model):
    V = model.config.vocab_size
    with pytest.raises(ValueError, match=rf"token id {V} at position \[1, 2\] is outside \[0, {V}\)"):
        model(np.array([[1, 2, 3], [4, 5, V]]))
    with pytest.raises(ValueError, match=r"token id -1 at position 0"):
        model.rnn([-1, 2])
    with pytest.raises(ValueError, match="token id 99999"):
        model.prefill([[3, 99999]])
    with pytest.raises(ValueError, match="integer ids"):
        model(np.array([[1.5, 2.0]]))
    with pytest.raises(ValueError, match="empty"):
        model(np.zeros((1, 0), np.int32))
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        model(np.zeros((1, 2, 3), np.int32))


def test_one_dimensional_tokens(model, rng):
    t = rng.integers(0, model.config.vocab_size, 9)
    np.testing.assert_array_equal(model(t), model(t[None])[0])


def test_state_shape_checked(model):
    with pytest.raises(ValueError, match=r"state has shape \[3, 2, 24\].*expected \[3, 1, 24\]"):
        model.rnn([[1, 2]], state=model.init_state(2))
    with pytest.raises(ValueError, match="batch_size"):
        model.init_state(0)


@pytest.mark.slow
def test_gpt_rnn_prefill_agree_at_random_splits(model, rng):
    V = model.config.vocab_size
    tokens = rng.integers(0, V, (2, 31))
    gpt = model(tokens)
    rnn, rnn_state = model.rnn(tokens)
    np.testing.assert_allclose(rnn, gpt, atol=1e-4, rtol=0)
    for split in rng.integers(1, 31, 1):  # one split a run (each split compiles four programs)
        head, state = model.prefill(tokens[:, :split])
        tail, state = model.rnn(tokens[:, split:], state)
        np.testing.assert_allclose(head, gpt[:, :split], atol=1e-4, rtol=0)
        np.testing.assert_allclose(tail, gpt[:, split:], atol=1e-4, rtol=0)
        for a, b in zip(state, rnn_state):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
        # chunked prefill: GPT mode continued from a state
        tail_gpt, _ = model.prefill(tokens[:, split:], state=model.prefill(tokens[:, :split])[1])
        np.testing.assert_allclose(tail_gpt, gpt[:, split:], atol=1e-4, rtol=0)


@pytest.mark.slow
def test_padded_prefill_equals_row_by_row(model, rng):
    V = model.config.vocab_size
    lengths = [5, 12, 1]
    rows = [rng.integers(0, V, n) for n in lengths]
    padded = np.zeros((3, 12), np.int32)
    for b, row in enumerate(rows):
        padded[b, : len(row)] = row
    logits, state = model.prefill(padded, lengths=lengths)
    for b, row in enumerate(rows):
        want_logits, want_state = model.prefill(row[None])
        np.testing.assert_allclose(logits[b, : len(row)], want_logits[0], atol=1e-5, rtol=0)
        for got, want in zip(state, want_state):
            np.testing.assert_allclose(got[:, b], want[:, 0], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="lengths must be in"):
        model.prefill(padded, lengths=[0, 3, 3])
    with pytest.raises(ValueError, match="one per row"):
        model.prefill(padded, lengths=[3, 3])


def test_batch_rows_are_independent(model, rng):
    tokens = rng.integers(0, model.config.vocab_size, (3, 12))
    full = model(tokens)
    for b in range(3):
        np.testing.assert_allclose(model(tokens[b : b + 1])[0], full[b], atol=1e-5, rtol=0)


def test_replace_changes_config_not_params(model, rng):
    tokens = rng.integers(0, model.config.vocab_size, (1, 20))
    other = model.replace(k_eps=1e-8)
    assert other.config.k_eps == 1e-8
    assert all(a is b for a, b in zip(jax.tree.leaves(other.params), jax.tree.leaves(model.params)))
    with pytest.raises(ValueError, match="wkv_impl"):
        model.replace(wkv_impl="cuda")
    assert "L3-D24" in repr(model)
    assert np.all(np.isfinite(other(tokens)))


def test_init_follows_original_recipe():
    cfg = rw.RWKVConfig(n_layer=4, n_embd=8, vocab_size=10)
    m = rw.init(cfg, seed=0)
    p = m.params
    np.testing.assert_array_equal(p["blocks_1"]["att"]["time_mix"], [0, 0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_allclose(p["blocks_1"]["att"]["time_first"], np.log(0.3) * np.ones(8), rtol=1e-6)
    # layer 1: f1 = 3.0 + 0.5, f2 = 0.65; last layer: f1 = 1.2, f2 = 0.37
    np.testing.assert_allclose(np.asarray(p["blocks_1"]["att"]["time_decay"])[[0, -1]],
                               np.log([3.5, 3.5 * 0.65**7]), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(p["blocks_3"]["att"]["time_decay"])[[0, -1]],
                               np.log([1.2, 1.2 * 0.37**7]), rtol=1e-5)
    for name in ("key", "receptance", "output"):
        assert not np.any(p["blocks_0"]["att"][name]["kernel"])
    assert not np.any(p["blocks_0"]["ffn"]["value"]["kernel"])
    assert 0.005 < float(jnp.std(p["head"]["kernel"])) < 0.02
    assert float(jnp.std(p["emb"]["embedding"])) < 1e-4
    assert m.n_params == cfg.n_params


def test_sampling_semantics(rng):
    logits = jnp.asarray(rng.normal(size=(4, 30)), jnp.float32)
    banned = jnp.asarray(ban_mask(30, [int(jnp.argmax(logits[0]))]))
    key = jax.random.PRNGKey(0)
    greedy = sample_logits(logits, key, banned, temperature=0.0)
    top1 = sample_logits(logits, key, banned, top_k=1)
    np.testing.assert_array_equal(greedy, top1)
    assert int(greedy[0]) != int(jnp.argmax(logits[0]))  # banned
    # top_p tiny keeps only the most probable (allowed) token
    np.testing.assert_array_equal(sample_logits(logits, key, banned, top_p=1e-6), greedy)
    draws = [int(sample_logits(logits, jax.random.PRNGKey(i), banned, top_k=3)[1]) for i in range(40)]
    # top-3 among the allowed ids (the ban, row 0's argmax, is in row 1's top 3 one time in 10)
    allowed = np.where(np.asarray(banned), -np.inf, np.asarray(logits[1]))
    assert set(draws) <= set(np.argsort(allowed)[-3:].tolist())
    with pytest.raises(ValueError, match="every token id"):
        ban_mask(3, [0, 1, 2])
    with pytest.raises(ValueError, match="banned token id 7"):
        ban_mask(3, [7])


@pytest.mark.slow
def test_stream_is_reproducible_and_bans_end_of_text(model):
    a = list(stream(model, [1, 2, 3], 15, seed=3))
    b = list(stream(model, [1, 2, 3], 15, seed=3))
    assert a == b and 0 not in a and len(a) == 15
    greedy = list(stream(model, [1, 2, 3], 8, temperature=0))
    # the greedy chain is the argmax (end of text banned) of GPT mode over the growing sequence:
    # GPT mode is causal, so one call over the whole chain gives the logits after every prefix
    logits = np.array(model([[1, 2, 3] + greedy]))[0, 2:-1]  # [8, V]: after 3, 4, ..., 10 tokens
    logits[:, 0] = -np.inf
    assert greedy == np.argmax(logits, axis=-1).tolist()
