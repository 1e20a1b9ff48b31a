"""Pallas GPU kernel for small-batch matrix products: y[B, out] = x[B, in] @ w_t[out, in]^T.

At T = 1 a matrix product of the model is a few vectors times a matrix, and its time is the
time to read the matrix once. This kernel streams the weights, stored [out, in] with `in`
contiguous as the decode step keeps them, exactly once, for B = 1 to MAX_BATCH (16) rows.
Where it pays off (the [C, 4C] channel-mix value product: `in` split over programs; the
head with an L2 hint) is measured by `bench/matvec.py`.

Numerics (the same function as `matvec_reference` below): x is rounded to w_t's dtype first,
as a matmul in that dtype does; each product is formed and summed in float32, and the sum is
cast to out_dtype (default w_t.dtype) once at the end. Only the order of the float32
additions differs from XLA's (tests/test_matvec_kernel.py). Inference only: no VJP.

Lowering: Pallas Triton, as pallas_kernels/wkv.py (every block a power of two in each
dimension; no scalar-literal `jnp.where`, masks are comparisons and `&` only).

Algorithm. Program (i, s) of an (out blocks, splits) grid owns `bo` output rows and walks a
range of `in` in blocks of `bi` columns, loading each [bo, bi] weight block once:

* Each iteration issues the loads of block j + 1 before computing with block j (prefetch in
  the loop carry), so two blocks per program are in flight. The last block is peeled off, so
  no prefetch runs past the range; static loops of at most MAX_UNROLL blocks are unrolled.
* Ragged edges without copying the weights: rows past `out` are masked in the loads and
  stores. The `in % bi` tail is one extra block taken as the last bi columns [in - bi, in)
  with the columns already covered masked off, so nothing is read out of bounds and x needs
  no padding. `bi` is halved (at most twice) when that makes it divide `in` (768 -> 256).
* Products: "fma" (default) converts the block to float32 and, per batch row, sums w * x
  over the columns; "dot" (B >= dot_min_batch with 16-bit weights) pads x to 16 rows and uses
  `tl.dot` on tensor cores, where 16 FMAs per 2-byte weight would outrun the CUDA cores.
* Split-K: when cdiv(out, bo) programs are fewer than `min_programs`, the full blocks of `in`
  are split over several programs per row block, which write float32 partials
  [n_split, B, out] that one small XLA reduction sums.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

__all__ = ["MAX_BATCH", "MatvecBlockSizes", "matvec", "matvec_reference"]

# Largest supported batch: the "fma" path keeps B accumulators and B prefetched x rows in
# registers, the "dot" path pads x to 16 rows (tl.dot's smallest M). Larger batches are
# matrix products, which XLA's cuBLAS/Triton GEMMs already run near peak.
MAX_BATCH = 16
_DOT_ROWS = 16  # x rows in the "dot" path: tl.dot needs every dimension >= 16
_WEIGHT_DTYPES = (jnp.bfloat16, jnp.float16, jnp.float32)
# Loops over at most this many blocks (static bounds) are unrolled: in = 1024 or 4096 with
# block_in 512 become straight-line code, so the loads of all blocks issue back to back.
MAX_UNROLL = 8


# L2 hints a weight load may carry (Triton's eviction_policy; None: none). "evict_first" lets
# weights that are read once per token stream past the L2 without evicting what stays.
EVICTION_POLICIES = (None, "evict_first")


def check_eviction_policy(owner: str, policy) -> None:
    """A one-line ValueError unless policy is one of EVICTION_POLICIES (also pallas_kernels.decode's)."""
    if policy not in EVICTION_POLICIES:
        raise ValueError(f"{owner}: eviction_policy={policy!r} must be None or 'evict_first'")


@dataclasses.dataclass(frozen=True)
class MatvecBlockSizes:
    """Launch parameters of the matvec kernel (all static; none needs to divide the shape).

    block_out:        output rows per program, a power of two (the "dot" path uses >= 16).
    block_in:         columns per loop step, a power of two (reduced for small `in`, and
                      halved at most twice when that divides `in` exactly).
    num_warps:        Triton warps per program.
    num_stages:       Triton software-pipelining depth (the kernel prefetches one block
                      itself, so 1 is the default).
    min_programs:     split `in` (split-K) while cdiv(out, block_out) is below this...
    min_split_blocks: ...but give every split at least this many full `in` blocks.
    dot_min_batch:    B from which 16-bit weights use tensor cores (tl.dot) instead of
                      CUDA-core FMAs; MAX_BATCH + 1 disables the "dot" path.
    eviction_policy:  L2 hint of the weight loads: None or "evict_first".
    """

    # A [8, 512] bf16 block is 8 KB (one 16-byte vector load per thread, 4 per thread with 4
    # warps), two in flight per program; the head (out=50277) gives 6,285 programs. min_programs
    # 512 (~4 per SM of an H100/H200): out=1024, in=4096 gets 4 splits of 1,024 columns; in=1024
    # is never split (2 blocks: nothing to gain against the extra reduction's launch).
    # `bench/matvec.py --sweep` times the alternatives.
    block_out: int = 8
    block_in: int = 512
    num_warps: int = 4
    num_stages: int = 1
    min_programs: int = 512
    min_split_blocks: int = 2
    dot_min_batch: int = 9
    eviction_policy: str | None = None

    def __post_init__(self):
        for name in ("block_out", "block_in"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"MatvecBlockSizes: {name}={v} must be a power of two")
        if min(self.num_warps, self.num_stages, self.min_programs, self.min_split_blocks) < 1:
            raise ValueError(f"MatvecBlockSizes: positive sizes needed, got {self}")
        check_eviction_policy("MatvecBlockSizes", self.eviction_policy)


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about one call."""

    B: int  # batch rows of the output
    out: int
    inp: int  # `in` (a Python keyword)
    bo: int  # output rows per program
    bi: int  # columns per block
    n_full: int  # full column blocks: in // bi
    tail: bool  # a ragged last block of in % bi columns
    n_split: int  # programs per row block (split-K)
    bps: int  # full blocks per split (the last split may have fewer, plus the tail)
    dot: bool  # tensor-core path
    num_warps: int
    num_stages: int
    eviction_policy: str | None
    interpret: bool
    round_dtype: jnp.dtype | None = None  # the sums rounded to this dtype before the cast to out_dtype

    @property
    def n_ob(self) -> int:  # output row blocks
        return -(-self.out // self.bo)

    @property
    def x_rows(self) -> int:  # rows of x in the kernel (and of its output)
        return _DOT_ROWS if self.dot else self.B

    @property
    def grid(self):
        return (self.n_ob, self.n_split) if self.n_split > 1 else (self.n_ob,)


def _prev_pow2(n: int) -> int:
    return 1 << (n.bit_length() - 1)


def _make_plan(B, out, inp, w_dtype, *, blocks: MatvecBlockSizes, interpret) -> _Plan:
    # tl.dot needs every dimension >= 16 (bi <= in below, so in >= 16).
    dot = B >= blocks.dot_min_batch and jnp.dtype(w_dtype).itemsize == 2 and inp >= 16
    bo = min(blocks.block_out, 1 << (out - 1).bit_length())  # no wider than out rounded up
    bo = max(bo, 16) if dot else bo
    # bi <= in: every block, the ragged tail's included, starts inside the matrix.
    bi = min(max(blocks.block_in, 16) if dot else blocks.block_in, _prev_pow2(inp))
    for _ in range(2):  # 768 -> 256: no masked tail block
        if inp % bi and inp % (bi // 2) == 0 and bi // 2 >= 16:
            bi //= 2
    n_full, tail = inp // bi, inp % bi != 0
    n_ob = -(-out // bo)
    n_split, bps = 1, n_full
    if n_ob < blocks.min_programs and n_full >= 2 * blocks.min_split_blocks:
        n_split = min(-(-blocks.min_programs // n_ob), n_full // blocks.min_split_blocks)
        bps = -(-n_full // n_split)
        n_split = -(-n_full // bps)  # every split gets >= 1 full block
    return _Plan(
        B=B, out=out, inp=inp, bo=bo, bi=bi, n_full=n_full, tail=tail, n_split=n_split,
        bps=bps, dot=dot, num_warps=blocks.num_warps, num_stages=blocks.num_stages,
        eviction_policy=blocks.eviction_policy, interpret=interpret,
    )


# ----------------------------------------------------------------------------------------
# The kernel.


def _and(a, b):
    """a & b where either may be None (no mask)."""
    if a is None:
        return b
    return a if b is None else a & b


def _matvec_kernel(x_ref, w_ref, o_ref, *, plan: _Plan):
    """x_ref [x_rows, in] and w_ref [out, in] in w's dtype,
    o_ref [x_rows, out] (n_split == 1, out_dtype) or [n_split, x_rows, out] (float32
    partials). Every slice start is traced or in bounds (Ref.at checks static ones)."""
    bo, bi, f32 = plan.bo, plan.bi, jnp.float32
    r0 = pl.multiple_of(pl.program_id(0) * bo, bo)
    rows = pl.ds(r0, bo)
    split = pl.program_id(1) if plan.n_split > 1 else None

    # Rows past `out` (only in the last row block; static whether any exist).
    row_ok = row_ok_t = None
    if plan.out % bo:
        row_ok = (r0 + lax.broadcasted_iota(jnp.int32, (bo, 1), 0)) < plan.out  # [bo, 1]
        row_ok_t = (r0 + lax.broadcasted_iota(jnp.int32, (1, bo), 1)) < plan.out  # [1, bo]

    def load_w(k0, col_ok=None):
        """w[rows, k0:k0+bi] as [bo, bi] in w's dtype, 0 where masked."""
        ref = w_ref.at[rows, pl.ds(k0, bi)]
        mask = _and(row_ok, col_ok)
        if mask is None:
            return plgpu.load(ref, eviction_policy=plan.eviction_policy)
        mask = jnp.broadcast_to(mask, (bo, bi))
        return plgpu.load(ref, mask=mask, other=0, eviction_policy=plan.eviction_policy)

    def load_x(k0):
        """x[:, k0:k0+bi]: one [16, bi] block ("dot") or B rows [bi] ("fma"); never masked."""
        if plan.dot:
            return x_ref[:, pl.ds(k0, bi)]
        return tuple(x_ref[b, pl.ds(k0, bi)] for b in range(plan.B))

    def accumulate(acc, w, xs):
        if plan.dot:  # [16, bi] x [bo, bi]^T -> [16, bo] on tensor cores, float32 accumulator
            return acc + lax.dot_general(xs, w, (((1,), (1,)), ((), ())),
                                         precision=lax.Precision.HIGHEST,
                                         preferred_element_type=f32)
        # x stays in w's dtype until here: a thread holds the x values of all its columns
        # (8 per block and b), prefetched too, so float32 x would cost 2 * 8 * B registers.
        w = w.astype(f32)
        return tuple(a + jnp.sum(w * xb.astype(f32)[None, :], axis=1) for a, xb in zip(acc, xs))

    if plan.dot:
        acc = jnp.zeros((plan.x_rows, bo), f32)
    else:
        acc = tuple(jnp.zeros((bo,), f32) for _ in range(plan.B))

    def col(j):  # first column of block j (the hint only on traced values)
        return j * bi if isinstance(j, int) else pl.multiple_of(j * bi, bi)

    if plan.n_full:
        # Full blocks [j0, j1) of this split; block j + 1 is loaded while j is computed.
        if split is None:
            j0, j1 = 0, plan.n_full
        else:
            j0 = split * plan.bps
            j1 = jnp.minimum(j0 + plan.bps, plan.n_full)

        def body(j, carry):
            acc, (w, xs) = carry
            nxt = (load_w(col(j + 1)), load_x(col(j + 1)))
            return accumulate(acc, w, xs), nxt

        carry = (acc, (load_w(col(j0)), load_x(col(j0))))
        if isinstance(j1, int) and j1 - 1 - j0 <= MAX_UNROLL:  # short static range: unrolled
            for j in range(j0, j1 - 1):
                carry = body(j, carry)
        else:
            carry = lax.fori_loop(j0, j1 - 1, body, carry)
        acc, (w, xs) = carry
        acc = accumulate(acc, w, xs)  # block j1 - 1, peeled: no prefetch past the range
    if plan.tail:
        # The ragged tail, as the last bi columns [in - bi, in) with the columns the full
        # blocks already covered masked off: in bounds for x and w, so x needs no padding.
        # Only the last split adds it (the others load nothing: their mask is all False).
        k0 = plan.inp - bi
        col_ok = (k0 + lax.broadcasted_iota(jnp.int32, (1, bi), 1)) >= plan.n_full * bi  # [1, bi]
        if split is not None:
            col_ok = col_ok & (split == plan.n_split - 1)
        acc = accumulate(acc, load_w(k0, col_ok), load_x(k0))

    # Stores: out_dtype directly (through round_dtype), or float32 partials of this split.
    lead = () if split is None else (split,)
    if split is None and plan.round_dtype is not None:
        acc = acc.astype(plan.round_dtype) if plan.dot else tuple(a.astype(plan.round_dtype) for a in acc)
    # The interpreter's plgpu.store hands the slice starts to lax.dynamic_slice as they are,
    # which refuses a static start (int64 under jax_enable_x64) beside the int32 program ids.
    start = (lambda i: jnp.int32(i)) if plan.interpret else (lambda i: i)
    if plan.dot:  # acc [16, bo]; the caller drops the rows of x's padding
        mask = None if row_ok_t is None else jnp.broadcast_to(row_ok_t, (plan.x_rows, bo))
        plgpu.store(o_ref.at[(*lead, pl.ds(start(0), plan.x_rows), rows)], acc.astype(o_ref.dtype), mask=mask)
    else:
        # One [1, bo] row per b (a static integer index in a store does not discharge in
        # jax 0.10's interpreter: pl.ds(b, 1) instead).
        for b in range(plan.B):
            plgpu.store(o_ref.at[(*lead, pl.ds(start(b), 1), rows)], acc[b][None, :].astype(o_ref.dtype),
                        mask=row_ok_t)


def _call(plan: _Plan, x, w_t, out_dtype):
    if plan.n_split == 1:
        out_shape = jax.ShapeDtypeStruct((plan.x_rows, plan.out), out_dtype)
    else:
        out_shape = jax.ShapeDtypeStruct((plan.n_split, plan.x_rows, plan.out), jnp.float32)
    y = pl.pallas_call(
        functools.partial(_matvec_kernel, plan=plan),
        out_shape=out_shape,
        grid=plan.grid,
        interpret=plan.interpret,
        name="matvec",
        compiler_params=plgpu.CompilerParams(num_warps=plan.num_warps, num_stages=plan.num_stages),
    )(x, w_t)
    if plan.n_split > 1:
        y = y.sum(0)  # one small XLA reduction of the float32 partials
        y = (y if plan.round_dtype is None else y.astype(plan.round_dtype)).astype(out_dtype)
    return y[:plan.B]  # "dot": drop x's padding rows (fuses into the consumer under jit)


# ----------------------------------------------------------------------------------------
# Public API.


def _check(x, w_t):
    xs, ws = jnp.shape(x), jnp.shape(w_t)
    if len(xs) != 2 or len(ws) != 2:
        raise ValueError(f"matvec: x must be [B, in] and w_t [out, in], got x{xs} w_t{ws}")
    if xs[1] != ws[1]:
        raise ValueError(f"matvec: in dims differ: x{xs} [B, in] vs w_t{ws} [out, in]")
    if not 1 <= xs[0] <= MAX_BATCH:
        raise ValueError(f"matvec: batch B={xs[0]} of x{xs} must be in 1..{MAX_BATCH} "
                         "(use lax.dot_general for larger batches)")
    if min(ws) < 1:
        raise ValueError(f"matvec: empty matrix w_t{ws}")
    if jnp.dtype(w_t.dtype) not in [jnp.dtype(d) for d in _WEIGHT_DTYPES]:
        raise ValueError(f"matvec: w_t dtype {w_t.dtype} must be bfloat16, float16 or float32")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"matvec: x dtype {x.dtype} must be floating")


def matvec(
    x: jax.Array,  # [B, in], any float dtype; rounded to w_t's dtype
    w_t: jax.Array,  # [out, in] bfloat16, float16 or float32
    *,
    out_dtype=None,
    round_dtype=None,
    block_sizes: MatvecBlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """y [B, out] = x @ w_t^T, float32 accumulation, in out_dtype (default w_t.dtype).
    round_dtype: the sums are rounded to it first (e.g. bfloat16 logits stored as float32,
    what `.astype(jnp.float32)` of a bfloat16 product gives, without that extra pass).

    Same function as `matvec_reference` up to the order of the float32 additions (module
    docstring). 1 <= B <= MAX_BATCH; any out and in (ragged edges are masked inside; the
    weights are never copied or padded). Works under jax.jit; not differentiable (no VJP:
    inference only). interpret=True runs the kernel in the Pallas interpreter (CPU).
    """
    _check(x, w_t)
    out_dtype = jnp.dtype(w_t.dtype if out_dtype is None else out_dtype)
    B, inp = x.shape
    out = w_t.shape[0]
    plan = _make_plan(B, out, inp, w_t.dtype, blocks=block_sizes or MatvecBlockSizes(),
                      interpret=interpret)
    if round_dtype is not None:
        plan = dataclasses.replace(plan, round_dtype=jnp.dtype(round_dtype))
    # x rounded to the weights' dtype, as a matmul in that dtype would; "dot" pads it to 16
    # rows (zeros).
    x = jnp.pad(x.astype(w_t.dtype), ((0, plan.x_rows - B), (0, 0)))
    return _call(plan, x, w_t, out_dtype)


def matvec_reference(x: jax.Array, w_t: jax.Array, out_dtype=None, round_dtype=None) -> jax.Array:
    """Plain-JAX y [B, out] = x @ w_t^T: x rounded to w_t's dtype, products summed in float32
    (HIGHEST precision: no TF32 on GPUs for float32 weights), [rounded to round_dtype,] cast to
    out_dtype (default w_t.dtype). The function `matvec` computes."""
    out_dtype = jnp.dtype(w_t.dtype if out_dtype is None else out_dtype)
    y = lax.dot_general(x.astype(w_t.dtype), w_t, (((1,), (1,)), ((), ())),
                        precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32)
    return (y if round_dtype is None else y.astype(round_dtype)).astype(out_dtype)
