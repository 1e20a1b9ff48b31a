"""rw.generate: greedy ≡ the PyTorch reference, batched ≡ one by one, chunked prefill ≡ one shot,
sampling semantics through generate (seeds, penalties, bans, stops), streaming, bf16 weights,
one-line errors."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import rwkv2_jax as rw
from rwkv2_jax.generation.generator import (DEVICE_STEPS_PER_ITER, generate, prompt_logits, stream, stream_batch,
                                            with_weight_dtype)
from rwkv2_jax.testing.torch_reference import TorchRWKV2
from tests.conftest import SMALL

V = SMALL["vocab_size"]
# Prompts of different lengths: 1 (no GPT-mode part), a chunk boundary, several chunks.
PROMPTS = [[5], [3, 14, 15, 9, 2, 6], list(range(1, 18)), [(7 * i) % (V - 1) + 1 for i in range(41)]]


@pytest.fixture(scope="module", params=["plain", "ffn_pre"])
def pair(request, release_files):
    """(our Model, the PyTorch reference) on the same release checkpoint."""
    path = release_files[request.param]
    sd = torch.load(path, weights_only=True)
    return rw.load_torch(path, verbose=False), TorchRWKV2(sd, k_eps=1e-9)


@pytest.fixture(scope="module")
def model(release_files):
    return rw.load_torch(release_files["plain"], verbose=False)


def reference_chain(ref, prompt, n, *, presence=0.0, frequency=0.0, decay=1.0, ban=(0,), stop=()):
    """ChatRWKV's PIPELINE.generate with a greedy sampler, on the PyTorch reference (RNN mode)."""
    logits, state = ref.rnn(torch.tensor([prompt]))
    out, occurrence = [], {}
    for _ in range(n):
        x = logits[0, -1].clone()
        for t in ban:
            x[t] = -float("inf")
        for t, c in occurrence.items():
            x[t] -= presence + c * frequency
        token = int(torch.argmax(x))
        if token in stop:
            break
        out.append(token)
        for t in occurrence:
            occurrence[t] *= decay
        occurrence[token] = occurrence.get(token, 0.0) + 1.0
        logits, state = ref.rnn(torch.tensor([[token]]), state)
    return out


# --- greedy against the reference -------------------------------------------------------


def test_greedy_equals_the_pytorch_reference_chain(pair):
    model, ref = pair
    out = generate(model, PROMPTS, 12, temperature=0)
    assert out == [reference_chain(ref, p, 12) for p in PROMPTS]


@pytest.mark.slow
def test_penalties_equal_chatrwkv_semantics(pair):
    model, ref = pair
    kw = dict(presence=0.4, frequency=0.6, decay=0.8)
    out = generate(model, PROMPTS[1:3], 16, temperature=0, presence_penalty=0.4, frequency_penalty=0.6,
                   penalty_decay=0.8)
    want = [reference_chain(ref, p, 16, **kw) for p in PROMPTS[1:3]]
    assert out == want
    assert out != generate(model, PROMPTS[1:3], 16, temperature=0)  # the penalties changed the chain


# --- batching, chunking, streaming ----------------------------------------------------------


@pytest.mark.slow
def test_batched_equals_one_by_one_greedy_and_sampled(model):
    """The batch runs the accelerators' loop (one lax.while_loop), rows alone the CPU's (host loop)."""
    kw = dict(chunk_size=16)  # several chunks, padded ones included
    greedy = generate(model, PROMPTS, 10, temperature=0, decode_loop="device", **kw)
    assert greedy == [generate(model, [p], 10, temperature=0, decode_loop="host", **kw)[0] for p in PROMPTS]
    sampled = dict(temperature=0.9, top_p=0.8, top_k=20, presence_penalty=0.3, frequency_penalty=0.2,
                   penalty_decay=0.9, chunk_size=16)
    batch = generate(model, PROMPTS, 10, seed=7, decode_loop="device", **sampled)
    # row b uses seed + b: its tokens do not depend on the other rows
    assert batch == [generate(model, [p], 10, seed=7 + b, **sampled)[0] for b, p in enumerate(PROMPTS)]
    assert generate(model, PROMPTS[::-1], 10, seed=[7 + b for b in range(4)][::-1], **sampled) == batch[::-1]


@pytest.mark.slow
@pytest.mark.parametrize("n", [1, 5, 7])
def test_device_loop_runs_several_steps_per_iteration_exactly(model, n):
    """n not a multiple of the steps per iteration: the last steps run one per iteration (same tokens and state)."""
    assert DEVICE_STEPS_PER_ITER > 1
    sampled = dict(temperature=0.9, top_p=0.8, presence_penalty=0.3, seed=3)
    dev, dev_state = generate(model, PROMPTS, n, decode_loop="device", return_state=True, **sampled)
    host, host_state = generate(model, PROMPTS, n, decode_loop="host", return_state=True, **sampled)
    assert dev == host and all(len(row) == n for row in dev)
    for a, b in zip(dev_state, host_state):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)  # two programs: float reorderings


@pytest.mark.slow
def test_device_loop_set_up_runs_no_eager_ops(model, monkeypatch):
    """Past its first call, generate with the device loop issues no eager (one-op) device work
    before the loop: the keys, knobs, masks and start state are built inside the jitted calls.
    Each eager op is a dispatch the device waits for (milliseconds per call on a GPU)."""
    dispatch = pytest.importorskip("jax._src.dispatch", reason="JAX's dispatch module moved")
    if not hasattr(dispatch, "apply_primitive"):
        pytest.skip("jax._src.dispatch.apply_primitive is gone: eager ops cannot be counted this way")
    sampled = dict(temperature=0.8, top_p=0.9, presence_penalty=0.1, stop_tokens=(3,), decode_loop="device")
    generate(model, PROMPTS, 3, **sampled)  # compile
    eager, apply = [], dispatch.apply_primitive
    monkeypatch.setattr(dispatch, "apply_primitive", lambda prim, *a, **k: eager.append(prim.name) or apply(prim, *a, **k))
    out = generate(model, PROMPTS, 3, **sampled)
    assert len(out) == len(PROMPTS) and eager == [], eager


@pytest.mark.slow
def test_chunked_prefill_equals_one_shot(model, rng):
    prompts = [rng.integers(0, V, n).tolist() for n in (300, 77, 1, 129)]
    logits, state = prompt_logits(model, prompts, chunk_size=32)  # 32-token chunks, ragged ends
    for b, p in enumerate(prompts):
        one_logits, one_state = model.prefill([p])
        np.testing.assert_allclose(logits[b], one_logits[0, -1], rtol=1e-4, atol=1e-4)
        for got, want in zip(state, one_state):
            np.testing.assert_allclose(got[:, b], want[:, 0], rtol=1e-4, atol=1e-4)
    # carrying a state: prompt_logits(a + b) == prompt_logits(b) from the state after a
    _, after_a = prompt_logits(model, [prompts[0][:200]])
    cont_logits, cont_state = prompt_logits(model, [prompts[0][200:]], state=after_a, chunk_size=32)
    np.testing.assert_allclose(cont_logits[0], logits[0], rtol=1e-4, atol=1e-4)
    for got, want in zip(cont_state, state):
        np.testing.assert_allclose(got[:, 0], want[:, 0], rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_stream_equals_generate_and_stops(model):
    kw = dict(temperature=0.8, top_p=0.9, seed=3, stop_tokens=(7,))
    full = generate(model, PROMPTS, 20, **kw)
    steps = list(stream_batch(model, PROMPTS, 20, **kw))
    for b, row in enumerate(full):
        got = [int(s[b]) for s in steps]
        assert got[: len(row)] == row and all(t == -1 for t in got[len(row):])
    assert list(stream(model, PROMPTS[1], 20, **{**kw, "seed": 4})) == full[1]
    # a shared prefill is copied, not consumed: two draws from it
    first = prompt_logits(model, [PROMPTS[2]])
    a = list(stream(model, PROMPTS[2], 8, context=first, seed=1))
    b = list(stream(model, PROMPTS[2], 8, context=first, seed=1))
    assert a == b == generate(model, [PROMPTS[2]], 8, seed=1)[0]


# --- sampling semantics -----------------------------------------------------------------------


@pytest.mark.slow
def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(model):
    a = generate(model, PROMPTS, 15, seed=11)
    assert a == generate(model, PROMPTS, 15, seed=11)
    assert a != generate(model, PROMPTS, 15, seed=12)
    assert all(0 not in row and len(row) == 15 for row in a)  # token 0 banned by default
    greedy = generate(model, PROMPTS, 15, temperature=0)
    assert generate(model, PROMPTS, 15, top_k=1, seed=5) == greedy
    assert generate(model, PROMPTS, 15, top_p=1e-6, temperature=2.0, seed=5) == greedy


def test_huge_presence_penalty_forbids_repeats(model):
    out = generate(model, PROMPTS, 40, presence_penalty=1e6, seed=2)
    assert all(len(set(row)) == len(row) == 40 for row in out)
    out = generate(model, PROMPTS, 40, temperature=0, presence_penalty=1e6)
    assert all(len(set(row)) == len(row) for row in out)
    # fully decayed counts still mark a token as present (ChatRWKV keeps it in its dict)
    out = generate(model, PROMPTS, 40, temperature=0, presence_penalty=1e6, penalty_decay=0.0)
    assert all(len(set(row)) == len(row) for row in out)


@pytest.mark.slow
def test_stop_tokens_end_their_row_only(model):
    greedy = generate(model, PROMPTS, 12, temperature=0)
    stop = greedy[1][3]
    out = generate(model, PROMPTS, 12, temperature=0, stop_tokens=(stop,))
    for row, full in zip(out, greedy):
        cut = full.index(stop) if stop in full else len(full)
        assert row == full[:cut]  # the stop token is not returned
    assert len(out[1]) == 3
    assert generate(model, PROMPTS, 12, temperature=0, stop_tokens=(stop,), decode_loop="device") == out
    # a batch whose every row stops returns the same, on both loops
    for loop in ("host", "device"):
        assert generate(model, PROMPTS[1:2], 100, temperature=0, stop_tokens=(stop,), decode_loop=loop) == [out[1]]


@pytest.mark.parametrize("loop", ["host", "device"])
def test_returned_state_of_a_stopped_row_is_after_its_last_token(model, loop):
    """A row that stops keeps the state after its last returned token; the others run on."""
    greedy = generate(model, PROMPTS, 9, temperature=0)
    stop = greedy[0][2]
    out, state = generate(model, PROMPTS, 9, temperature=0, stop_tokens=(stop,), return_state=True, decode_loop=loop)
    assert len(out[0]) == 2 and any(len(row) == 9 for row in out)
    for b, (prompt, row) in enumerate(zip(PROMPTS, out)):
        want = prompt_logits(model, [prompt + row])[1]
        for got, w in zip(state, want):
            np.testing.assert_allclose(np.asarray(got[:, b]), np.asarray(w[:, 0]), rtol=1e-4, atol=1e-4)


def test_bad_arguments_give_one_line_errors(model):
    cases = [
        (dict(ban_tokens=range(V)), "every token id"),
        (dict(ban_tokens=(V,)), f"banned token id {V} is outside"),
        (dict(stop_tokens=(-1,)), "stop token id -1 is outside"),
        (dict(temperature=-1.0), "temperature must be >= 0"),
        (dict(top_p=0.0), "top_p must be in (0, 1]"),
        (dict(top_k=-2), "top_k must be an int >= 0"),
        (dict(penalty_decay=1.5), "penalty_decay must be in [0, 1]"),
        (dict(seed=[1, 2]), "seed must be an int or 4 ints"),
        (dict(decode_loop="gpu"), "decode_loop must be 'device', 'host' or None"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=re.escape(msg)):
            generate(model, PROMPTS, 3, **kw)
    with pytest.raises(ValueError, match=r"prompt 1 is empty"):
        generate(model, [[1], []], 3)
    with pytest.raises(ValueError, match=rf"prompt 1: token id {V} at position 2 is outside"):
        generate(model, [[1], [1, 2, V]], 3)
    with pytest.raises(ValueError, match=r"for one prompt pass \[prompt\]"):
        generate(model, [1, 2, 3], 3)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0"):
        generate(model, PROMPTS, -1)
    assert generate(model, PROMPTS, 0) == [[], [], [], []]


# --- weights in bfloat16 -------------------------------------------------------------------------


def test_bfloat16_weights_keep_vectors_float32(model):
    half = with_weight_dtype(model, jnp.bfloat16)
    dtypes = {"/".join(str(getattr(k, "key", k)) for k in path): x.dtype
              for path, x in jax.tree_util.tree_leaves_with_path(half.params)}
    assert dtypes["blocks_1/att/key/kernel"] == jnp.bfloat16 and dtypes["head/kernel"] == jnp.bfloat16
    assert dtypes["blocks_1/att/time_decay"] == jnp.float32 and dtypes["ln_out/scale"] == jnp.float32
    logits, state = prompt_logits(half, PROMPTS)
    want, _ = prompt_logits(model, PROMPTS)
    assert all(x.dtype == jnp.float32 for x in state)
    # bf16 weights through three layers: 1.9% of the logits' norm here (2.0% with XLA's
    # optimisation passes off, as the suite compiles), one weight rounding per product.
    assert np.linalg.norm(np.asarray(logits) - want) <= 3e-2 * np.linalg.norm(want)
    assert all(len(row) == 5 for row in generate(half, PROMPTS, 5, seed=0))
