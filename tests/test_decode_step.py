"""The decode step (rwkv2_jax.generation.step): the model at T = 1 on transposed, merged matrices.

It equals the module's step; with Pallas kernels (interpret mode here) its products on the
matvec kernel, its four fused kernels per layer (with the L2 hints and per-kernel block sizes)
and its padded rows all give the same logits and state; DecodeOptions picks among them,
rejects bad values in one line, and reaches the step through generate, stream and prefill.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import rwkv2_jax as rw
from pallas_kernels.decode import MAX_BATCH, DecodeBlockSizes, LayerBlockSizes
from pallas_kernels.matvec import MatvecBlockSizes
from rwkv2_jax.generation import generator
from rwkv2_jax.generation import step as decode_step
from rwkv2_jax.generation.generator import generate, prompt_logits, stream, with_weight_dtype
from rwkv2_jax.generation.step import FUSED_MAX_BATCH, DecodeOptions, decode_params, rnn_step, spec_of
from tests.conftest import SMALL

V = SMALL["vocab_size"]
STEP = jax.jit(rnn_step, static_argnums=0)


def load(release_files, variant, dtype="float32", wkv_impl="pallas_interpret"):
    m = rw.load_torch(release_files[variant], verbose=False).replace(wkv_impl=wkv_impl)
    return with_weight_dtype(m, jnp.bfloat16) if dtype == "bfloat16" else m


def spec_for(model, matvec=None, **options):
    """The model's StepSpec with these DecodeOptions (and another `matvec` implementation)."""
    spec = spec_of(model, DecodeOptions(**options))
    return spec if matvec is None else dataclasses.replace(spec, matvec=matvec)


def step_jaxpr(spec, model, token, state):
    return jax.make_jaxpr(rnn_step, static_argnums=0)(spec, decode_params(model), token, state).jaxpr


def assert_same_step(got, want, dtype, tol=None):
    """Logits and every state field of two steps: float32 to 1e-5 of the norm; bf16 one product
    rounding apart, and the WKV fields not compared (they move by several percent with a
    one-ulp change of K in bf16; see test_decode_step_equals_the_module_step)."""
    tol = tol or (1e-5 if dtype == "float32" else 2e-2)
    for name, a, b in [("logits", got[0], want[0]), *zip(rw.State._fields, got[1], want[1])]:
        assert a.shape == b.shape and a.dtype == b.dtype, name
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        if dtype == "float32" or name in ("logits", "x_att", "x_ffn"):
            assert np.linalg.norm(a - b) <= tol * np.linalg.norm(b), name


def rows(rng, model, B, prompt_len=6):
    """(token [B], a mid-sequence state with different rows; the plain-JAX WKV computes it)."""
    _, state = model.replace(wkv_impl="reference").prefill(rng.integers(1, V, (B, prompt_len)))
    return jnp.asarray(rng.integers(0, V, B), jnp.int32), state


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["plain", "ffn_pre"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_decode_step_equals_the_module_step(release_files, variant, dtype, rng):
    """The step (transposed, merged matrices) is the module at T = 1: logits and every state
    field, from a mid-sequence state, for a batch of different tokens."""
    m = load(release_files, variant, dtype, wkv_impl="auto")
    token, state = rows(rng, m, 3, prompt_len=7)
    want_logits, want_state = m.module.apply({"params": m.params}, token[:, None], state)
    logits, new = STEP(spec_of(m), decode_params(m), token, state)

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


@pytest.mark.parametrize("dtype,B", [("float32", 2), pytest.param("bfloat16", 2, marks=pytest.mark.slow),
                                     pytest.param("bfloat16", 5, marks=pytest.mark.slow)])
def test_decode_step_with_the_pallas_matvec(release_files, dtype, B, rng):
    """The per-operation step with Pallas kernels (here in interpret mode) runs the products with
    more inputs than outputs (the channel-mix value matrices) on the matvec kernel: same logits
    and state as XLA's products, up to float32 summation order."""
    m = load(release_files, "ffn_pre", dtype)
    spec = spec_for(m, fused=False)
    assert spec.matvec == "pallas_interpret"
    token, state = rows(rng, m, B, prompt_len=5)
    jaxpr = str(step_jaxpr(spec, m, token, state))
    # one per channel-mix value matrix ([C, 4C]): every layer, and the ffnPre of block 0
    assert jaxpr.count("pallas_call") == jaxpr.count("name=matvec") == SMALL["n_layer"] + 1
    got = STEP(spec, decode_params(m), token, state)
    assert_same_step(got, STEP(dataclasses.replace(spec, matvec="xla"), decode_params(m), token, state), dtype)


def test_decode_options_reject_bad_values(release_files):
    """Every DecodeOptions field is checked with a one-line ValueError naming it; so is a
    decode_options that is not a DecodeOptions, wherever generation takes one."""
    bad = [dict(fused="yes"), dict(stream_weights=1), dict(fused_max_batch=-1), dict(fused_max_batch=2.0),
           dict(fused_blocks=(2, 256)), dict(resident_out_bytes=-1), dict(resident_out_bytes=1.5),
           dict(resident_out_bytes=True), dict(matvec_blocks=DecodeBlockSizes())]
    bad += [dict(pad_rows=p) for p in (16, ((5, 8),), ((8, 5, 16),), ((5, 8, 8),), ((0, 1, 2),), [(5, 8, 16)])]
    for kw in bad:
        (name, value), = kw.items()
        with pytest.raises(ValueError, match=rf"^DecodeOptions: {name}") as info:
            DecodeOptions(**kw)
        assert "\n" not in str(info.value), kw
    DecodeOptions(fused_blocks=LayerBlockSizes(), matvec_blocks=MatvecBlockSizes(), pad_rows=())
    opts = DecodeOptions(pad_rows=((5, 8, 16), (9, 9, 12)))
    assert [opts.padded_rows(b) for b in (1, 4, 5, 8, 9, 10, 16)] == [1, 4, 16, 16, 12, 10, 16]
    assert DecodeOptions().padded_rows(6) == 6
    # pad_rows=None is the backend's; the step's spec always holds a resolved tuple
    assert DecodeOptions().for_backend("gpu").pad_rows == decode_step.PAD_ROWS["gpu"]
    assert DecodeOptions().for_backend("cpu").pad_rows == ()
    assert DecodeOptions(pad_rows=()).for_backend("gpu").pad_rows == ()
    m = load(release_files, "plain", wkv_impl="reference")
    assert spec_of(m).options == DecodeOptions().for_backend(jax.default_backend())
    for call in (lambda: generate(m, [[1]], 2, decode_options={"fused": False}),
                 lambda: list(stream(m, [1], 2, decode_options={"fused": False})),
                 lambda: prompt_logits(m, [[1]], decode_options={"fused": False})):
        with pytest.raises(ValueError, match="decode_options must be a rwkv2_jax.generation.step.DecodeOptions"):
            call()


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["xla", pytest.param("pallas_interpret", marks=pytest.mark.slow)])
def test_decode_step_with_padded_rows(release_files, impl, rng):
    """DecodeOptions.pad_rows: the per-operation step runs a batch of 2-4 rows padded to 8 rows
    and returns the real rows' logits and state, the same as without padding."""
    m = load(release_files, "ffn_pre")
    spec = spec_for(m, impl, fused=False, pad_rows=())
    B = 3
    token, state = rows(rng, m, B, prompt_len=5)
    padded = spec_for(m, impl, fused=False, pad_rows=((2, 4, 8),))
    jaxpr = str(step_jaxpr(padded, m, token, state))
    assert f"f32[8,{SMALL['n_embd']}]" in jaxpr and f"f32[8,{V}]" in jaxpr  # the step ran 8 rows
    logits, new = STEP(padded, decode_params(m), token, state)
    want_logits, want = STEP(spec, decode_params(m), token, state)
    for name, a, b in [("logits", logits, want_logits), *zip(rw.State._fields, new, want)]:
        assert a.shape == b.shape and a.dtype == b.dtype, name
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5, err_msg=name)
    assert STEP(spec_for(m, impl, fused=False, pad_rows=((4, 6, 8),)), decode_params(m), token, state)[0].shape == (B, V)


@pytest.mark.slow
@pytest.mark.parametrize("variant,dtype,options", [
    ("plain", "float32", {}), ("ffn_pre", "bfloat16", {}),
    # without the L2 hints (DecodeOptions.stream_weights): XLA's head
    ("plain", "bfloat16", {"stream_weights": False}),
], ids=lambda v: "-".join(f"{k}={w}" for k, w in v.items()) if isinstance(v, dict) else v)
def test_fused_decode_step(release_files, variant, dtype, options, rng):
    """With Pallas kernels the step is four fused kernels per layer (pallas_kernels.decode;
    by default up to 2 rows, here 3 rows through DecodeOptions.fused_max_batch): the same logits
    and state as the per-operation step (with XLA's products: the matvec kernel's own test pins
    it to them)."""
    m = load(release_files, variant, dtype)
    assert spec_of(m).options.fused
    spec = spec_for(m, fused_max_batch=MAX_BATCH, **options)
    token, state = rows(rng, m, 3)
    jaxpr = str(step_jaxpr(spec, m, token, state))
    names = re.findall(r"name=(decode_\w+|matvec)", jaxpr)
    heads = ["matvec"] if spec.options.stream_weights else []
    assert sorted(names) == sorted(re.findall(r"name=(decode_\w+)", jaxpr) + heads), names  # nothing else
    assert len(names) == 4 * SMALL["n_layer"] + 1 + len(heads), names  # + the final LayerNorm
    assert names.count("decode_layer_norm") == 1, names
    # a first time-mix layer reads its embedding rows itself; an ffnPre one takes them gathered
    assert ("gather[" in jaxpr) == (variant == "ffn_pre")
    got = STEP(spec, decode_params(m), token, state)
    per_op = dataclasses.replace(spec, matvec="xla", options=dataclasses.replace(spec.options, fused=False))
    assert_same_step(got, STEP(per_op, decode_params(m), token, state), dtype)


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


@pytest.mark.slow
def test_fused_step_streams_its_weights(release_files, rng):
    """DecodeOptions.stream_weights (the default): every matrix of the fused step is loaded with
    the "evict_first" L2 hint -- the layer kernels' weights and the head, which then runs on the
    Pallas matvec kernel -- except the time-mix output matrices of the first layers that fit in
    resident_out_bytes, which load plainly; without it no kernel carries a hint and the head is
    XLA's. The logits agree either way. The ffnPre variant: its block 0 is a channel mix, so the
    first time-mix output matrix is block 1's."""
    m = load(release_files, "ffn_pre", "bfloat16")
    C, L = SMALL["n_embd"], SMALL["n_layer"]
    default = spec_of(m).options
    assert default.stream_weights and default.resident_out_bytes >= L * C * C * 2  # all of this model's fit
    resident = 2 * C * C * 2 + 1  # two [C, C] bf16 matrices
    spec = spec_for(m, resident_out_bytes=resident)
    token, state = rows(rng, m, 1, prompt_len=5)

    def kernels(spec):
        return [(str(e.params["name"]), _load_hints(e.params["jaxpr"])) for e in step_jaxpr(spec, m, token, state).eqns
                if e.primitive.name == "pallas_call"]

    got = kernels(spec)
    assert [n for n, _ in got[-2:]] == ["decode_layer_norm", "matvec"], got[-2:]
    assert got[-1][1] == {"evict_first"} and got[-2][1] == set()  # the head streams; the LayerNorm reads no matrix
    layers = [got[4 * i: 4 * i + 4] for i in range(L)]
    assert len(got) == 4 * L + 2
    for i, layer in enumerate(layers):
        hints = [h for _, h in layer]
        att_out = set() if i == 1 else {"evict_first"}  # layers 0 and 1 fit; layer 0 (ffnPre) has none
        assert hints == [{"evict_first"}, att_out, {"evict_first"}, {"evict_first"}], (i, layer)
    plain = spec_for(m, resident_out_bytes=resident, stream_weights=False)
    assert all(h == set() for _, h in kernels(plain)) and "matvec" not in [n for n, _ in kernels(plain)]
    a, b = (np.asarray(STEP(s, decode_params(m), token, state)[0], np.float64) for s in (spec, plain))
    assert np.linalg.norm(a - b) <= 2e-2 * np.linalg.norm(b)  # bf16 logits: one rounding apart at most


def _launch(eqn):
    """(kernel name, grid, warps) of a pallas_call (compiler_params: an object or a dict by backend)."""
    cp = eqn.params["compiler_params"]
    if isinstance(cp, dict):
        cp = cp.get("triton", cp)
    warps = cp["num_warps"] if isinstance(cp, dict) else cp.num_warps
    return str(eqn.params["name"]), tuple(eqn.params["grid_mapping"].grid), warps


@pytest.mark.slow
def test_fused_decode_step_block_sizes_per_kernel(release_files, rng):
    """LayerBlockSizes gives each of a layer's four kernels its own launch (programs and warps;
    an ffnPre block's kernels take channel_mix_in's and ffn_out's), and the step stays the same
    function as the per-operation one. The ffnPre variant has both kinds of first block."""
    m = load(release_files, "ffn_pre")
    Blocks = DecodeBlockSizes
    sizes = LayerBlockSizes(Blocks(1, 8, num_warps=1), Blocks(2, 8, num_warps=2), Blocks(4, 8, num_warps=4),
                            Blocks(8, 32, num_warps=8))
    spec = spec_for(m, fused_blocks=sizes)
    B, C = 2, SMALL["n_embd"]
    token, state = rows(rng, m, B, prompt_len=5)
    got = [_launch(e) for e in step_jaxpr(spec, m, token, state).eqns if e.primitive.name == "pallas_call"]
    assert got.pop()[0] == "matvec"  # the head (DecodeOptions.stream_weights)
    assert got.pop() == ("decode_layer_norm", (1,), 4)  # the final LayerNorm: one program
    tm, ao = ("decode_time_mix_in", (C,), 1), ("decode_mix_out", (C // 2,), 2)
    cm, fo = ("decode_channel_mix_in", (C // 4,), 4), ("decode_mix_out", (C // 8,), 8)
    # ffnPre: block 0's time mix is a channel mix
    assert got == [cm, fo] + [cm, fo] + [tm, ao, cm, fo] * (SMALL["n_layer"] - 1), got
    # the defaults (fused_blocks None): per kernel at batch 1, one size for all four above it
    for n in (1, 2):
        jx = step_jaxpr(spec_of(m), m, token[:n], jax.tree.map(lambda a: a[:, :n], state))
        launches = {_launch(e)[1:] for e in jx.eqns if e.primitive.name == "pallas_call"
                    and e.params["name"] not in ("decode_layer_norm", "matvec")}
        want = LayerBlockSizes() if n == 1 else LayerBlockSizes.of(Blocks())
        assert launches == {((C // b.block_out,), b.num_warps) for b in want}, (n, launches)
    got = STEP(spec, decode_params(m), token, state)
    assert_same_step(got, STEP(spec_for(m, fused=False), decode_params(m), token, state), "float32")


def test_decode_options_reach_the_step(release_files, monkeypatch):
    """generate, stream (through stream_batch) and prefill pass their decode_options to the step
    (here rows padded 1 -> 4 on the per-operation step: the same tokens)."""
    m = load(release_files, "plain", wkv_impl="reference")
    options = DecodeOptions(fused=False, pad_rows=((1, 2, 4),))
    seen = []
    monkeypatch.setattr(generator, "spec_of", lambda model, options=None: seen.append(options)
                        or decode_step.spec_of(model, options))
    prompt = [3, 14, 15, 9, 2, 6]
    want = generate(m, [prompt], 3, temperature=0)
    assert seen and all(o is None for o in seen)
    seen.clear()
    assert generate(m, [prompt], 3, temperature=0, decode_options=options) == want
    assert [list(stream(m, prompt, 3, temperature=0, decode_options=options))] == want
    prompt_logits(m, [prompt], decode_options=options)
    assert len(seen) >= 3 and all(o is options for o in seen)


@pytest.mark.slow
def test_fused_decode_generates_the_same_tokens(release_files):
    """generate with the fused step == with the per-operation step (greedy, float32, Pallas
    kernels in interpret mode), on a batch of two prompts of different lengths."""
    m = load(release_files, "plain")
    prompts = [[3, 14, 15, 9, 2, 6], list(range(1, 18))]
    fused = generate(m, prompts, 4, temperature=0)
    assert fused == generate(m, prompts, 4, temperature=0, decode_options=DecodeOptions(fused=False))


def test_fused_decode_falls_back(release_files):
    """Batches over FUSED_MAX_BATCH rows (by default; the kernels themselves take up to 16),
    widths the kernels do not take, or weights in another dtype than the compute dtype run
    the per-operation step."""
    m = load(release_files, "plain")

    def n_fused(model, B, **options):
        state = jax.tree.map(jnp.asarray, model.init_state(B))
        jaxpr = str(step_jaxpr(spec_for(model, **options), model, jnp.zeros((B,), jnp.int32), state))
        return len(re.findall(r"name=decode_", jaxpr))

    fused = 4 * SMALL["n_layer"] + 1  # and the final LayerNorm
    assert FUSED_MAX_BATCH == 2
    assert n_fused(m, 1) == n_fused(m, 2) == fused
    assert n_fused(m, 3) == n_fused(m, 8) == 0
    assert n_fused(m, 1, fused=False) == 0
    assert n_fused(m, MAX_BATCH, fused_max_batch=MAX_BATCH) == fused
    assert n_fused(m, MAX_BATCH + 1, fused_max_batch=MAX_BATCH + 1) == 0  # beyond the kernels
    assert n_fused(m.replace(dtype=jnp.bfloat16), 1) == 0  # float32 weights, bf16 compute
    assert n_fused(m.replace(wkv_impl="reference"), 1) == 0  # no Pallas at all
