"""Pallas GPU kernels for the decode step of one or two rows: each layer as four kernels.

At T = 1 the RNN step is ~100 small matrix-vector products and ~180 small elementwise
operations per token (L24-D1024), and each kernel costs more in launch and latency than in
the bytes it reads. These kernels fold every elementwise operation of a layer into the
product that consumes or produces it:

    time_mix_in     LayerNorm ln1 -> token-shift mix -> [K; V; R] = W_kvr @ xm
                    -> WKV step (the state updated in place) -> sigmoid(R) * wkv
    mix_out         x_mid = ln1(x) + W_out @ (sigmoid(R) * wkv)
    channel_mix_in  LayerNorm ln2 -> token-shift mix -> [K; R] = W_kr @ xm -> relu(K)^2
    mix_out         x_next = ln2(x_mid) + sigmoid(R) * (W_value @ relu(K)^2)

(an ffnPre block is channel_mix_in with ln1 and mix_out with ln1's output as its base), and
`layer_norm` is the final LayerNorm as one program. The first layer's time_mix_in can read
its rows of the embedding table itself (`token=`).

Each function computes what its plain-JAX `*_reference` below computes (the XLA decode step
of rwkv2_jax.generation.step), with the same roundings: inputs of a product in the weights'
dtype, products summed in float32 and rounded to the weights' dtype once, everything else
float32; only the order of the float32 additions differs (tests/test_decode_kernel.py).

A program of `*_in` owns `block_out` rows of each of the G stacked matrices, so it holds K, V
and R of the same channels and finishes the WKV step (or relu^2) for them itself; a program
of `mix_out` owns `block_out` output rows. A program issues all its loads (weight blocks,
then the vectors of the LayerNorm and the mix) before its first reduction, whose barrier
would otherwise cost one memory latency per later load, and sums each product elementwise
over the column blocks, reducing once per matrix. Both need registers: where the values
would not fit (REG_BUDGET: more rows, float32 weights in wide blocks) the vectors are loaded
where used and each column block is reduced on its own.

The WKV state of every layer ([L * B, C] each) is passed whole with the layer index as a
traced int32, so one compiled kernel serves all layers, and updated in place
(input_output_aliases): a program reads and writes only its own channels.

Lowering: Pallas Triton, as pallas_kernels/wkv.py. Blocks are powers of two dividing C
(`supported`); no scalar-literal `jnp.where` (pallas_kernels/wkv.py, _NO_SCALAR_SELECT).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.matvec import check_eviction_policy
from pallas_kernels.wkv import WKVState, wkv_step

__all__ = ["DecodeBlockSizes", "LayerBlockSizes", "supported", "time_mix_in", "channel_mix_in", "mix_out",
           "layer_norm", "time_mix_in_reference", "channel_mix_in_reference", "mix_out_reference",
           "layer_norm_reference"]

MAX_BATCH = 16  # rows of x: B accumulators per matrix live in registers
MAX_BLOCKS = 64  # column blocks per product (unrolled): 4C / block_in
_MIN_BLOCK = 8
# 32-bit registers per thread (of 255) for the values a program holds through the kernel:
# its weights, plus the vectors loaded up front and the [bo, bi] accumulators where those fit
# (_Plan.early, _Plan.acc_2d). At B = 1, C = 1024, bf16, 2 x 256 blocks: time_mix_in
# 24 + 40 + 12, channel_mix_in 40 + 40 + 20, the value product 32 + 16 + 4; with 4 x 512 blocks
# 48 + 40 + 48, 80 + 40 + 80, 64 + 16 + 16. The rest of the 255 is the kernel's working set.
REG_BUDGET = 200


@dataclasses.dataclass(frozen=True)
class DecodeBlockSizes:
    """Launch parameters (static). block_out and block_in are powers of two, reduced to the
    largest power of two that divides C (4C for mix_out's input) when they do not."""

    block_out: int = 2  # rows per matrix per program: C / block_out programs (512 at C = 1024)
    block_in: int = 256  # columns per block
    num_warps: int = 4
    # L2 cache hint of the weight loads (None or "evict_first": a token's weights stream past
    # the L2 and leave the vectors and the state there); the vectors and the state load plainly.
    eviction_policy: Optional[str] = None

    def __post_init__(self):
        check_eviction_policy("DecodeBlockSizes", self.eviction_policy)
        for name in ("block_out", "block_in"):
            v = getattr(self, name)
            if v < 1 or v & (v - 1):
                raise ValueError(f"DecodeBlockSizes: {name}={v} must be a power of two")
        if self.num_warps < 1:
            raise ValueError(f"DecodeBlockSizes: num_warps={self.num_warps} must be >= 1")


@dataclasses.dataclass(frozen=True)
class LayerBlockSizes:
    """DecodeBlockSizes for each of a layer's four kernels (an ffnPre block's kernels take
    channel_mix_in's and ffn_out's).

    The defaults are the fastest per kernel at L24-D1024, bf16, B = 1 (`bench/decode_kernels.py`
    on an H200): fewer warps for the wide K/R product, one row per program for the output
    product, whole-width column blocks for the value product."""

    time_mix_in: DecodeBlockSizes = DecodeBlockSizes()
    att_out: DecodeBlockSizes = DecodeBlockSizes(block_out=1)
    channel_mix_in: DecodeBlockSizes = DecodeBlockSizes(num_warps=2)
    ffn_out: DecodeBlockSizes = DecodeBlockSizes(block_in=2048)

    @classmethod
    def of(cls, blocks, batch_size: int = 1) -> "LayerBlockSizes":
        """One DecodeBlockSizes -> it for all four kernels. None -> the defaults at batch 1,
        where they were tuned, and DecodeBlockSizes() for all four kernels at more rows (where
        the two-warp channel-mix kernel would not fit its up-front loads in REG_BUDGET)."""
        if blocks is None:
            return cls() if batch_size == 1 else cls.of(DecodeBlockSizes())
        if isinstance(blocks, DecodeBlockSizes):
            return cls(blocks, blocks, blocks, blocks)
        if not isinstance(blocks, cls):
            raise TypeError(f"blocks must be a DecodeBlockSizes or LayerBlockSizes, got {type(blocks).__name__}")
        return blocks

    def __iter__(self):
        return iter((self.time_mix_in, self.att_out, self.channel_mix_in, self.ffn_out))

    def with_eviction_policy(self, policy: Optional[str]) -> "LayerBlockSizes":
        """The same with every kernel's weight loads carrying this L2 hint."""
        return LayerBlockSizes(*(dataclasses.replace(b, eviction_policy=policy) for b in self))


def _pow2_divisor(n: int, cap: int) -> int:
    """The largest power of two <= cap that divides n."""
    d = 1
    while d * 2 <= cap and n % (d * 2) == 0:
        d *= 2
    return d


def supported(B: int, C: int, blocks=None) -> bool:
    """Whether these kernels take a step of B rows and width C (else use the XLA step), with
    `blocks` (a DecodeBlockSizes, or a LayerBlockSizes: all four kernels'; None: defaults)."""
    if isinstance(blocks, LayerBlockSizes):
        return all(supported(B, C, b) for b in blocks)
    blocks = blocks or DecodeBlockSizes()
    return (1 <= B <= MAX_BATCH and _pow2_divisor(C, blocks.block_in) >= _MIN_BLOCK
            and C // _pow2_divisor(C, blocks.block_in) <= MAX_BLOCKS // 4)


@dataclasses.dataclass(frozen=True)
class _Plan:
    B: int
    C: int
    inp: int  # columns of the product
    G: int  # stacked matrices per program (3: K, V, R; 5: four K quarters and R; 1: mix_out)
    bo: int
    bi: int
    dtype: jnp.dtype  # the weights' dtype: inputs and outputs of the products
    num_warps: int
    interpret: bool
    eviction_policy: Optional[str] = None

    @property
    def n_blocks(self) -> int:
        return self.inp // self.bi

    def _regs(self, n: int, itemsize: int = 4) -> float:
        """32-bit registers per thread for n values spread over the program's threads."""
        return n * itemsize / 4 / (32 * self.num_warps)

    @property
    def _weight_regs(self) -> float:
        return self._regs(self.G * self.bo * self.inp, self.dtype.itemsize)

    @property
    def _vector_regs(self) -> float:
        if self.G == 1:  # mix_out: its input vectors u [B, inp], always loaded up front
            return self._regs(self.B * self.inp, self.dtype.itemsize)
        return self._regs((3 + 2 * self.B) * self.C)  # ln scale, bias, time_mix; x, prev [B, C]

    @property
    def early(self) -> bool:
        """Every vector of the LayerNorm and the mix loaded up front (*_in kernels)."""
        return self._weight_regs + self._vector_regs <= REG_BUDGET

    @property
    def acc_2d(self) -> bool:
        """[bo, bi] float32 accumulators per matrix and batch row, reduced once at the end."""
        held = self._weight_regs + (self._vector_regs if self.early or self.G == 1 else 0)
        return held + self._regs(self.G * self.B * self.bo * self.bi) <= REG_BUDGET

    @property
    def grid(self):
        return (self.C // self.bo,)


def _plan(B, C, inp, G, dtype, blocks, interpret) -> _Plan:
    blocks = blocks or DecodeBlockSizes()
    if not supported(B, C, blocks):
        raise ValueError(f"pallas_kernels.decode: B={B}, C={C} not supported (1 <= B <= {MAX_BATCH}, "
                         f"C a multiple of {_MIN_BLOCK}, C / block_in <= {MAX_BLOCKS // 4})")
    return _Plan(B=B, C=C, inp=inp, G=G, bo=_pow2_divisor(C, blocks.block_out),
                 bi=_pow2_divisor(inp, blocks.block_in), dtype=jnp.dtype(dtype),
                 num_warps=blocks.num_warps, interpret=interpret, eviction_policy=blocks.eviction_policy)


def _pallas(kernel, plan: _Plan, name, out_shape, args, aliases=None):
    """pallas_call of kernel(*in_refs, *out_refs, plan=plan) over plan.grid."""
    return pl.pallas_call(
        functools.partial(kernel, plan=plan),
        out_shape=out_shape,
        grid=plan.grid,
        input_output_aliases=aliases or {},
        interpret=plan.interpret,
        name=name,
        compiler_params=plgpu.CompilerParams(num_warps=plan.num_warps, num_stages=1),
    )(*args)


def _round(x, dtype):
    """float32 -> the products' dtype -> float32 (what an XLA product in dtype returns)."""
    return x.astype(dtype).astype(jnp.float32)


def _sigmoid(x):
    return 1.0 / (1.0 + jnp.exp(-x))


# ----------------------------------------------------------------------------------------
# Kernel pieces.


def _x_loader(x_ref, tok_ref):
    """x(b, cols) -> float32 [len(cols)]: row b of x, or with tok_ref (time_mix_in's `token`)
    row token[b] of the embedding table x_ref (the index clamped into the table)."""
    if tok_ref is None:
        return lambda b, cols: x_ref[b, cols]
    last = x_ref.shape[0] - 1
    toks = {}

    def x(b, cols):
        if b not in toks:
            toks[b] = jnp.minimum(jnp.maximum(tok_ref[b], 0), last)
        return x_ref[pl.ds(toks[b], 1), cols].astype(jnp.float32).reshape(-1)
    return x


def _vectors(layer, x, scale_ref, bias_ref, prev_ref, tmix_ref, plan: _Plan):
    """vec(j) -> column block j of (ln scale, ln bias, time_mix as float32, [x[b]], [prev[b]]).
    x: _x_loader's. With plan.early every block is loaded here, so the loads go out with the
    weights' (a reduction's barrier is also a barrier to moving loads: each load issued after
    one adds a memory latency); else each block is loaded where it is used."""
    def load(j):
        cols = pl.ds(j * plan.bi, plan.bi)
        return (scale_ref[cols], bias_ref[cols], tmix_ref[cols].astype(jnp.float32),
                [x(b, cols) for b in range(plan.B)],
                [prev_ref[layer * plan.B + b, cols] for b in range(plan.B)])

    if not plan.early:
        return load
    loaded = [load(j) for j in range(plan.C // plan.bi)]
    return lambda j: loaded[j]


def _ln_stats(vec, plan: _Plan, ln_eps):
    """Per batch row b: (mean, 1/sqrt(var + eps)) of x[b] (flax's fast variance); the column
    blocks are summed elementwise first, so two reductions per row."""
    out = []
    for b in range(plan.B):
        s1 = s2 = None
        for j in range(plan.C // plan.bi):
            xb = vec(j)[3][b]
            t1, t2 = xb, xb * xb
            s1, s2 = (t1, t2) if s1 is None else (s1 + t1, s2 + t2)
        s1, s2 = jnp.sum(s1), jnp.sum(s2)
        mu = s1 / plan.C
        var = jnp.maximum(s2 / plan.C - mu * mu, 0.0)
        out.append((mu, lax.rsqrt(var + ln_eps)))
    return out


def _ln(x, stats_b, scale, bias):
    mu, rs = stats_b
    return (x - mu) * (rs * scale) + bias


def _load_weights(w_ref, plan: _Plan):
    """ws[g][j]: this program's [bo, bi] block j of matrix g, in the weights' dtype. Issued
    first thing in every kernel: a reduction's barrier is also a barrier to moving loads, so
    loads issued after one would wait for the previous ones (one memory latency per block)."""
    r0 = pl.program_id(0) * plan.bo

    def load(g, j):
        idx = (pl.ds(g * plan.C + r0, plan.bo), pl.ds(j * plan.bi, plan.bi))
        if plan.eviction_policy is None:
            return w_ref[idx]
        return plgpu.load(w_ref.at[idx], eviction_policy=plan.eviction_policy)
    return [[load(g, j) for j in range(plan.n_blocks)] for g in range(plan.G)]


def _accumulate(acc, w, u, plan: _Plan):
    """acc + w [bo, bi] times u [bi] (float32): the [bo] row sums, or with plan.acc_2d the
    elementwise [bo, bi] products, summed by _finish."""
    p = w.astype(jnp.float32) * u[None, :]
    if not plan.acc_2d:
        p = jnp.sum(p, axis=1)
    return p if acc is None else acc + p


def _finish(acc, plan: _Plan):
    return jnp.sum(acc, axis=1) if plan.acc_2d else acc


def _mixed_products(ws, vec, plan: _Plan, stats):
    """acc[g][b] [bo] float32: ws[g] times xm[b] = ln(x[b])*mix + prev[b]*(1 - mix)."""
    acc = [[None] * plan.B for _ in range(plan.G)]
    for j in range(plan.n_blocks):
        scale, bias, tm, xs, prevs = vec(j)
        for b in range(plan.B):
            y = _ln(xs[b], stats[b], scale, bias)
            xm = _round(y * tm + prevs[b] * (1.0 - tm), plan.dtype)
            for g in range(plan.G):
                acc[g][b] = _accumulate(acc[g][b], ws[g][j], xm, plan)
    return [[_finish(a, plan) for a in row] for row in acc]


def _store_row(ref, row, rows, value):
    # One [1, bo] row (an integer index in a store does not discharge in jax 0.10's
    # interpreter: pl.ds(row, 1) instead).
    ref[pl.ds(row, 1), rows] = value[None, :].astype(ref.dtype)


def _time_mix_in_kernel(layer_ref, *refs, plan: _Plan, k_clamp, log_eps, ln_eps, from_table: bool):
    tok_ref = refs[0] if from_table else None
    (x_ref, scale_ref, bias_ref, prev_ref, tmix_ref, w_ref, aa_ref, bb_ref, pp_ref, wlog_ref, ulog_ref,
     xln_ref, rwkv_ref, aa_out, bb_out, pp_out) = refs[1:] if from_table else refs
    ws = _load_weights(w_ref, plan)
    layer = layer_ref[0]
    r0 = pl.program_id(0) * plan.bo
    rows = pl.ds(r0, plan.bo)
    x = _x_loader(x_ref, tok_ref)
    # This program's channels of the state and parameters, also loaded before any reduction.
    state = [(aa_ref[layer * plan.B + b, rows], bb_ref[layer * plan.B + b, rows],
              pp_ref[layer * plan.B + b, rows], x(b, rows)) for b in range(plan.B)]
    w_log, u_log = wlog_ref[rows], ulog_ref[rows]
    scale, bias = scale_ref[rows], bias_ref[rows]
    vec = _vectors(layer, x, scale_ref, bias_ref, prev_ref, tmix_ref, plan)
    stats = _ln_stats(vec, plan, ln_eps)
    acc = _mixed_products(ws, vec, plan, stats)
    for b in range(plan.B):
        k = _round(acc[0][b], plan.dtype)
        if k_clamp is not None:
            k = jnp.minimum(k, k_clamp)
        v, r = _round(acc[1][b], plan.dtype), _round(acc[2][b], plan.dtype)
        srow = layer * plan.B + b
        aa, bb, pp, x_rows = state[b]
        # pallas_kernels.wkv.wkv_step, for these channels
        ww = u_log + k
        p = jnp.maximum(pp, ww)
        if log_eps is not None:
            p = jnp.maximum(p, log_eps)
        e1, e2 = jnp.exp(pp - p), jnp.exp(ww - p)
        den = e1 * bb + e2
        if log_eps is not None:
            den = den + jnp.exp(log_eps - p)
        out = (e1 * aa + e2 * v) / den
        pd = pp + w_log
        p2 = jnp.maximum(pd, k)
        e1, e2 = jnp.exp(pd - p2), jnp.exp(k - p2)
        _store_row(aa_out, srow, rows, e1 * aa + e2 * v)
        _store_row(bb_out, srow, rows, e1 * bb + e2)
        _store_row(pp_out, srow, rows, p2)
        _store_row(rwkv_ref, b, rows, _sigmoid(r) * out)
        _store_row(xln_ref, b, rows, _ln(x_rows, stats[b], scale, bias))


def _channel_mix_in_kernel(layer_ref, x_ref, scale_ref, bias_ref, prev_ref, tmix_ref, w_ref,
                           xln_ref, ksq_ref, r_ref, *, plan: _Plan, ln_eps):
    ws = _load_weights(w_ref, plan)
    layer = layer_ref[0]
    r0 = pl.program_id(0) * plan.bo
    rows = pl.ds(r0, plan.bo)
    scale, bias = scale_ref[rows], bias_ref[rows]
    x_rows = [x_ref[b, rows] for b in range(plan.B)]
    vec = _vectors(layer, _x_loader(x_ref, None), scale_ref, bias_ref, prev_ref, tmix_ref, plan)
    stats = _ln_stats(vec, plan, ln_eps)
    acc = _mixed_products(ws, vec, plan, stats)
    for b in range(plan.B):
        for g in range(4):  # the four quarters of K ([4C] rows = 4 x C)
            k = jnp.maximum(_round(acc[g][b], plan.dtype), 0.0)
            _store_row(ksq_ref, b, pl.ds(g * plan.C + r0, plan.bo), k * k)
        _store_row(r_ref, b, rows, acc[4][b])
        _store_row(xln_ref, b, rows, _ln(x_rows[b], stats[b], scale, bias))


def _mix_out_kernel(u_ref, w_ref, base_ref, *rest, plan: _Plan, gated: bool):
    """rest: [gate_ref], o_ref."""
    gate_ref, o_ref = rest if gated else (None, rest[0])
    ws = _load_weights(w_ref, plan)[0]
    f32, bo, bi = jnp.float32, plan.bo, plan.bi
    rows = pl.ds(pl.program_id(0) * bo, bo)
    us = [[u_ref[b, pl.ds(j * bi, bi)] for j in range(plan.n_blocks)] for b in range(plan.B)]
    base = [base_ref[b, rows] for b in range(plan.B)]
    gate = None if gate_ref is None else [gate_ref[b, rows] for b in range(plan.B)]
    acc = [None] * plan.B
    for j in range(plan.n_blocks):
        for b in range(plan.B):
            acc[b] = _accumulate(acc[b], ws[j], us[b][j].astype(f32), plan)
    for b in range(plan.B):
        y = _round(_finish(acc[b], plan), plan.dtype)
        if gate is not None:
            y = _sigmoid(gate[b].astype(f32)) * y
        _store_row(o_ref, b, rows, base[b] + y)


# ----------------------------------------------------------------------------------------
# Public functions.


def _check(name, **arrays):
    for k, (a, shape) in arrays.items():
        if tuple(a.shape) != tuple(shape):
            raise ValueError(f"{name}: {k} has shape {tuple(a.shape)}, expected {tuple(shape)}")


def time_mix_in(x, ln_scale, ln_bias, prev, time_mix, kvr_t, aa, bb, pp, w_log, u_log, layer, *,
                k_clamp: Optional[float], log_eps: Optional[float], ln_eps: float,
                blocks: Optional[DecodeBlockSizes] = None, interpret: bool = False, token=None):
    """One layer's time-mix up to the output product, for B rows.

    x [B, C] float32: the residual entering the layer (before ln1), or with token [B] int32,
    the embedding table [V, C] (any float dtype): the kernel reads row token[b] of it as
    x[b] (converted to float32; an id outside [0, V) is clamped into it), so the first layer
    needs no separate gather of the embeddings. ln_scale, ln_bias,
    time_mix [C]; prev [L*B, C] float32: every layer's token-shift vector (row layer*B + b);
    kvr_t [3C, C]: K, V, R stacked [out, in]; aa, bb, pp [L*B, C] float32 WKV state;
    w_log = -exp(time_decay), u_log = time_first [C] float32; layer: int32 [1].
    Returns (ln1(x) [B, C] float32, sigmoid(R) * wkv [B, C] in kvr_t's dtype, aa, bb, pp with
    row block `layer` updated (the inputs' buffers, updated in place under jit when donated)).
    """
    from_table = token is not None
    if from_table:
        if token.ndim != 1 or not jnp.issubdtype(token.dtype, jnp.integer) or x.ndim != 2:
            raise ValueError(f"time_mix_in: token must be int [B] and x the embedding table [V, C], got token "
                             f"{token.dtype} {tuple(token.shape)}, x {tuple(x.shape)}")
        B, C = token.shape[0], x.shape[1]
    else:
        B, C = x.shape
    LB = prev.shape[0]
    _check("time_mix_in", ln_scale=(ln_scale, (C,)), ln_bias=(ln_bias, (C,)), prev=(prev, (LB, C)),
           time_mix=(time_mix, (C,)), kvr_t=(kvr_t, (3 * C, C)), aa=(aa, (LB, C)), bb=(bb, (LB, C)),
           pp=(pp, (LB, C)), w_log=(w_log, (C,)), u_log=(u_log, (C,)), layer=(layer, (1,)))
    plan = _plan(B, C, C, 3, kvr_t.dtype, blocks, interpret)
    f32 = jnp.float32
    out_shape = (jax.ShapeDtypeStruct((B, C), f32), jax.ShapeDtypeStruct((B, C), plan.dtype),
                 jax.ShapeDtypeStruct((LB, C), f32), jax.ShapeDtypeStruct((LB, C), f32),
                 jax.ShapeDtypeStruct((LB, C), f32))
    kernel = functools.partial(_time_mix_in_kernel, k_clamp=k_clamp, log_eps=log_eps, ln_eps=ln_eps,
                               from_table=from_table)
    head = (layer.astype(jnp.int32),) + ((token.astype(jnp.int32), x) if from_table else (x.astype(f32),))
    args = head + (ln_scale.astype(f32), ln_bias.astype(f32), prev.astype(f32), time_mix, kvr_t,
                   aa.astype(f32), bb.astype(f32), pp.astype(f32), w_log.astype(f32), u_log.astype(f32))
    n = len(head) + 5  # aa's index
    return _pallas(kernel, plan, "decode_time_mix_in", out_shape, args, {n: 2, n + 1: 3, n + 2: 4})


def channel_mix_in(x, ln_scale, ln_bias, prev, time_mix, kr_t, layer, *, ln_eps: float,
                   blocks: Optional[DecodeBlockSizes] = None, interpret: bool = False):
    """One layer's channel-mix up to the value product, for B rows.

    x [B, C] float32 (before the LayerNorm); prev [L*B, C]; kr_t [5C, C]: K ([4C] rows) and
    R stacked [out, in]; layer int32 [1]. Returns (ln(x) [B, C] float32, relu(K)^2 [B, 4C] and
    R [B, C], both in kr_t's dtype)."""
    B, C = x.shape
    LB = prev.shape[0]
    _check("channel_mix_in", ln_scale=(ln_scale, (C,)), ln_bias=(ln_bias, (C,)), prev=(prev, (LB, C)),
           time_mix=(time_mix, (C,)), kr_t=(kr_t, (5 * C, C)), layer=(layer, (1,)))
    plan = _plan(B, C, C, 5, kr_t.dtype, blocks, interpret)
    f32 = jnp.float32
    out_shape = (jax.ShapeDtypeStruct((B, C), f32), jax.ShapeDtypeStruct((B, 4 * C), plan.dtype),
                 jax.ShapeDtypeStruct((B, C), plan.dtype))
    args = (layer.astype(jnp.int32), x.astype(f32), ln_scale.astype(f32), ln_bias.astype(f32),
            prev.astype(f32), time_mix, kr_t)
    return _pallas(functools.partial(_channel_mix_in_kernel, ln_eps=ln_eps), plan,
                   "decode_channel_mix_in", out_shape, args)


def mix_out(u, w_t, base, gate=None, *, blocks: Optional[DecodeBlockSizes] = None, interpret: bool = False):
    """base + [sigmoid(gate) *] (u @ w_t^T): u [B, in] in w_t's dtype, w_t [C, in], base [B, C]
    float32, gate [B, C] (optional). Returns [B, C] float32; the product is rounded to w_t's
    dtype before the gate and the sum, as an XLA product in that dtype."""
    B, inp = u.shape
    C = w_t.shape[0]
    _check("mix_out", w_t=(w_t, (C, inp)), base=(base, (B, C)),
           **({} if gate is None else {"gate": (gate, (B, C))}))
    plan = _plan(B, C, inp, 1, w_t.dtype, blocks, interpret)
    args = (u.astype(plan.dtype), w_t, base.astype(jnp.float32)) + (() if gate is None else (gate,))
    kernel = functools.partial(_mix_out_kernel, gated=gate is not None)
    return _pallas(kernel, plan, "decode_mix_out", jax.ShapeDtypeStruct((B, C), jnp.float32), args)


def _layer_norm_kernel(x_ref, scale_ref, bias_ref, o_ref, *, plan: _Plan, ln_eps):
    cols = [pl.ds(j * plan.bi, plan.bi) for j in range(plan.C // plan.bi)]
    xs = [[x_ref[b, c] for c in cols] for b in range(plan.B)]
    scale, bias = [scale_ref[c] for c in cols], [bias_ref[c] for c in cols]
    stats = _ln_stats(lambda j: (None, None, None, [xs[b][j] for b in range(plan.B)], None), plan, ln_eps)
    for b in range(plan.B):
        for j, c in enumerate(cols):
            o_ref[pl.ds(b, 1), c] = _ln(xs[b][j], stats[b], scale[j], bias[j])[None, :].astype(o_ref.dtype)


def layer_norm(x, ln_scale, ln_bias, *, ln_eps: float, out_dtype, interpret: bool = False):
    """The model's LayerNorm of x [B, C] float32 -> [B, C] in out_dtype, as one kernel of one
    program (XLA takes two: the statistics, then the normalization): the decode step's final
    LayerNorm, whose output the head product takes in the weights' dtype."""
    B, C = x.shape
    _check("layer_norm", ln_scale=(ln_scale, (C,)), ln_bias=(ln_bias, (C,)))
    plan = _plan(B, C, C, 1, out_dtype, DecodeBlockSizes(block_in=1024), interpret)  # (grid: one program)
    return pl.pallas_call(
        functools.partial(_layer_norm_kernel, plan=plan, ln_eps=ln_eps),
        out_shape=jax.ShapeDtypeStruct((B, C), out_dtype), grid=(1,), interpret=interpret, name="decode_layer_norm",
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
    )(x.astype(jnp.float32), ln_scale.astype(jnp.float32), ln_bias.astype(jnp.float32))


# ----------------------------------------------------------------------------------------
# Plain-JAX references: the same functions, as the XLA decode step computes them.


def _ln_reference(x, scale, bias, ln_eps):
    mu = jnp.mean(x, -1, keepdims=True)
    var = jnp.maximum(jnp.mean(x * x, -1, keepdims=True) - mu * mu, 0.0)
    return (x - mu) * (lax.rsqrt(var + ln_eps) * scale) + bias


def _dot(x, w_t):
    return lax.dot_general(x.astype(w_t.dtype), w_t, (((1,), (1,)), ((), ())),
                           precision=lax.Precision.HIGHEST, preferred_element_type=jnp.float32).astype(w_t.dtype)


def _mixed_reference(x, ln_scale, ln_bias, prev_l, time_mix, w_t, ln_eps):
    y = _ln_reference(x.astype(jnp.float32), ln_scale, ln_bias, ln_eps)
    tm = time_mix.astype(jnp.float32)
    return y, _dot(y * tm + prev_l * (1.0 - tm), w_t)


def layer_norm_reference(x, ln_scale, ln_bias, *, ln_eps, out_dtype):
    return _ln_reference(x.astype(jnp.float32), ln_scale, ln_bias, ln_eps).astype(out_dtype)


def time_mix_in_reference(x, ln_scale, ln_bias, prev, time_mix, kvr_t, aa, bb, pp, w_log, u_log, layer, *,
                          k_clamp, log_eps, ln_eps, token=None):
    if token is not None:  # x is the embedding table
        x = jnp.take(x, jnp.clip(token, 0, x.shape[0] - 1), axis=0).astype(jnp.float32)
    B, C = x.shape
    rows = slice(int(layer[0]) * B, int(layer[0]) * B + B)
    y, kvr = _mixed_reference(x, ln_scale, ln_bias, prev[rows], time_mix, kvr_t, ln_eps)
    kvr = kvr.astype(jnp.float32)
    k, v, r = kvr[:, :C], kvr[:, C:2 * C], kvr[:, 2 * C:]
    if k_clamp is not None:
        k = jnp.minimum(k, k_clamp)
    st, out = wkv_step(WKVState(aa[rows], bb[rows], pp[rows]), k, v, w_log, u_log, log_eps)
    new = [a.at[rows].set(s) for a, s in zip((aa, bb, pp), st)]
    return (y, (jax.nn.sigmoid(r) * out).astype(kvr_t.dtype), *new)


def channel_mix_in_reference(x, ln_scale, ln_bias, prev, time_mix, kr_t, layer, *, ln_eps):
    B, C = x.shape
    rows = slice(int(layer[0]) * B, int(layer[0]) * B + B)
    y, kr = _mixed_reference(x, ln_scale, ln_bias, prev[rows], time_mix, kr_t, ln_eps)
    return y, jnp.square(jax.nn.relu(kr[:, :4 * C])), kr[:, 4 * C:]


def mix_out_reference(u, w_t, base, gate=None):
    y = _dot(u, w_t).astype(jnp.float32)
    if gate is not None:
        y = jax.nn.sigmoid(gate.astype(jnp.float32)) * y
    return base.astype(jnp.float32) + y
