"""rw.generate: greedy ≡ the PyTorch reference, batched ≡ one by one, chunked prefill ≡ one shot,
sampling semantics (top-p/top-k/temperature, penalties, bans, stops), streaming, state files."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import rwkv2_jax as rw
from rwkv2_jax.formats import CheckpointError
from rwkv2_jax.generation.generator import generate, prefill, stream, stream_batch, with_weight_dtype
from rwkv2_jax.generation.sampling import SamplingParams, draw, inverse_cdf_draw, largest_threshold
from rwkv2_jax.generation.state_file import load_state, save_state
from tests.conftest import SMALL
from rwkv2_jax.testing.release_checkpoint import make_release_state_dict
from rwkv2_jax.testing.torch_reference import TorchRWKV2

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


def test_penalties_equal_chatrwkv_semantics(pair):
    model, ref = pair
    kw = dict(presence=0.4, frequency=0.6, decay=0.8)
    out = generate(model, PROMPTS[1:3], 16, temperature=0, presence_penalty=0.4, frequency_penalty=0.6,
                   penalty_decay=0.8)
    want = [reference_chain(ref, p, 16, **kw) for p in PROMPTS[1:3]]
    assert out == want
    assert out != generate(model, PROMPTS[1:3], 16, temperature=0)  # the penalties changed the chain


# --- batching, chunking, streaming ----------------------------------------------------------


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


@pytest.mark.parametrize("n", [1, 5, 7])
def test_device_loop_runs_several_steps_per_iteration_exactly(model, n):
    """n not a multiple of the steps per iteration: the last steps run one per iteration (same tokens and state)."""
    from rwkv2_jax.generation.generator import DEVICE_STEPS_PER_ITER

    assert DEVICE_STEPS_PER_ITER > 1
    sampled = dict(temperature=0.9, top_p=0.8, presence_penalty=0.3, seed=3)
    dev, dev_state = generate(model, PROMPTS, n, decode_loop="device", return_state=True, **sampled)
    host, host_state = generate(model, PROMPTS, n, decode_loop="host", return_state=True, **sampled)
    assert dev == host and all(len(row) == n for row in dev)
    for a, b in zip(dev_state, host_state):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-5, atol=2e-5)  # two programs: float reorderings


def test_device_loop_set_up_runs_no_eager_ops(model, monkeypatch):
    """Past its first call, generate with the device loop issues no eager (one-op) device work
    before the loop: the keys, knobs, masks and start state are built inside the jitted calls.
    Each eager op is a dispatch the device waits for (~10 ms per call on an H200 when there
    were 11; docs/PERF.md, session 11)."""
    dispatch = pytest.importorskip("jax._src.dispatch", reason="JAX's dispatch module moved")
    if not hasattr(dispatch, "apply_primitive"):
        pytest.skip("jax._src.dispatch.apply_primitive is gone: eager ops cannot be counted this way")
    sampled = dict(temperature=0.8, top_p=0.9, presence_penalty=0.1, stop_tokens=(3,), decode_loop="device")
    generate(model, PROMPTS, 3, **sampled)  # compile
    eager, apply = [], dispatch.apply_primitive
    monkeypatch.setattr(dispatch, "apply_primitive", lambda prim, *a, **k: eager.append(prim.name) or apply(prim, *a, **k))
    out = generate(model, PROMPTS, 3, **sampled)
    assert len(out) == len(PROMPTS) and eager == [], eager


def test_chunked_prefill_equals_one_shot(model, rng):
    prompts = [rng.integers(0, V, n).tolist() for n in (300, 77, 1, 129)]
    logits, state = prefill(model, prompts, chunk_size=32)  # 32-token chunks, ragged ends
    for b, p in enumerate(prompts):
        one_logits, one_state = model.prefill([p])
        np.testing.assert_allclose(logits[b], one_logits[0, -1], rtol=1e-4, atol=1e-4)
        for got, want in zip(state, one_state):
            np.testing.assert_allclose(got[:, b], want[:, 0], rtol=1e-4, atol=1e-4)
    # carrying a state: prefill(a + b) == prefill(b) from the state after a
    _, after_a = prefill(model, [prompts[0][:200]])
    cont_logits, cont_state = prefill(model, [prompts[0][200:]], state=after_a, chunk_size=32)
    np.testing.assert_allclose(cont_logits[0], logits[0], rtol=1e-4, atol=1e-4)
    for got, want in zip(cont_state, state):
        np.testing.assert_allclose(got[:, 0], want[:, 0], rtol=1e-4, atol=1e-4)


def test_stream_equals_generate_and_stops(model):
    kw = dict(temperature=0.8, top_p=0.9, seed=3, stop_tokens=(7,))
    full = generate(model, PROMPTS, 20, **kw)
    steps = list(stream_batch(model, PROMPTS, 20, **kw))
    for b, row in enumerate(full):
        got = [int(s[b]) for s in steps]
        assert got[: len(row)] == row and all(t == -1 for t in got[len(row):])
    assert list(stream(model, PROMPTS[1], 20, **{**kw, "seed": 4})) == full[1]
    # a shared prefill is copied, not consumed: two draws from it
    first = prefill(model, [PROMPTS[2]])
    a = list(stream(model, PROMPTS[2], 8, prefill=first, seed=1))
    b = list(stream(model, PROMPTS[2], 8, prefill=first, seed=1))
    assert a == b == generate(model, [PROMPTS[2]], 8, seed=1)[0]


# --- sampling semantics -----------------------------------------------------------------------


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(model):
    a = generate(model, PROMPTS, 15, seed=11)
    assert a == generate(model, PROMPTS, 15, seed=11)
    assert a != generate(model, PROMPTS, 15, seed=12)
    assert all(0 not in row and len(row) == 15 for row in a)  # token 0 banned by default
    greedy = generate(model, PROMPTS, 15, temperature=0)
    assert generate(model, PROMPTS, 15, top_k=1, seed=5) == greedy
    assert generate(model, PROMPTS, 15, top_p=1e-6, temperature=2.0, seed=5) == greedy


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


def test_huge_presence_penalty_forbids_repeats(model):
    out = generate(model, PROMPTS, 40, presence_penalty=1e6, seed=2)
    assert all(len(set(row)) == len(row) == 40 for row in out)
    out = generate(model, PROMPTS, 40, temperature=0, presence_penalty=1e6)
    assert all(len(set(row)) == len(row) for row in out)
    # fully decayed counts still mark a token as present (ChatRWKV keeps it in its dict)
    out = generate(model, PROMPTS, 40, temperature=0, presence_penalty=1e6, penalty_decay=0.0)
    assert all(len(set(row)) == len(row) for row in out)


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
        want = prefill(model, [prompt + row])[1]
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


# --- state, conversation, dtype -------------------------------------------------------------------


def test_state_round_trip_and_continuing_a_conversation(model, tmp_path):
    first, question = PROMPTS[2], [4, 8, 15, 16]
    reply, state = generate(model, [first], 6, temperature=0, return_state=True)
    path = save_state(tmp_path / "chat.safetensors", state, model)
    loaded = load_state(path, model)
    for a, b in zip(loaded, state):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # continuing from the saved state == generating after the whole history at once
    assert (generate(model, [question], 8, temperature=0, state=loaded)
            == generate(model, [first + reply[0] + question], 8, temperature=0))


def test_state_file_errors(model, tmp_path):
    state = prefill(model, PROMPTS)[1]
    path = save_state(tmp_path / "s.safetensors", state, model)
    other = rw.from_release_arrays({k: v.numpy() for k, v in
                                    make_release_state_dict(n_layer=2, n_embd=24, vocab_size=V, seed=0).items()})
    with pytest.raises(CheckpointError, match=r"state saved for a L3-D24 .* cannot load it into this L2-D24"):
        load_state(path, other)
    with pytest.raises(CheckpointError, match="state file not found"):
        load_state(tmp_path / "none.safetensors", model)
    rw.save(model, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="not a rwkv2_jax.state file"):
        load_state(tmp_path / "model.safetensors", model)
    with pytest.raises(ValueError, match=r"state has shape \[3, 4, 24\] per field, expected \[3, 1, 24\]"):
        generate(model, [[1]], 2, state=state)


def test_bfloat16_weights_keep_vectors_float32(model):
    half = with_weight_dtype(model, jnp.bfloat16)
    dtypes = {"/".join(str(getattr(k, "key", k)) for k in path): x.dtype
              for path, x in jax.tree_util.tree_leaves_with_path(half.params)}
    assert dtypes["blocks_1/att/key/kernel"] == jnp.bfloat16 and dtypes["head/kernel"] == jnp.bfloat16
    assert dtypes["blocks_1/att/time_decay"] == jnp.float32 and dtypes["ln_out/scale"] == jnp.float32
    logits, state = prefill(half, PROMPTS)
    want, _ = prefill(model, PROMPTS)
    assert all(x.dtype == jnp.float32 for x in state)
    np.testing.assert_allclose(logits, want, atol=0.1 * float(jnp.std(want)))
    assert all(len(row) == 5 for row in generate(half, PROMPTS, 5, seed=0))


@pytest.mark.parametrize("variant", ["plain", "ffn_pre"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_step_equals_the_module_step(release_files, variant, dtype, rng):
    """rwkv2_jax.generation.step (transposed, merged matrices) is the module at T = 1: logits and
    every state field, from a mid-sequence state, for a batch of different tokens."""
    from rwkv2_jax.generation.step import decode_params, rnn_step, spec_of

    m = rw.load_torch(release_files[variant], verbose=False)
    if dtype == "bfloat16":
        m = with_weight_dtype(m, jnp.bfloat16)
    B = 3
    _, state = m.prefill(rng.integers(1, V, (B, 7)))  # a real state, different per row
    token = jnp.asarray(rng.integers(0, V, B), jnp.int32)
    want_logits, want_state = m.module.apply({"params": m.params}, token[:, None], state)
    logits, new = jax.jit(rnn_step, static_argnums=0)(spec_of(m), decode_params(m), token, state)
    def close(a, b, name):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if dtype == "float32":
            # The products sum in another order: their rounding scales with the field's
            # magnitude (pp and K reach the clamp, 60), not with one element's (seed 554315157:
            # pp 0.32114 vs 0.32116 where K's terms nearly cancelled).
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * max(1.0, np.abs(b).max()), err_msg=name)
        else:  # bf16 products round differently: compare as a whole (1 bf16 ulp = 0.8%)
            assert np.linalg.norm(a - b) <= 2e-2 * np.linalg.norm(b), name

    close(logits, want_logits[:, 0], "logits")
    for name, a, b in zip(rw.State._fields, new, want_state):
        # In bf16, K leaves its matrix product in bf16 (an ulp is 0.06 at K ~ 10), and a one-ulp
        # difference in the running maximum's K moves aa, bb, pp by several percent: the WKV
        # fields are compared in float32 only, where the step must match to 1e-5.
        if dtype == "float32" or name in ("x_att", "x_ffn"):
            close(a, b, name)
    assert decode_params(m) is decode_params(m)  # built once per params object


@pytest.mark.parametrize("dtype,products,head,B", [
    ("float32", "wide", False, 2), ("bfloat16", "wide", False, 2),
    ("float32", "all", False, 5), ("bfloat16", "all", True, 3)])
def test_decode_step_with_the_pallas_matvec(release_files, dtype, products, head, B, rng):
    """With Pallas kernels (here in interpret mode) the step's products run the matvec kernel
    for small batches (by default the wide ones; StepSpec.pallas_products="all": all four of
    each layer; pallas_head: the head): same logits and state as XLA's products, up to float32
    summation order."""
    import dataclasses

    from rwkv2_jax.generation.step import decode_params, rnn_step, spec_of

    m = rw.load_torch(release_files["ffn_pre"], verbose=False)
    m = m.replace(wkv_impl="pallas_interpret")
    if dtype == "bfloat16":
        m = with_weight_dtype(m, jnp.bfloat16)
    spec = dataclasses.replace(spec_of(m), fused=False, pallas_products=products,  # per-operation (fused: below)
                               pallas_head=head)
    assert spec.matvec == "pallas_interpret"
    _, state = m.prefill(rng.integers(1, V, (B, 5)))
    token = jnp.asarray(rng.integers(0, V, B), jnp.int32)
    step = jax.jit(rnn_step, static_argnums=0)
    jaxpr = str(jax.make_jaxpr(rnn_step, static_argnums=0)(spec, decode_params(m), token, state))
    # "wide": one per channel-mix value matrix ([C, 4C]): every layer, plus the ffnPre of block 0;
    # "all": four per layer (time-mix K/V/R merged, output, channel-mix K/R merged, value); the head
    n_products = {"wide": SMALL["n_layer"] + 1, "all": 4 * SMALL["n_layer"]}[products] + head
    assert jaxpr.count("pallas_call") == jaxpr.count("name=matvec") == n_products
    logits, new = step(spec, decode_params(m), token, state)
    want_logits, want = step(dataclasses.replace(spec, matvec="xla"), decode_params(m), token, state)
    tol = 1e-5 if dtype == "float32" else 2e-2  # bf16: one rounding of a product's output apart
    for name, a, b in [("logits", logits, want_logits), *zip(rw.State._fields, new, want)]:
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if dtype == "float32" or name in ("logits", "x_att", "x_ffn"):
            assert np.linalg.norm(a - b) <= tol * np.linalg.norm(b), name


def test_step_spec_rejects_bad_options():
    from rwkv2_jax.generation.step import StepSpec

    args = (rw.RWKVConfig(n_layer=1, n_embd=8, vocab_size=16), jnp.dtype(jnp.float32), None)
    with pytest.raises(ValueError, match="pallas_products='some'"):
        StepSpec(*args, pallas_products="some")
    for bad in (16, ((5, 8),), ((8, 5, 16),), ((5, 8, 8),), ((0, 1, 2),), [(5, 8, 16)]):
        with pytest.raises(ValueError, match="pad_rows="):
            StepSpec(*args, pad_rows=bad)
    spec = StepSpec(*args, pad_rows=((5, 8, 16), (9, 9, 12)))
    assert [spec.padded_rows(b) for b in (1, 4, 5, 8, 9, 10, 16)] == [1, 4, 16, 16, 12, 10, 16]


@pytest.mark.parametrize("impl", ["xla", "pallas_interpret"])
def test_decode_step_with_padded_rows(release_files, impl, rng):
    """StepSpec.pad_rows: the per-operation step runs a batch of 2-4 rows padded to 8 rows
    and returns the real rows' logits and state, the same as without padding."""
    import dataclasses

    from rwkv2_jax.generation.step import decode_params, rnn_step, spec_of

    m = rw.load_torch(release_files["ffn_pre"], verbose=False).replace(wkv_impl="pallas_interpret")
    spec = dataclasses.replace(spec_of(m), fused=False, matvec=impl)
    B = 3
    _, state = m.prefill(rng.integers(1, V, (B, 5)))
    token = jnp.asarray(rng.integers(0, V, B), jnp.int32)
    padded = dataclasses.replace(spec, pad_rows=((2, 4, 8),))
    jaxpr = str(jax.make_jaxpr(rnn_step, static_argnums=0)(padded, decode_params(m), token, state))
    assert f"f32[8,{SMALL['n_embd']}]" in jaxpr and f"f32[8,{V}]" in jaxpr  # the step ran 8 rows
    step = jax.jit(rnn_step, static_argnums=0)
    logits, new = step(padded, decode_params(m), token, state)
    want_logits, want = step(spec, decode_params(m), token, state)
    for name, a, b in [("logits", logits, want_logits), *zip(rw.State._fields, new, want)]:
        assert a.shape == b.shape and a.dtype == b.dtype, name
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5, err_msg=name)
    assert step(dataclasses.replace(spec, pad_rows=((4, 6, 8),)), decode_params(m), token, state)[0].shape == (B, V)


@pytest.mark.parametrize("variant,dtype,changes", [
    ("plain", "float32", {}), ("plain", "bfloat16", {}), ("ffn_pre", "float32", {}), ("ffn_pre", "bfloat16", {}),
    # the options of the fused step: the token-shift vectors stacked after the step instead of
    # written in place by the output kernels; the head through the Pallas matvec kernel
    ("ffn_pre", "float32", {"shift_in_place": True}), ("plain", "bfloat16", {"shift_in_place": True}),
    ("plain", "float32", {"pallas_head": True}), ("ffn_pre", "bfloat16", {"pallas_head": True}),
    # without the L2 hints (StepSpec.stream_weights): XLA's head
    ("plain", "bfloat16", {"stream_weights": False}), ("ffn_pre", "float32", {"stream_weights": False}),
], ids=lambda v: "-".join(f"{k}={w}" for k, w in v.items()) if isinstance(v, dict) else v)
def test_fused_decode_step(release_files, variant, dtype, changes, rng):
    """With Pallas kernels the step is four fused kernels per layer (pallas_kernels.decode;
    by default up to 2 rows, here 3 rows through StepSpec.fused_max_batch): the same logits and
    state as the per-operation step."""
    import dataclasses

    from pallas_kernels.decode import MAX_BATCH
    from rwkv2_jax.generation.step import decode_params, rnn_step, spec_of

    m = rw.load_torch(release_files[variant], verbose=False).replace(wkv_impl="pallas_interpret")
    if dtype == "bfloat16":
        m = with_weight_dtype(m, jnp.bfloat16)
    assert spec_of(m).fused and m.fused_decode
    spec = dataclasses.replace(spec_of(m), fused_max_batch=MAX_BATCH, **changes)
    B = 3
    _, state = m.prefill(rng.integers(1, V, (B, 6)))
    token = jnp.asarray(rng.integers(0, V, B), jnp.int32)
    jaxpr = str(jax.make_jaxpr(rnn_step, static_argnums=0)(spec, decode_params(m), token, state))
    names = re.findall(r"name=(decode_\w+|matvec)", jaxpr)
    heads = ["matvec"] if spec.pallas_head or spec.stream_weights else []
    assert sorted(names) == sorted(re.findall(r"name=(decode_\w+)", jaxpr) + heads), names  # nothing else
    assert len(names) == 4 * SMALL["n_layer"] + 1 + len(heads), names  # + the final LayerNorm
    assert names.count("decode_layer_norm") == 1, names
    # a first time-mix layer reads its embedding rows itself; an ffnPre one takes them gathered
    assert ("gather[" in jaxpr) == (variant == "ffn_pre")
    # the stacking of the layers' token-shift vectors: there exactly when not written in place
    assert ("stack[" in jaxpr) == (not spec.shift_in_place)
    step = jax.jit(rnn_step, static_argnums=0)
    logits, new = step(spec, decode_params(m), token, state)
    want_logits, want = step(dataclasses.replace(spec, fused=False), decode_params(m), token, state)
    tol = 1e-5 if dtype == "float32" else 2e-2  # bf16: one rounding of a product's output apart
    for name, a, b in [("logits", logits, want_logits), *zip(rw.State._fields, new, want)]:
        assert a.shape == b.shape and a.dtype == b.dtype, name
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        # bf16: the WKV fields move by several percent with a one-ulp change of K (see
        # test_decode_step_equals_the_module_step); compared in float32 only.
        if dtype == "float32" or name in ("logits", "x_att", "x_ffn"):
            assert np.linalg.norm(a - b) <= tol * np.linalg.norm(b), name


def _load_hints(jaxpr) -> set:
    """The eviction_policy of every explicit load (plgpu.load) in a kernel's jaxpr, nested ones included."""
    out = set()
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "masked_load":
            out.add(eqn.params["eviction_policy"])
        for v in eqn.params.values():
            for sub in (v if isinstance(v, (tuple, list)) else (v,)):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    sub = sub.jaxpr
                if isinstance(sub, jax.extend.core.Jaxpr):
                    out |= _load_hints(sub)
    return out


@pytest.mark.parametrize("variant", ["plain", "ffn_pre"])
def test_fused_step_streams_its_weights(release_files, variant, rng):
    """StepSpec.stream_weights (the default): every matrix of the fused step is loaded with the
    "evict_first" L2 hint -- the layer kernels' weights and the head, which then runs on the
    Pallas matvec kernel -- except the time-mix output matrices of the first layers that fit in
    resident_out_bytes, which load plainly; without it no kernel carries a hint and the head is
    XLA's. The logits agree either way."""
    import dataclasses

    from rwkv2_jax.generation.step import decode_params, rnn_step, spec_of

    m = with_weight_dtype(rw.load_torch(release_files[variant], verbose=False).replace(wkv_impl="pallas_interpret"),
                          jnp.bfloat16)
    C, L = SMALL["n_embd"], SMALL["n_layer"]
    spec = spec_of(m)
    assert spec.stream_weights and spec.resident_out_bytes >= L * C * C * 2  # all of this model's fit
    # the Model's knobs reach the step (and survive with_weight_dtype)
    m = with_weight_dtype(m.replace(resident_out_bytes=2 * C * C * 2 + 1), jnp.bfloat16)  # two [C, C] bf16 matrices
    spec = spec_of(m)
    assert spec.resident_out_bytes == 2 * C * C * 2 + 1
    _, state = m.prefill(rng.integers(1, V, (1, 5)))
    token = jnp.asarray(rng.integers(0, V, 1), jnp.int32)

    def kernels(spec):
        jaxpr = jax.make_jaxpr(rnn_step, static_argnums=0)(spec, decode_params(m), token, state).jaxpr
        return [(str(e.params["name"]), _load_hints(e.params["jaxpr"])) for e in jaxpr.eqns
                if e.primitive.name == "pallas_call"]

    got = kernels(spec)
    assert [n for n, _ in got[-2:]] == ["decode_layer_norm", "matvec"], got[-2:]
    assert got[-1][1] == {"evict_first"} and got[-2][1] == set()  # the head streams; the LayerNorm reads no matrix
    layers = [got[4 * i: 4 * i + 4] for i in range(L)]
    assert len(got) == 4 * L + 2
    for i, layer in enumerate(layers):
        hints = [h for _, h in layer]
        att_out = set() if (i < 2 and not (variant == "ffn_pre" and i == 0)) else {"evict_first"}
        assert hints == [{"evict_first"}, att_out, {"evict_first"}, {"evict_first"}], (i, layer)
    plain = spec_of(m.replace(stream_weights=False))
    assert not plain.stream_weights and plain == dataclasses.replace(spec, stream_weights=False)
    assert all(h == set() for _, h in kernels(plain)) and "matvec" not in [n for n, _ in kernels(plain)]
    step = jax.jit(rnn_step, static_argnums=0)
    a, b = (np.asarray(step(s, decode_params(m), token, state)[0], np.float64) for s in (spec, plain))
    assert np.linalg.norm(a - b) <= 2e-2 * np.linalg.norm(b)  # bf16 logits: one rounding apart at most
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="resident_out_bytes"):
            m.replace(resident_out_bytes=bad)
    with pytest.raises(ValueError, match="resident_out_bytes"):
        dataclasses.replace(spec, resident_out_bytes=-1)


def _launch(eqn):
    """(kernel name, grid, warps) of a pallas_call (compiler_params: an object or a dict by backend)."""
    cp = eqn.params["compiler_params"]
    if isinstance(cp, dict):
        cp = cp.get("triton", cp)
    warps = cp["num_warps"] if isinstance(cp, dict) else cp.num_warps
    return str(eqn.params["name"]), tuple(eqn.params["grid_mapping"].grid), warps


@pytest.mark.parametrize("variant", ["plain", "ffn_pre"])
def test_fused_decode_step_block_sizes_per_kernel(release_files, variant, rng):
    """LayerBlockSizes gives each of a layer's four kernels its own launch (programs and warps;
    an ffnPre block's kernels take channel_mix_in's and ffn_out's), and the step stays the same
    function as the per-operation one."""
    import dataclasses

    from pallas_kernels.decode import DecodeBlockSizes as Blocks
    from pallas_kernels.decode import LayerBlockSizes
    from rwkv2_jax.generation.step import decode_params, rnn_step, spec_of

    m = rw.load_torch(release_files[variant], verbose=False).replace(wkv_impl="pallas_interpret")
    sizes = LayerBlockSizes(Blocks(1, 8, num_warps=1), Blocks(2, 8, num_warps=2), Blocks(4, 8, num_warps=4),
                            Blocks(8, 32, num_warps=8))
    spec = dataclasses.replace(spec_of(m), fused_blocks=sizes)
    B, C = 2, SMALL["n_embd"]
    _, state = m.prefill(rng.integers(1, V, (B, 5)))
    token = jnp.asarray(rng.integers(0, V, B), jnp.int32)
    jaxpr = jax.make_jaxpr(rnn_step, static_argnums=0)(spec, decode_params(m), token, state).jaxpr
    got = [_launch(e) for e in jaxpr.eqns if e.primitive.name == "pallas_call"]
    assert got.pop()[0] == "matvec"  # the head (StepSpec.stream_weights)
    assert got.pop() == ("decode_layer_norm", (1,), 4)  # the final LayerNorm: one program
    tm, ao = ("decode_time_mix_in", (C,), 1), ("decode_mix_out", (C // 2,), 2)
    cm, fo = ("decode_channel_mix_in", (C // 4,), 4), ("decode_mix_out", (C // 8,), 8)
    first = [cm, fo] if variant == "ffn_pre" else [tm, ao]  # ffnPre: layer 0's time mix is a channel mix
    assert got == first + [cm, fo] + [tm, ao, cm, fo] * (SMALL["n_layer"] - 1), got
    # the defaults (fused_blocks None): per kernel at batch 1, one size for all four above it
    for rows in (1, 2):
        jx = jax.make_jaxpr(rnn_step, static_argnums=0)(
            spec_of(m), decode_params(m), token[:rows], jax.tree.map(lambda a: a[:, :rows], state)).jaxpr
        launches = {_launch(e)[1:] for e in jx.eqns if e.primitive.name == "pallas_call"
                    and e.params["name"] not in ("decode_layer_norm", "matvec")}
        want = LayerBlockSizes() if rows == 1 else LayerBlockSizes.of(Blocks())
        assert launches == {((C // b.block_out,), b.num_warps) for b in want}, (rows, launches)
    step = jax.jit(rnn_step, static_argnums=0)
    logits, new = step(spec, decode_params(m), token, state)
    want_logits, want = step(dataclasses.replace(spec, fused=False), decode_params(m), token, state)
    for name, a, b in [("logits", logits, want_logits), *zip(rw.State._fields, new, want)]:
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b), name


def test_fused_decode_generates_the_same_tokens(release_files):
    """generate with the fused step == with the per-operation step (greedy, float32), batched and
    one by one; Model(fused_decode=False) and replace() carry the choice."""
    m = rw.load_torch(release_files["plain"], verbose=False).replace(wkv_impl="pallas_interpret")
    off = m.replace(fused_decode=False)
    assert not off.fused_decode and not off.replace(k_eps=1e-9).fused_decode
    assert not with_weight_dtype(off, jnp.bfloat16).fused_decode
    prompts = PROMPTS[1:3]  # 6 and 17 tokens (generate's batched == one by one: tested above)
    fused = generate(m, prompts, 4, temperature=0)
    assert fused == generate(off, prompts, 4, temperature=0)
    assert fused == [generate(m, [p], 4, temperature=0)[0] for p in prompts]


def test_fused_decode_falls_back(release_files, rng):
    """Batches over FUSED_MAX_BATCH rows (by default; the kernels themselves take up to 16),
    widths the kernels do not take, or weights in another dtype than the compute dtype run
    the per-operation step."""
    import dataclasses

    from pallas_kernels.decode import MAX_BATCH
    from rwkv2_jax.generation.step import FUSED_MAX_BATCH, decode_params, rnn_step, spec_of

    m = rw.load_torch(release_files["plain"], verbose=False).replace(wkv_impl="pallas_interpret")

    def n_fused(model, B, **spec_changes):
        state = jax.tree.map(jnp.asarray, model.init_state(B))
        token = jnp.zeros((B,), jnp.int32)
        spec = dataclasses.replace(spec_of(model), **spec_changes)
        jaxpr = str(jax.make_jaxpr(rnn_step, static_argnums=0)(spec, decode_params(model), token, state))
        return len(re.findall(r"name=decode_", jaxpr))

    fused = 4 * SMALL["n_layer"] + 1  # and the final LayerNorm
    assert FUSED_MAX_BATCH == 2
    assert n_fused(m, 1) == n_fused(m, 2) == fused
    assert n_fused(m, 3) == n_fused(m, 8) == 0  # slower than the per-operation step there (H200)
    assert n_fused(m, MAX_BATCH, fused_max_batch=MAX_BATCH) == fused
    assert n_fused(m, MAX_BATCH + 1, fused_max_batch=MAX_BATCH + 1) == 0  # beyond the kernels
    assert n_fused(m.replace(dtype=jnp.bfloat16), 1) == 0  # float32 weights, bf16 compute
    assert n_fused(m.replace(wkv_impl="reference"), 1) == 0  # no Pallas at all
