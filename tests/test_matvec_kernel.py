"""The Pallas matvec kernel (pallas_kernels.matvec), run by the Pallas interpreter on CPU.

Checked against the plain-JAX reference (`matvec_reference`) and against float64 numpy on
fresh random inputs every run (the seed is in every failure message). Shapes are chosen so
that every path runs: out and in multiples of no block, a ragged last row block, a ragged
`in` tail, split-K (with and without a tail), static loops unrolled or not, the tensor-core
("dot") path, and bf16 / float32 weights and outputs. A last test lowers the kernel to
Triton IR for CUDA, which interpret mode cannot check.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.matvec import MAX_BATCH, MatvecBlockSizes, _make_plan, matvec, matvec_reference
from tests.triton_ir import assert_no_scalar_select, lower_to_triton_ir

# Tiny blocks so that small shapes still split `in` (16 columns a block, split while fewer
# than 64 row blocks).
SMALL = MatvecBlockSizes(block_out=8, block_in=16, min_programs=64)
# 64 blocks of `in` in one program: the static loop too long to unroll (lax.fori_loop).
LONG_LOOP = MatvecBlockSizes(block_in=64, min_programs=1)
# Every split a single block: the dynamic loop of a split with zero iterations.
ONE_BLOCK_SPLITS = MatvecBlockSizes(block_in=64, min_programs=1024, min_split_blocks=1)


def make_inputs(seed, B, out, inp, w_dtype, x_dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(0, 1, (B, inp)), x_dtype)
    w = jnp.asarray(rng.normal(0, 1, (out, inp)) / np.sqrt(inp), w_dtype)
    return x, w


def check_close(y, x, w, out_dtype, msg):
    """|y - exact| <= 1e-5 * sum_i |x_i w_i| (+ out_dtype's rounding), per element.

    "exact" is the float64 product of x rounded to w's dtype (as the kernel defines it) and
    w. Float32 accumulation in any order is within ~n*eps*sum|x||w| in the worst case and
    ~sqrt(n)*eps*|partial sums| typically (seen: < 2e-7 * sum|x||w| for in <= 4096); a
    missing or doubled column or block is off by ~sum|x||w| / in >= 2.4e-4 of it.
    """
    xr = np.asarray(x.astype(w.dtype), np.float64)
    w64 = np.asarray(w, np.float64)
    exact, scale = xr @ w64.T, np.abs(xr) @ np.abs(w64).T
    tol = 1e-5 * scale + 1e-30
    if jnp.dtype(out_dtype) != jnp.float32:  # one rounding to out_dtype at the end
        tol = tol + np.abs(exact) * float(jnp.finfo(out_dtype).eps)
    y = np.asarray(y.astype(jnp.float32), np.float64)
    assert np.all(np.isfinite(y)), f"non-finite values {msg}"
    ratio = np.abs(y - exact) / tol
    worst = np.unravel_index(np.argmax(ratio), ratio.shape)
    assert ratio[worst] <= 1, (f"error {abs(y - exact)[worst]:.3g} > tol {tol[worst]:.3g} at "
                               f"{worst} (sum|x||w| {scale[worst]:.3g}) {msg}")


CASES = [
    # (B, out, in, weight dtype, block sizes); comments: the path it takes by default.
    pytest.param(1, 3, 5, jnp.float32, None, id="1x3x5-f32"),  # bi=4, tail of 1
    pytest.param(2, 50, 70, jnp.bfloat16, None, id="2x50x70-bf16"),  # ragged rows and tail
    pytest.param(5, 50, 70, jnp.float32, SMALL, id="5x50x70-f32-splitK-tail"),
    pytest.param(2, 257, 1000, jnp.bfloat16, None, id="2x257x1000-bf16"),
    pytest.param(3, 40, 117, jnp.bfloat16, SMALL, id="3x40x117-bf16-uneven-splits-tail"),
    pytest.param(1, 300, 4096, jnp.bfloat16, None, id="1x300x4096-bf16-splitK"),
    pytest.param(5, 300, 4096, jnp.float32, None, id="5x300x4096-f32-splitK"),
    pytest.param(1, 64, 768, jnp.bfloat16, None, id="1x64x768-bf16-bi256"),  # no tail block
    pytest.param(2, 37, 4096, jnp.bfloat16, LONG_LOOP, id="2x37x4096-bf16-fori"),
    pytest.param(1, 37, 1000, jnp.float32, ONE_BLOCK_SPLITS, id="1x37x1000-f32-1blocksplits"),
    pytest.param(12, 40, 100, jnp.bfloat16, None, id="12x40x100-bf16-dot"),
    pytest.param(16, 33, 768, jnp.bfloat16, SMALL, id="16x33x768-bf16-dot-splitK"),
    pytest.param(9, 20, 1000, jnp.float16, None, id="9x20x1000-f16-dot-tail"),
    pytest.param(12, 40, 100, jnp.float32, None, id="12x40x100-f32-fma"),  # dot is 16-bit only
]


@pytest.mark.parametrize("B,out,inp,w_dtype,blocks", CASES)
def test_kernel_matches_reference_and_float64(seed, B, out, inp, w_dtype, blocks):
    x, w = make_inputs(seed, B, out, inp, w_dtype)
    plan = _make_plan(B, out, inp, w_dtype, blocks=blocks or MatvecBlockSizes(), interpret=True)
    msg = f"seed={seed} {plan}"
    # Output in float32 (the accumulator as it is) and in the default dtype (w's).
    for out_dtype in (jnp.float32, None):
        y = matvec(x, w, out_dtype=out_dtype, block_sizes=blocks, interpret=True)
        ref = matvec_reference(x, w, out_dtype=out_dtype)
        want = jnp.dtype(w_dtype if out_dtype is None else out_dtype)
        assert y.shape == (B, out) and y.dtype == want, (y.shape, y.dtype, msg)
        check_close(y, x, w, want, msg)
        check_close(ref, x, w, want, "(the reference itself) " + msg)


def test_paths_are_exercised():
    """The cases above take the paths their ids claim (guards against a plan change)."""
    plan = functools.partial(_make_plan, interpret=True)
    assert plan(5, 50, 70, jnp.float32, blocks=SMALL).n_split > 1
    assert plan(5, 50, 70, jnp.float32, blocks=SMALL).tail
    p = plan(3, 40, 117, jnp.bfloat16, blocks=SMALL)  # splits of 3, 3 and 1 blocks + the tail
    assert (p.n_full, p.n_split, p.bps, p.tail) == (7, 3, 3, True)
    p = plan(1, 300, 4096, jnp.bfloat16, blocks=MatvecBlockSizes())
    assert (p.n_split, p.tail, p.dot) == (4, False, False)
    p = plan(1, 64, 768, jnp.bfloat16, blocks=MatvecBlockSizes())
    assert (p.bi, p.tail) == (256, False)
    assert plan(2, 37, 4096, jnp.bfloat16, blocks=LONG_LOOP).n_full == 64
    p = plan(1, 37, 1000, jnp.float32, blocks=ONE_BLOCK_SPLITS)
    assert (p.bps, p.n_split, p.tail) == (1, 15, True)
    assert plan(12, 40, 100, jnp.bfloat16, blocks=MatvecBlockSizes()).dot
    assert plan(16, 33, 768, jnp.bfloat16, blocks=SMALL).n_split > 1
    assert not plan(12, 40, 100, jnp.float32, blocks=MatvecBlockSizes()).dot
    # The decode shapes on a GPU: in=1024 never split, out=1024 x in=4096 split 4 ways.
    for out in (1024, 3072, 5120, 50277):
        assert plan(1, out, 1024, jnp.bfloat16, blocks=MatvecBlockSizes()).n_split == 1
    assert plan(1, 1024, 4096, jnp.bfloat16, blocks=MatvecBlockSizes()).n_split == 4


def test_input_dtypes_and_jit(seed):
    """x in any float dtype is rounded to w's dtype first; out_dtype may differ from both."""
    x, w = make_inputs(seed, 3, 45, 130, jnp.bfloat16)
    f = jax.jit(functools.partial(matvec, interpret=True, out_dtype=jnp.float32))
    y = f(x, w)  # float32 x, bf16 w: x rounded to bf16
    check_close(y, x, w, jnp.float32, f"seed={seed}")
    np.testing.assert_array_equal(y, f(x.astype(jnp.bfloat16), w))
    w32 = w.astype(jnp.float32)
    y = matvec(x.astype(jnp.bfloat16), w32, out_dtype=jnp.bfloat16, interpret=True)
    assert y.dtype == jnp.bfloat16
    check_close(y, x.astype(jnp.bfloat16), w32, jnp.bfloat16, f"seed={seed}")


@pytest.mark.parametrize("B,blocks", [(1, None), (2, SMALL), (12, None)], ids=["fma", "splitK", "dot"])
def test_round_dtype(seed, B, blocks):
    """round_dtype=bf16 with float32 output: the bf16 result widened, bit for bit (the same
    plan, so the same order of additions), and the reference's."""
    x, w = make_inputs(seed, B, 50, 300, jnp.bfloat16)
    kw = dict(block_sizes=blocks, interpret=True)
    y = matvec(x, w, out_dtype=jnp.float32, round_dtype=jnp.bfloat16, **kw)
    assert y.dtype == jnp.float32
    np.testing.assert_array_equal(y, matvec(x, w, out_dtype=jnp.bfloat16, **kw).astype(jnp.float32),
                                  err_msg=f"seed={seed}")
    ref = matvec_reference(x, w, out_dtype=jnp.float32, round_dtype=jnp.bfloat16)
    assert ref.dtype == jnp.float32
    np.testing.assert_array_equal(ref, matvec_reference(x, w).astype(jnp.float32))
    check_close(y, x, w, jnp.bfloat16, f"seed={seed}")
    assert not np.array_equal(np.asarray(y), np.asarray(matvec(x, w, out_dtype=jnp.float32, **kw))), \
        f"rounding to bf16 changed nothing (seed={seed})"


@pytest.mark.parametrize("B,blocks", [(2, None), (5, SMALL), (12, None)], ids=["fma", "splitK", "dot"])
def test_under_x64(seed, B, blocks):
    """With jax_enable_x64 on (Python ints become int64 there) the kernel runs and gives the same
    output, dtype included, as with it off."""
    x, w = make_inputs(seed, B, 50, 70, jnp.bfloat16)
    run = lambda: matvec(x, w, out_dtype=jnp.float32, round_dtype=jnp.bfloat16, block_sizes=blocks, interpret=True)  # noqa: E731
    want = run()
    with jax.enable_x64(True):
        got = run()
    assert got.dtype == want.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want), err_msg=f"seed={seed}")
    check_close(got, x, w, jnp.bfloat16, f"seed={seed}")


def test_rejects_bad_inputs():
    w = jnp.zeros((7, 5), jnp.bfloat16)
    cases = [
        (jnp.zeros((2, 6)), w, r"in dims differ: x\(2, 6\).*w_t\(7, 5\)"),
        (jnp.zeros((5,)), w, r"x must be \[B, in\].*x\(5,\) w_t\(7, 5\)"),
        (jnp.zeros((1, 5)), jnp.zeros((7, 5, 1)), r"x\(1, 5\) w_t\(7, 5, 1\)"),
        (jnp.zeros((MAX_BATCH + 1, 5)), w, rf"B={MAX_BATCH + 1} of x\({MAX_BATCH + 1}, 5\)"),
        (jnp.zeros((0, 5)), w, r"B=0"),
        (jnp.zeros((1, 5)), jnp.zeros((7, 5), jnp.int8), "dtype"),
    ]
    for x, w_t, pattern in cases:
        with pytest.raises(ValueError, match=pattern) as info:
            matvec(x, w_t, interpret=True)
        assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="power of two"):
        MatvecBlockSizes(block_in=24)


LOWER_CASES = [
    # (B, out, in, weight dtype, kernel uses tl.dot, loads may be masked)
    pytest.param(1, 3072, 1024, jnp.bfloat16, False, False, id="bf16-1x3072x1024"),
    pytest.param(1, 50277, 1000, jnp.bfloat16, False, True, id="bf16-ragged-head"),
    pytest.param(2, 257, 768, jnp.float32, False, True, id="f32-ragged"),
    pytest.param(1, 1024, 4096, jnp.bfloat16, False, False, id="bf16-splitK"),
    pytest.param(1, 300, 4100, jnp.float32, False, True, id="f32-splitK-tail"),
    pytest.param(12, 300, 4100, jnp.bfloat16, True, True, id="bf16-dot-splitK-tail"),
]


@pytest.mark.parametrize("B,out,inp,w_dtype,dot,masked", LOWER_CASES)
def test_lowers_to_triton(B, out, inp, w_dtype, dot, masked, monkeypatch, capsys):
    """Lower the kernel to Triton IR for CUDA (works without a GPU) and read the IR: one
    kernel, no i1 select of scalar literals (see pallas_kernels/wkv.py), tl.dot exactly on
    the tensor-core path, and no masked weight load where out and in divide the blocks."""
    x, w = jnp.zeros((B, inp), jnp.float32), jnp.zeros((out, inp), w_dtype)
    ir = lower_to_triton_ir(matvec, (x, w), kernel_module="pallas_kernels.matvec",
                            monkeypatch=monkeypatch, capsys=capsys)
    assert ir.count("tt.func public") == 1, "expected 1 kernel"
    assert_no_scalar_select(ir)
    assert ("tt.dot" in ir) == dot
    # tt.load %ptr : ... is unmasked; tt.load %ptr, %mask, %other : ... is masked.
    masked_loads = re.findall(r"tt\.load %\w+, %\w+", ir)
    assert bool(masked_loads) == masked, masked_loads[:3]
    # Stores past the last row would write outside the output on a GPU (interpret mode
    # drops them): with ragged rows every store must carry a mask (tt.store %ptr, %v, %mask).
    plan = _make_plan(B, out, inp, w_dtype, blocks=MatvecBlockSizes(), interpret=False)
    stores = re.findall(r"tt\.store [^:]*:", ir)
    assert stores
    if out % plan.bo:
        assert all(st.count("%") == 3 for st in stores), stores
