"""The fused decode kernels (pallas_kernels.decode), run by the Pallas interpreter on CPU.

Each kernel against its plain-JAX reference on fresh random inputs (the seed is in every
failure message): float32 to float32 rounding, bf16 weights to one bf16 rounding of a
product's output; widths that are not powers of two (one and several column blocks), B = 1
and B > 1, both numeric options of the WKV step (clamp, k_eps), the state updated in place
for one layer only, and under jax_enable_x64. The decode step built from them is compared with
the per-operation step in tests/test_decode_step.py. The last tests lower the kernels to
Triton IR for CUDA.
"""

import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import decode
from pallas_kernels.decode import DecodeBlockSizes
from tests.triton_ir import assert_no_scalar_select, lower_to_triton_ir

# Small blocks so that small widths still run several column blocks and row blocks.
SMALL = DecodeBlockSizes(block_out=4, block_in=16)
L = 3  # layers in the stacked state
LN_EPS = 1e-5


def inputs(seed, B, C, dtype, layer=1):
    rng = np.random.default_rng(seed)
    f = lambda *s, scale=1.0: jnp.asarray(rng.normal(0, scale, s), jnp.float32)  # noqa: E731
    return dict(
        x=f(B, C, scale=2.0) + 0.5, ln_scale=1.0 + f(C, scale=0.2), ln_bias=f(C, scale=0.1),
        prev=f(L * B, C), time_mix=jnp.asarray(rng.uniform(0, 1, C), jnp.float32),
        kvr_t=(f(3 * C, C) * (3.0 / math.sqrt(C))).astype(dtype),
        kr_t=(f(5 * C, C) / math.sqrt(C)).astype(dtype),
        aa=f(L * B, C), bb=jnp.abs(f(L * B, C)) + 0.1, pp=f(L * B, C, scale=3.0),
        w_log=-jnp.exp(f(C)), u_log=f(C, scale=0.5), layer=jnp.asarray([layer], jnp.int32))


def close(a, b, dtype, what):
    """float32: elementwise to 2e-5 of the array's scale; bf16: to 2e-2 as a whole (a product's
    output rounded to bf16 one ulp (0.4-0.8%) apart when float32 sums differ in order)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, what
    assert np.all(np.isfinite(a)), what
    if jnp.dtype(dtype) == jnp.float32:
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5 * np.max(np.abs(b)), err_msg=what)
    else:
        assert np.linalg.norm(a - b) <= 2e-2 * np.linalg.norm(b), what


CASES = [  # B, C, dtype, blocks
    (1, 24, jnp.float32, None),  # C = 3 * 8: three column blocks of 8, 6 programs
    (3, 96, jnp.float32, SMALL),  # 6 column blocks, 24 programs
    (2, 64, jnp.bfloat16, None),  # one column block
    (1, 40, jnp.bfloat16, SMALL),  # block_in 16 -> 8 (the largest power of two dividing 40)
    # past the register budget (test_register_budget): vectors loaded where used and one
    # reduction per column block; then the vectors up front, one reduction per column block
    (3, 256, jnp.float32, DecodeBlockSizes(block_out=8, block_in=32, num_warps=1)),
    (4, 96, jnp.float32, DecodeBlockSizes(block_out=8, block_in=32, num_warps=1)),
]


@pytest.mark.slow
@pytest.mark.parametrize("B,C,dtype,blocks", CASES)
@pytest.mark.parametrize("k_clamp,k_eps", [(60.0, 1e-9), (None, 0.0)])
def test_time_mix_in(seed, B, C, dtype, blocks, k_clamp, k_eps):
    a = inputs(seed, B, C, dtype)
    log_eps = math.log(k_eps) if k_eps > 0 else None
    if k_clamp is not None:  # some K beyond the clamp: a large x along one matrix row
        a["kvr_t"] = a["kvr_t"].at[0].multiply(40.0)
    args = [a[k] for k in ("x", "ln_scale", "ln_bias", "prev", "time_mix", "kvr_t", "aa", "bb", "pp",
                           "w_log", "u_log", "layer")]
    kw = dict(k_clamp=k_clamp, log_eps=log_eps, ln_eps=LN_EPS)
    got = jax.jit(lambda *x: decode.time_mix_in(*x, **kw, blocks=blocks, interpret=True))(*args)
    want = decode.time_mix_in_reference(*args, **kw)
    msg = f"seed={seed} B={B} C={C} {jnp.dtype(dtype).name} k_clamp={k_clamp}"
    assert got[1].dtype == dtype
    for name, g, w in zip(("x_ln", "rwkv", "aa", "bb", "pp"), got, want):
        close(g, w, dtype if name != "x_ln" else jnp.float32, f"{name} {msg}")
    rows = np.arange(L * B) // B != 1  # the other layers' state: untouched, bit for bit
    for name, g, before in zip(("aa", "bb", "pp"), got[2:], (a["aa"], a["bb"], a["pp"])):
        np.testing.assert_array_equal(np.asarray(g)[rows], np.asarray(before)[rows], err_msg=f"{name} {msg}")


@pytest.mark.slow
@pytest.mark.parametrize("B,C,dtype,blocks", [CASES[0], CASES[1], CASES[3]])
def test_time_mix_in_reads_the_embedding_rows(seed, B, C, dtype, blocks):
    """time_mix_in(table, ..., token=ids): the same as with x = table[ids] gathered first (the
    table in the weights' dtype, rows converted to float32), repeated ids included; an id
    outside the table is clamped into it (the decode step feeds only drawn ids)."""
    a = inputs(seed, B, C, dtype)
    rng = np.random.default_rng(seed + 1)
    V = 37
    table = jnp.asarray(rng.normal(0, 1, (V, C)), dtype)
    ids = jnp.asarray(rng.integers(0, V, B), jnp.int32).at[0].set(V - 1)
    rest = [a[k] for k in ("ln_scale", "ln_bias", "prev", "time_mix", "kvr_t", "aa", "bb", "pp", "w_log", "u_log",
                           "layer")]
    kw = dict(k_clamp=60.0, log_eps=math.log(1e-9), ln_eps=LN_EPS)
    run = jax.jit(lambda t, i, *r: decode.time_mix_in(t, *r, **kw, blocks=blocks, interpret=True, token=i))
    got = run(table, ids, *rest)
    gathered = decode.time_mix_in(jnp.take(table, ids, axis=0).astype(jnp.float32), *rest, **kw, blocks=blocks,
                                  interpret=True)
    want = decode.time_mix_in_reference(table, *rest, **kw, token=ids)
    msg = f"seed={seed} B={B} C={C} {jnp.dtype(dtype).name}"
    for name, g, same, w in zip(("x_ln", "rwkv", "aa", "bb", "pp"), got, gathered, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(same), err_msg=f"{name} {msg}")
        close(g, w, dtype if name != "x_ln" else jnp.float32, f"{name} {msg}")
    clamped = run(table, ids.at[0].set(V + 5), *rest)  # V - 1 before: the same row
    np.testing.assert_array_equal(np.asarray(clamped[0]), np.asarray(got[0]), err_msg=msg)
    with pytest.raises(ValueError, match="token must be int"):
        decode.time_mix_in(table, *rest, **kw, token=ids.astype(jnp.float32))


@pytest.mark.parametrize("B,C,out_dtype", [(1, 1024, jnp.bfloat16), (2, 40, jnp.float32), (3, 24, jnp.bfloat16)])
def test_layer_norm(seed, B, C, out_dtype):
    """The one-program LayerNorm (the decode step's final one) against the model's formula."""
    a = inputs(seed, B, C, jnp.float32)
    got = jax.jit(lambda *x: decode.layer_norm(*x, ln_eps=LN_EPS, out_dtype=out_dtype, interpret=True))(
        a["x"], a["ln_scale"], a["ln_bias"])
    want = decode.layer_norm_reference(a["x"], a["ln_scale"], a["ln_bias"], ln_eps=LN_EPS, out_dtype=out_dtype)
    assert got.dtype == out_dtype and got.shape == (B, C)
    tol = 2e-5 if out_dtype == jnp.float32 else 1e-2  # bf16: a rounding of the output apart at most
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), rtol=tol, atol=tol,
                               err_msg=f"seed={seed} B={B} C={C}")
    with pytest.raises(ValueError, match="ln_scale has shape"):
        decode.layer_norm(a["x"], a["ln_scale"][:-1], a["ln_bias"], ln_eps=LN_EPS, out_dtype=out_dtype)


@pytest.mark.slow
@pytest.mark.parametrize("B,C,dtype,blocks", CASES)
def test_channel_mix_in(seed, B, C, dtype, blocks):
    a = inputs(seed, B, C, dtype, layer=2)
    args = [a[k] for k in ("x", "ln_scale", "ln_bias", "prev", "time_mix", "kr_t", "layer")]
    got = jax.jit(lambda *x: decode.channel_mix_in(*x, ln_eps=LN_EPS, blocks=blocks, interpret=True))(*args)
    want = decode.channel_mix_in_reference(*args, ln_eps=LN_EPS)
    msg = f"seed={seed} B={B} C={C} {jnp.dtype(dtype).name}"
    assert got[1].shape == (B, 4 * C) and got[1].dtype == dtype and got[2].dtype == dtype
    assert float(jnp.min(got[1].astype(jnp.float32))) >= 0.0  # relu^2
    for name, g, w in zip(("x_ln", "relu(k)^2", "r"), got, want):
        close(g, w, dtype if name != "x_ln" else jnp.float32, f"{name} {msg}")


@pytest.mark.slow
@pytest.mark.parametrize("B,C,dtype,blocks", CASES)
@pytest.mark.parametrize("wide,gated", [(False, False), (True, True)])
def test_mix_out(seed, B, C, dtype, blocks, wide, gated):
    rng = np.random.default_rng(seed)
    inp = 4 * C if wide else C
    u = jnp.asarray(rng.normal(0, 1, (B, inp)), dtype)
    w = jnp.asarray(rng.normal(0, 1, (C, inp)) / math.sqrt(inp), dtype)
    base = jnp.asarray(rng.normal(0, 1, (B, C)), jnp.float32)
    gate = jnp.asarray(rng.normal(0, 2, (B, C)), dtype) if gated else None
    got = jax.jit(lambda *x: decode.mix_out(*x, blocks=blocks, interpret=True))(u, w, base, gate)
    want = decode.mix_out_reference(u, w, base, gate)
    assert got.dtype == jnp.float32
    close(got, want, dtype, f"seed={seed} B={B} C={C} in={inp} {jnp.dtype(dtype).name} gated={gated}")


@pytest.mark.slow
def test_under_x64(seed):
    """With jax_enable_x64 on (Python ints become int64 there), every kernel runs and gives the
    same outputs, dtypes included, as with it off, and so stays as close to its reference."""
    B, C, dtype, blocks = 2, 40, jnp.bfloat16, SMALL
    a = inputs(seed, B, C, dtype)
    tm = [a[k] for k in ("x", "ln_scale", "ln_bias", "prev", "time_mix", "kvr_t", "aa", "bb", "pp", "w_log", "u_log",
                         "layer")]
    cm = [a[k] for k in ("x", "ln_scale", "ln_bias", "prev", "time_mix", "kr_t", "layer")]
    table = jnp.asarray(np.random.default_rng(seed + 1).normal(size=(37, C)), dtype)
    ids = jnp.asarray([36, 5], jnp.int32)
    u = jax.nn.relu(jnp.asarray(np.random.default_rng(seed + 2).normal(size=(B, 4 * C)), dtype))
    w = (a["kr_t"][:C] * 0.5).reshape(C, C).astype(dtype)
    wide = jnp.concatenate([w] * 4, axis=1)
    kw = dict(k_clamp=60.0, log_eps=math.log(1e-9), ln_eps=LN_EPS)
    runs = {
        "time_mix_in": (lambda: decode.time_mix_in(*tm, **kw, blocks=blocks, interpret=True),
                        lambda: decode.time_mix_in_reference(*tm, **kw)),
        "time_mix_in token=": (lambda: decode.time_mix_in(table, *tm[1:], **kw, blocks=blocks, interpret=True, token=ids),
                               lambda: decode.time_mix_in_reference(table, *tm[1:], **kw, token=ids)),
        "channel_mix_in": (lambda: decode.channel_mix_in(*cm, ln_eps=LN_EPS, blocks=blocks, interpret=True),
                           lambda: decode.channel_mix_in_reference(*cm, ln_eps=LN_EPS)),
        "mix_out": (lambda: decode.mix_out(u, wide, a["x"], a["x"].astype(dtype), blocks=blocks, interpret=True),
                    lambda: decode.mix_out_reference(u, wide, a["x"], a["x"].astype(dtype))),
        "layer_norm": (lambda: decode.layer_norm(a["x"], a["ln_scale"], a["ln_bias"], ln_eps=LN_EPS, out_dtype=dtype,
                                                 interpret=True),
                       lambda: decode.layer_norm_reference(a["x"], a["ln_scale"], a["ln_bias"], ln_eps=LN_EPS,
                                                           out_dtype=dtype)),
    }
    for name, (kernel, reference) in runs.items():
        want = jax.tree.leaves(kernel())
        with jax.enable_x64(True):
            got = jax.tree.leaves(kernel())
        for i, (g, w_, r) in enumerate(zip(got, want, jax.tree.leaves(reference()))):
            msg = f"{name} output {i} seed={seed}"
            assert g.dtype == w_.dtype and g.shape == w_.shape, msg
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w_), err_msg=msg)
            close(g, r, dtype if g.dtype == dtype else jnp.float32, msg)


def test_supported_and_bad_inputs():
    assert decode.supported(1, 1024) and decode.supported(16, 768) and decode.supported(2, 24)
    assert not decode.supported(17, 1024)  # more rows than the kernels keep in registers
    assert not decode.supported(1, 20)  # no power-of-two block of >= 8 columns divides 20
    assert not decode.supported(1, 8 * 17, DecodeBlockSizes(block_in=8))  # 17 blocks of 8 > 16
    a = inputs(0, 1, 24, jnp.float32)
    with pytest.raises(ValueError, match=r"kvr_t has shape \(24, 24\), expected \(72, 24\)"):
        decode.time_mix_in(a["x"], a["ln_scale"], a["ln_bias"], a["prev"], a["time_mix"], a["kvr_t"][:24],
                           a["aa"], a["bb"], a["pp"], a["w_log"], a["u_log"], a["layer"],
                           k_clamp=60.0, log_eps=None, ln_eps=LN_EPS, interpret=True)
    with pytest.raises(ValueError, match=r"B=1, C=20 not supported"):
        decode.mix_out(jnp.zeros((1, 20)), jnp.zeros((20, 20)), jnp.zeros((1, 20)), interpret=True)
    with pytest.raises(ValueError, match="block_in=24 must be a power of two"):
        DecodeBlockSizes(block_in=24)


def test_layer_block_sizes():
    """LayerBlockSizes: one DecodeBlockSizes per kernel of a layer; of() takes None (the
    defaults) or one DecodeBlockSizes for all four; supported() needs all four kernels'."""
    one = DecodeBlockSizes(4, 16)
    assert tuple(decode.LayerBlockSizes.of(one)) == (one,) * 4
    assert decode.LayerBlockSizes.of(None) == decode.LayerBlockSizes()  # batch 1: tuned per kernel
    assert decode.LayerBlockSizes.of(None, 4) == decode.LayerBlockSizes.of(DecodeBlockSizes())  # untimed there
    sizes = decode.LayerBlockSizes(ffn_out=DecodeBlockSizes(block_in=8))
    assert decode.LayerBlockSizes.of(sizes) is sizes
    assert tuple(sizes)[:3] == tuple(decode.LayerBlockSizes())[:3]
    assert decode.supported(1, 1024, decode.LayerBlockSizes())
    assert decode.supported(1, 256, decode.LayerBlockSizes())
    # 32 column blocks of 8 are too many for a kernel: one kernel's blocks refuse the step
    assert not decode.supported(1, 256, decode.LayerBlockSizes(att_out=DecodeBlockSizes(block_in=8)))
    with pytest.raises(TypeError, match="DecodeBlockSizes or LayerBlockSizes, got tuple"):
        decode.LayerBlockSizes.of((2, 256))


def test_register_budget():
    """Vectors loaded up front and one reduction per matrix where they fit in the registers
    (the batch-1 step of L24-D1024 gets both in all three kernels); larger B and blocks fall
    back; the fallback CASES take both fallbacks."""
    plan = lambda B, inp, G, dtype=jnp.bfloat16, **kw: decode._plan(  # noqa: E731
        B, 1024, inp, G, dtype, DecodeBlockSizes(**kw), False)
    wide = dict(block_out=4, block_in=512)
    for inp, G in ((1024, 3), (1024, 5), (1024, 1), (4096, 1)):
        for dtype in (jnp.bfloat16, jnp.float32):
            assert plan(1, inp, G, dtype).acc_2d and plan(1, inp, G, dtype).early, (inp, G, dtype)
        assert not plan(16, inp, G, **wide).acc_2d, (inp, G)
    assert not plan(16, 1024, 5).early
    # float32 weights in wider blocks: the accumulators no longer fit, the early loads do
    assert plan(1, 1024, 5, jnp.float32, **wide).early and not plan(1, 1024, 5, jnp.float32, **wide).acc_2d
    fallback = lambda B, C, inp, G: decode._plan(B, C, inp, G, jnp.float32, CASES[4][3], False)  # noqa: E731
    assert not fallback(3, 256, 256, 3).early and not fallback(3, 256, 256, 5).acc_2d
    assert fallback(4, 96, 96, 3).early and not fallback(4, 96, 96, 3).acc_2d


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_lowers_to_triton(dtype, monkeypatch, capsys):
    """The three kernels lower to Triton IR for CUDA at L24-D1024's shapes: no scalar select;
    every weight block and every vector block is loaded before the first reduction (a
    reduction's barrier would otherwise leave one memory latency per block);
    one reduction per matrix (two more for the LayerNorm statistics)."""
    B, C = 1, 1024
    a = inputs(0, B, C, dtype)
    a["prev"], a["aa"], a["bb"], a["pp"] = (jnp.zeros((24 * B, C)),) * 4
    kw = dict(monkeypatch=monkeypatch, capsys=capsys, kernel_module="pallas_kernels.decode")
    tm = lambda *x, **k: decode.time_mix_in(*x, k_clamp=60.0, log_eps=math.log(1e-9), ln_eps=LN_EPS, **k)  # noqa: E731
    cm = lambda *x: decode.channel_mix_in(*x, ln_eps=LN_EPS)  # noqa: E731
    u4, w4 = jnp.zeros((B, 4 * C), dtype), jnp.zeros((C, 4 * C), dtype)
    bo, bi = DecodeBlockSizes().block_out, DecodeBlockSizes().block_in
    nb = C // bi
    n_reduce = lambda inp, G: (  # noqa: E731 - one per matrix, or per matrix and column block
        1 if decode._plan(B, C, inp, G, dtype, None, False).acc_2d else inp // bi) * G + (2 if G > 1 else 0)
    cases = [  # (function, args, weight blocks, vector blocks, reductions)
        (tm, [a[k] for k in ("x", "ln_scale", "ln_bias", "prev", "time_mix", "kvr_t", "aa", "bb", "pp",
                             "w_log", "u_log", "layer")], 3 * nb, 5 * nb, n_reduce(C, 3)),
        (cm, [a[k] for k in ("x", "ln_scale", "ln_bias", "prev", "time_mix", "kr_t", "layer")], 5 * nb, 5 * nb,
         n_reduce(C, 5)),
        (decode.mix_out, [u4, w4, a["x"], a["x"].astype(dtype)], 4 * nb, 4 * nb, n_reduce(4 * C, 1)),
        # the first layer's time mix reading its rows of the embedding table (token=)
        (lambda t, i, *x: tm(t, *x, token=i), [jnp.zeros((50277, C), dtype), jnp.zeros((B,), jnp.int32)]
         + [a[k] for k in ("ln_scale", "ln_bias", "prev", "time_mix", "kvr_t", "aa", "bb", "pp", "w_log", "u_log",
                           "layer")], 3 * nb, 5 * nb, n_reduce(C, 3)),
    ]
    assert n_reduce(C, 5) == 2 + 5  # at the defaults, B = 1: one reduction per matrix, both dtypes
    for fn, args, n_weight_blocks, n_vector_blocks, n_reduce in cases:
        ir = lower_to_triton_ir(fn, args, **kw)
        assert_no_scalar_select(ir)
        body = ir[ir.index("tt.func"):]
        first_reduce = body.index("tt.reduce")
        # weight blocks are the 2-D loads ([bo, bi])
        loads = re.findall(rf"tt\.load[^\n]*tensor<{bo}x{bi}x", body[:first_reduce])
        assert len(loads) >= n_weight_blocks, (fn, len(loads))
        # ... and the vectors' column blocks (x, prev, ln scale and bias, time_mix) go out with them
        # (the embedding table's rows: [1, bi] loads)
        loads = re.findall(rf"tt\.load[^\n]*tensor<(?:1x)?{bi}x", body[:first_reduce])
        assert len(loads) >= n_vector_blocks, (fn, len(loads))
        # one reduction per matrix (and two for the LayerNorm), not per column block
        assert body.count('"tt.reduce"(') == n_reduce, (fn, body.count('"tt.reduce"('))
    # the final LayerNorm: one program, two reductions (its statistics), no scalar select
    ir = lower_to_triton_ir(lambda *x: decode.layer_norm(*x, ln_eps=LN_EPS, out_dtype=dtype),
                            [a["x"], a["ln_scale"], a["ln_bias"]], **kw)
    assert_no_scalar_select(ir)
    assert ir[ir.index("tt.func"):].count('"tt.reduce"(') == 2


@pytest.mark.slow
def test_weight_loads_carry_the_eviction_hint(seed, monkeypatch, capsys):
    """DecodeBlockSizes.eviction_policy: in the Triton IR every [bo, bi] weight load of the three
    kernels carries the L2 hint and no other load does (the vectors and the state must stay in
    the L2 between tokens: rwkv2_jax.generation.step.DecodeOptions.stream_weights); in interpret
    mode the hint changes nothing. Any other policy is a one-line error."""
    B, C, dtype = 1, 256, jnp.bfloat16
    a = inputs(seed, B, C, dtype)
    hint = DecodeBlockSizes(eviction_policy="evict_first")
    bo, bi = hint.block_out, hint.block_in
    tm = lambda *x, **k: decode.time_mix_in(*x, k_clamp=60.0, log_eps=None, ln_eps=LN_EPS, **k)  # noqa: E731
    cm = lambda *x, **k: decode.channel_mix_in(*x, ln_eps=LN_EPS, **k)  # noqa: E731
    u4 = jnp.asarray(np.random.default_rng(seed).normal(size=(B, 4 * C)), dtype)
    w4 = jnp.asarray(np.random.default_rng(seed + 1).normal(size=(C, 4 * C)) / 32, dtype)
    cases = [
        (tm, [a[k] for k in ("x", "ln_scale", "ln_bias", "prev", "time_mix", "kvr_t", "aa", "bb", "pp",
                             "w_log", "u_log", "layer")]),
        (cm, [a[k] for k in ("x", "ln_scale", "ln_bias", "prev", "time_mix", "kr_t", "layer")]),
        (decode.mix_out, [u4, w4, a["x"], a["x"]]),
    ]
    for fn, args in cases:
        plain, hinted = (fn(*args, blocks=b, interpret=True) for b in (None, hint))
        for p, h in zip(jax.tree.leaves(plain), jax.tree.leaves(hinted)):
            np.testing.assert_array_equal(np.asarray(p), np.asarray(h))
        ir = lower_to_triton_ir(lambda *x: fn(*x, blocks=hint), args, monkeypatch=monkeypatch, capsys=capsys,
                                kernel_module="pallas_kernels.decode")
        loads = re.findall(r"tt\.load [^\n]*", ir[ir.index("tt.func"):])
        weights = [ln for ln in loads if re.search(rf"tensor<{bo}x{bi}x!tt\.ptr<bf16>>", ln)]
        assert weights and all("evictionPolicy = evict_first" in ln for ln in weights), weights[:2]
        others = [ln for ln in loads if ln not in weights]
        assert others and not any("evictionPolicy" in ln for ln in others), [ln for ln in others if "evict" in ln][:2]
    for bad in ("evict_all", "evict_last"):
        with pytest.raises(ValueError, match=f"eviction_policy='{bad}' must be None or 'evict_first'"):
            DecodeBlockSizes(eviction_policy=bad)
