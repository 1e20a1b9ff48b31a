"""The WKV operator of RWKV-v2: its plain-JAX reference and Pallas GPU kernels (O(T), any shape).

    k_t = exp(min(K_t, k_clamp)),  u = exp(time_first),  d = exp(-exp(time_decay))
    out_t = (u*k_t*v_t + sum_{i<t} d^(t-1-i) k_i v_i) / (u*k_t + sum_{i<t} d^(t-1-i) k_i + k_eps)

(spec, "The network"). `wkv_with_state_reference`, a lax.scan of `wkv_step`, defines the
function and the state convention (`WKVState(aa, bb, pp)`: the true sums are aa*exp(pp) and
bb*exp(pp)). `wkv` and `wkv_with_state` compute the same with Pallas Triton kernels on a GPU
(`interpret=True` runs them on CPU), differentiable through custom VJPs whose backward is a
kernel too. rwkv2_jax.wkv picks one for the model; tests/test_wkv_kernel.py checks the kernels
against the reference and against float64, outputs and gradients.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


__all__ = ["EMPTY_EXP", "WKVBlockSizes", "WKVState", "wkv", "wkv_convolution", "wkv_reference", "wkv_step",
           "wkv_with_state", "wkv_with_state_reference"]


# --- plain-JAX reference: the function every kernel below must match ---------------------

# Exponent of an empty sum. Finite (not -inf) so that no inf - inf appears in gradients.
EMPTY_EXP = -1e38


class WKVState(NamedTuple):
    """The WKV part of one layer's RNN state, each [B, C] float32.

    The true accumulators of the spec are aa * exp(pp) and bb * exp(pp):
      aa * exp(pp) = sum_{i<=t} d^(t-i) k_i v_i,   bb * exp(pp) = sum_{i<=t} d^(t-i) k_i.
    """

    aa: jax.Array
    bb: jax.Array
    pp: jax.Array

    @classmethod
    def zeros(cls, batch_size: int, n_embd: int) -> "WKVState":
        """The state at the start of a sequence (all sums empty)."""
        zeros = jnp.zeros((batch_size, n_embd), jnp.float32)
        return cls(zeros, zeros, jnp.full((batch_size, n_embd), EMPTY_EXP, jnp.float32))

    def unscaled(self) -> Tuple[jax.Array, jax.Array]:
        """(aa, bb) of the spec's RNN mode; overflows to inf where pp > ~88 (float32)."""
        scale = jnp.exp(self.pp)
        return self.aa * scale, self.bb * scale


def _log_eps(k_eps: float) -> Optional[float]:
    return math.log(k_eps) if k_eps > 0 else None


def wkv_step(
    state: WKVState,
    k: jax.Array,  # [B, C] K of this token, before exp, already clamped
    v: jax.Array,  # [B, C]
    w_log: jax.Array,  # [C] log d = -exp(time_decay)
    u_log: jax.Array,  # [C] log u = time_first
    log_eps: Optional[float],
) -> Tuple[WKVState, jax.Array]:
    """One token of the recurrence: (state before, token) -> (state after, out [B, C])."""
    aa, bb, pp = state
    # Output: the state's sums plus the current token weighted by u.
    ww = u_log + k
    p = jnp.maximum(pp, ww)
    if log_eps is not None:
        p = jnp.maximum(p, log_eps)
    e1 = jnp.exp(pp - p)
    e2 = jnp.exp(ww - p)
    num = e1 * aa + e2 * v
    den = e1 * bb + e2
    if log_eps is not None:
        den = den + jnp.exp(log_eps - p)
    out = num / den
    # Update: decay the sums by d, add the current token with weight 1.
    pd = pp + w_log
    p2 = jnp.maximum(pd, k)
    e1 = jnp.exp(pd - p2)
    e2 = jnp.exp(k - p2)
    return WKVState(e1 * aa + e2 * v, e1 * bb + e2, p2), out


def wkv_with_state_reference(
    k: jax.Array,  # [B, T, C] K before exp
    v: jax.Array,  # [B, T, C]
    time_decay: jax.Array,  # [C] raw parameter: d = exp(-exp(time_decay))
    time_first: jax.Array,  # [C] raw parameter: u = exp(time_first)
    state: Optional[WKVState] = None,
    *,
    k_clamp: Optional[float] = 60.0,
    k_eps: float = 1e-9,
    lengths: Optional[jax.Array] = None,
) -> Tuple[jax.Array, WKVState]:
    """WKV over a sequence, starting from `state` (None: start of sequence).

    Returns (out [B, T, C] float32, state after the last token). Differentiable
    (JAX autodiff through the scan); the gradient of K is zero where the clamp cuts.
    `lengths` [B] (optional): row b is right-padded after lengths[b] tokens; its
    state is the one after token lengths[b] - 1 (outputs at padded steps are junk).
    """
    B, T, C = k.shape
    if v.shape != k.shape:
        raise ValueError(f"wkv: k and v must have the same shape, got {k.shape=} {v.shape=}")
    if time_decay.shape != (C,) or time_first.shape != (C,):
        raise ValueError(
            f"wkv: time_decay and time_first must be [C={C}], got "
            f"{time_decay.shape=} {time_first.shape=}"
        )
    k = k.astype(jnp.float32)
    v = v.astype(jnp.float32)
    if k_clamp is not None:
        k = jnp.minimum(k, k_clamp)
    w_log = -jnp.exp(time_decay.astype(jnp.float32))
    u_log = time_first.astype(jnp.float32)
    log_eps = _log_eps(k_eps)
    if state is None:
        state = WKVState.zeros(B, C)

    def body(carry, kv):
        return wkv_step(carry, kv[0], kv[1], w_log, u_log, log_eps)

    def masked_body(carry, kvt):
        k_t, v_t, t = kvt
        new, out = wkv_step(carry, k_t, v_t, w_log, u_log, log_eps)
        valid = (t < lengths)[:, None]  # [B, 1]: padded steps keep the state
        return WKVState(*(jnp.where(valid, n, c) for n, c in zip(new, carry))), out

    # Scan over time: [B, T, C] -> [T, B, C].
    xs = (k.swapaxes(0, 1), v.swapaxes(0, 1))
    if lengths is None:
        state, out = jax.lax.scan(body, state, xs)
    else:
        state, out = jax.lax.scan(masked_body, state, xs + (jnp.arange(T),))
    return out.swapaxes(0, 1), state


def wkv_reference(
    k: jax.Array,
    v: jax.Array,
    time_decay: jax.Array,
    time_first: jax.Array,
    *,
    k_clamp: Optional[float] = 60.0,
    k_eps: float = 1e-9,
) -> jax.Array:
    """out [B, T, C] = num / den of the spec, from the start of a sequence."""
    out, _ = wkv_with_state_reference(k, v, time_decay, time_first, k_clamp=k_clamp, k_eps=k_eps)
    return out


def wkv_convolution(
    k: jax.Array,
    v: jax.Array,
    time_decay: jax.Array,
    time_first: jax.Array,
    *,
    k_clamp: Optional[float] = 60.0,
    k_eps: float = 1e-9,
) -> jax.Array:
    """The original O(T^2) form: a causal convolution with lag weights u, 1, d, d^2, ...

    Memory and time grow with T^2 and exp(K) overflows float32 without the clamp;
    kept only as a second reference and for benchmarks.
    """
    B, T, C = k.shape
    kf = k.astype(jnp.float32)
    if k_clamp is not None:
        kf = jnp.minimum(kf, k_clamp)
    ek = jnp.exp(kf)  # [B, T, C]
    ekv = ek * v.astype(jnp.float32)
    w_log = -jnp.exp(time_decay.astype(jnp.float32))  # [C]
    lag = jnp.arange(T)[:, None] - jnp.arange(T)[None, :]  # [T, T] t - i
    weights = jnp.where(
        lag[..., None] >= 1,
        jnp.exp(jnp.maximum(lag[..., None] - 1, 0) * w_log),
        0.0,
    )  # [T, T, C]
    weights = jnp.where((lag == 0)[..., None], jnp.exp(time_first.astype(jnp.float32)), weights)
    num = jnp.einsum("tic,bic->btc", weights, ekv)
    den = jnp.einsum("tic,bic->btc", weights, ek) + k_eps
    return num / den


# --- Pallas kernels -------------------------------------------------------------------
#
# Lowering: Pallas Triton (`plgpu.CompilerParams`). The WKV is an elementwise recurrence over
# time with no matrix products, so Mosaic GPU's strengths (wgmma, TMA) buy nothing, and the
# Triton API (`pallas_call`, ref indexing, `fori_loop`) is the same in jax 0.10 and 0.11 and
# runs on any CUDA GPU from Ampere on. Its limits shape the code: every loaded block is a
# power of two (a row of `block_c` channels per time step; C is padded inside), a grid has at
# most three axes (two are used, so `vmap` can add one), and there is no reverse scan (the
# backward indexes `end - 1 - i`).
#
# Time-split kernels (`_fwd_tile_kernel`, `_bwd_tile_kernel`): linear mode without state, one
# time chunk, T a multiple of the tile (the model's GPT mode in training and evaluation). A
# program owns `block_c` channels of one batch row and walks time in tiles of P*S steps, warp p
# taking sub-chunk p: each warp runs its S steps from a zero state, the warps exchange their
# local sums once (an exclusive scan over the sub-chunks with weights D^j, D = d^S; all terms
# non-negative in the forward), then each warp runs its S steps again from its true start
# state. P warps per 32 channels keep P times the rows in flight of one.
#
# Serial kernels (every other case). A program owns `block_c` channels of one batch row and
# walks its time range in blocks of `unroll` steps whose rows were loaded one block earlier
# (prefetch in the loop carry), so ~2*unroll row loads are in flight. When B*C/block_c
# programs would not fill the GPU, time is split into chunks: a first kernel computes each
# chunk's local end state from a zero state, and the main kernel folds the earlier chunks'
# states (decay d^L per chunk) into its start state (the backward does the same in reverse).
#
# Two numeric modes, both exact implementations of the same function:
# * "linear" (`wkv`'s default with k_clamp <= 64): plain float32 sums of exp(K), which the
#   clamp keeps finite, as the original kernel did; one exp per step (`approx_math`). Needs
#   time_first + k_clamp < ~88 (true of every release) and k_eps > 0.
# * "log": the reference's running-max exponent (sums scaled by exp(-pp)); finite for any K
#   and T. Used by `wkv` without a clamp and always by `wkv_with_state`, whose returned state
#   must match the reference's (aa, bb, pp).
#
# Backward. The forward that feeds a gradient saves its state every `unroll_train` steps. The
# backward walks time in reverse a block at a time: it reloads the block's k, v, g and
# checkpoint, recomputes the forward over the block in registers (out and den never touch
# memory), then runs the block's steps in reverse, carrying the adjoints of the two sums (GA,
# GB) and their derivatives with respect to log d (GA', GB'). With den_t and out_t of step t:
#
#     GA_{t-1} = d*GA_t + g_t/den_t,   GB_{t-1} = d*GB_t - g_t*out_t/den_t
#     GA'_{t-1} = d*(GA_t + GA'_t),    GB'_{t-1} = d*(GB_t + GB'_t)
#     dv_t = k_t*GA_t + u*k_t*g_t/den_t
#     dK_t = k_t*(v_t*GA_t + GB_t) + u*k_t*g_t*(v_t - out_t)/den_t      (0 where the clamp cuts)
#     d(log d) += k_t*(v_t*GA'_t + GB'_t),  d(time_first) += u*k_t*g_t*(v_t - out_t)/den_t
#
# (log mode keeps them scaled by exp(-q) with a running-max q, so every exp() is of a
# non-positive number). The final state's cotangent enters as the initial (GA, GB); the initial
# state's gradient is the final (GA, GB, GA', GB'). The final `pp` is a max over time; its own
# gradient is taken in plain JAX from `max(pp0 + T*w, max_t(K_t + (T-1-t)*w))`.

# Largest clamp for which the linear mode's plain float32 sums stay finite:
# u * e^64 * T / (1 - d) stays far below float32's 3.4e38 ≈ e^88 for realistic time_first.
LINEAR_MAX_CLAMP = 64.0
# Smallest k_eps for the linear mode: den >= k_eps keeps 1/den finite.
LINEAR_MIN_EPS = 1e-30


@dataclasses.dataclass(frozen=True)
class WKVBlockSizes:
    """Launch parameters of the WKV kernels (all static; none needs to divide the shape).

    block_c:      channels per program, a power of two (C is padded up inside).
    unroll:       time steps per loop iteration of the forward without gradient; their rows
                  are loaded one iteration ahead.
    unroll_train: the same for the forward that saves for the backward, and for the
                  backward: also the interval of the saved state checkpoints, and the block
                  the backward recomputes the forward over in registers.
    num_warps:    Triton warps per program (block_c / (32 * num_warps) channels per thread).
    num_stages:   Triton software-pipelining depth of the time loops.
    min_programs: split time into chunks while B * C / block_c programs are fewer than this...
    chunk_to:     ...aiming at this many programs in all,
    min_chunk:    but never with chunks shorter than this many steps.
    time_split:   linear mode without state, one time chunk, T a multiple of time_split *
                  unroll (forward) or time_split * unroll_train (forward that saves, and
                  backward): sub-chunks per tile, each of `unroll` (or `unroll_train`)
                  steps, walked at once by the program's threads (`_fwd_tile_kernel`;
                  module doc): one thread per sub-chunk and channel, so time_split *
                  block_c / 32 warps (at least one) whatever num_warps says. 1: the
                  serial kernels always.
    approx_math:  linear mode on the GPU: exp(K) as one `ex2.approx.ftz` of K*log2(e) and
                  1/den as one `rcp.approx.ftz` (inline PTX) instead of libdevice's expf
                  and a division: about half the instructions per step. Relative error of
                  exp(K) ~|K|*6e-8 (the rounding of K*log2(e)); outputs and gradients stay
                  as close to the reference as without it (bench/wkv.py checks on the GPU).
                  The interpreter computes exp2(K*log2(e)) and 1/den, so CPU tests see the
                  same rounding of K.
    """

    # Each default is the fastest of `python3 bench/wkv.py --sweep` on H100 and H200 at
    # (B, C, T) = (8, 1024, 1024), the training shape, and at (1, 1024, 65536).
    block_c: int = 32  # one channel per thread of a warp
    unroll: int = 16  # 16 rows in flight per block, two blocks per loop iteration (`_time_loop`)
    unroll_train: int = 16  # the backward's block: rows in flight against registers held
    num_warps: int = 1  # serial kernels: one warp per 32 channels
    num_stages: int = 1  # the loops prefetch their rows themselves
    min_programs: int = 256  # ~2 programs per SM of an H100/H200 before time is chunked
    chunk_to: int = 512
    min_chunk: int = 64  # a step costs a program the same however few run: short chunks pay
    approx_math: bool = True
    time_split: int = 4  # four warps per 32 channels: four times the rows in flight

    def __post_init__(self):
        if self.block_c < 1 or self.block_c & (self.block_c - 1):
            raise ValueError(f"WKVBlockSizes: {self.block_c=} must be a power of two")
        if self.time_split < 1 or self.time_split & (self.time_split - 1):
            raise ValueError(f"WKVBlockSizes: {self.time_split=} must be a power of two")
        if min(self.unroll, self.unroll_train, self.min_chunk, self.min_programs, self.chunk_to) < 1:
            raise ValueError(f"WKVBlockSizes: positive sizes needed, got {self}")


# What a call with block_sizes=None runs.
DEFAULT_BLOCK_SIZES = WKVBlockSizes()


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about one call: shapes after padding, chunking, numeric mode."""

    B: int
    T: int
    C: int  # padded channel count, a multiple of bc
    bc: int  # channels per program
    unroll: int  # forward without gradient
    unroll_train: int  # forward with checkpoints, backward; the checkpoint interval
    n_chunks: int
    chunk: int  # steps per chunk (the last one may be shorter); a multiple of both unrolls
    linear: bool
    k_clamp: Optional[float]
    k_eps: float
    num_warps: int
    num_stages: int
    interpret: bool
    approx_math: bool = False
    time_split: int = 1

    @property
    def n_cb(self) -> int:
        return self.C // self.bc

    @property
    def grid(self) -> Tuple[int, int]:
        return (self.B * self.n_cb, self.n_chunks)

    @property
    def n_ckpt(self) -> int:  # checkpoints per sequence: one every unroll_train steps
        return -(-self.T // self.unroll_train)

    @property
    def log_eps(self) -> Optional[float]:
        return math.log(self.k_eps) if self.k_eps > 0 else None

    @property
    def n_state(self) -> int:  # arrays in a forward state: (A, B) linear, (aa, bb, pp) log
        return 2 if self.linear else 3

    @property
    def tile_warps(self) -> int:  # warps of a tile kernel's program: one thread per [P, bc] entry
        return max(1, self.time_split * self.bc // 32)

    @property
    def n_carry(self) -> int:  # arrays in a backward carry: GA, GB, GA', GB' (+ q in log mode)
        return 4 if self.linear else 5


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _make_plan(B, T, C, *, k_clamp, k_eps, linear, blocks: WKVBlockSizes, interpret) -> _Plan:
    bc = min(blocks.block_c, _next_pow2(C))
    c_pad = -(-C // bc) * bc
    unroll, unroll_train = min(blocks.unroll, T), min(blocks.unroll_train, T)
    programs = B * (c_pad // bc)
    n_chunks = 1
    if programs < blocks.min_programs:
        n_chunks = max(1, min(-(-blocks.chunk_to // programs), T // blocks.min_chunk))
    step = math.lcm(unroll, unroll_train)
    chunk = -(-T // n_chunks)
    chunk = -(-chunk // step) * step
    n_chunks = -(-T // chunk)
    return _Plan(
        B=B, T=T, C=c_pad, bc=bc, unroll=unroll, unroll_train=unroll_train,
        n_chunks=n_chunks, chunk=chunk, linear=linear,
        k_clamp=None if k_clamp is None else float(k_clamp), k_eps=float(k_eps),
        num_warps=blocks.num_warps, num_stages=blocks.num_stages, interpret=interpret,
        approx_math=blocks.approx_math, time_split=blocks.time_split,
    )


# ----------------------------------------------------------------------------------------
# Kernel building blocks (traced inside the kernels). Every value is a [bc] row.


def _program(plan: _Plan):
    """(batch row b, channel slice, chunk index) of this program."""
    pid = pl.program_id(0)
    b = lax.div(pid, jnp.asarray(plan.n_cb, pid.dtype))  # int32 also under jax_enable_x64
    c0 = pl.multiple_of((pid - b * plan.n_cb) * plan.bc, plan.bc)
    return b, pl.ds(c0, plan.bc), pl.program_id(1)


def _chunk_range(plan: _Plan, chunk):
    """First step and step count of a chunk (Python ints when there is one chunk)."""
    if plan.n_chunks == 1:
        return 0, plan.T
    start = chunk * plan.chunk
    return start, jnp.minimum(plan.chunk, plan.T - start)


def _is_static(x, value) -> bool:
    return isinstance(x, int) and x == value


def _time_loop(U: int, start, n, load, step, carry, on_block=None, ping_pong=True):
    """carry = step(carry, load(t), t) for t in [start, start + n), in order.

    Rows are loaded one block of U steps ahead: while a block's U steps run, the next
    block's U rows are in flight. The loop body runs two blocks (ping-pong between two sets
    of row registers), so that the rows carried to the next iteration are the ones loaded
    during this one's second block: with one block per iteration, the compiler copies the
    just-issued loads into the carried registers at the loop's end, and each copy waits for
    its load (visible in the SASS). Prefetches past the range are clamped to its last step
    (loaded, not used).
    on_block(j, carry) runs before each block of U steps (j = 0, 1, ...; the tail too).
    ping_pong=False: one block per iteration, for step functions so long that two blocks
    overflow the instruction cache (see `_fwd_kernel`), or for the tile kernels.
    """
    last = start + n - 1
    load_at = lambda i: load(jnp.minimum(start + i, last))
    load_block = lambda j: tuple(load_at(j * U + i) for i in range(U))
    n_full = n // U

    def run_block(j, carry, rows):
        if on_block is not None:
            on_block(j, carry)
        for i in range(U):
            carry = step(carry, rows[i], start + j * U + i)
        return carry

    if not _is_static(n_full, 0) and not ping_pong:

        def body1(j, c):
            carry, rows = c
            nxt = load_block(j + 1)
            return run_block(j, carry, rows), nxt

        carry, _ = lax.fori_loop(0, n_full, body1, (carry, load_block(0)))
    elif not _is_static(n_full, 0):

        def body(jj, c):  # blocks 2jj (rows carried in) and 2jj + 1
            carry, rows_a = c
            j = 2 * jj
            rows_b = load_block(j + 1)
            carry = run_block(j, carry, rows_a)
            rows_a = load_block(j + 2)
            carry = run_block(j + 1, carry, rows_b)
            return carry, rows_a

        carry, rows = lax.fori_loop(0, n_full // 2, body, (carry, load_block(0)))

        def odd_block(_, carry):  # the last full block when there is an odd number of them
            return run_block(n_full - 1, carry, rows)

        carry = lax.fori_loop(0, n_full % 2, odd_block, carry)
    rem = n - n_full * U
    if not _is_static(rem, 0):
        if on_block is not None:
            if isinstance(rem, int):
                on_block(n_full, carry)
            else:
                pl.when(rem > 0)(lambda: on_block(n_full, carry))

        def tail(i, carry):
            t = start + n_full * U + i
            return step(carry, load(t), t)

        carry = lax.fori_loop(0, rem, tail, carry)
    return carry


# _NO_SCALAR_SELECT: the Pallas Triton lowering (jax 0.10 and 0.11) gives a weak-typed Python
# literal operand of select_n the predicate's type, so jnp.where(pred, 520, 560) on scalars
# becomes select(pred, false, false) : i1 on the GPU (interpret mode is right). Kernels here
# never select between scalar literals: they use arithmetic, or selects of full [bc] arrays.


def _params(td_ref, tf_ref, cs):
    """Per-channel w = log d and log u, [bc] float32."""
    return -jnp.exp(td_ref[cs].astype(jnp.float32)), tf_ref[cs].astype(jnp.float32)


def _clamp(plan: _Plan, kraw):
    return kraw if plan.k_clamp is None else jnp.minimum(kraw, plan.k_clamp)


def _clamp_grad(plan: _Plan, kraw):
    """d min(K, clamp) / dK as JAX defines it (1 below, 0.5 at, 0 above the clamp)."""
    if plan.k_clamp is None:
        return None
    c = plan.k_clamp
    one = jnp.ones_like(kraw)
    return jnp.where(kraw < c, one, jnp.where(kraw == c, 0.5 * one, 0.0 * one))


def _log_add_weights(p1, p2):
    """Weights (e1, e2) and exponent p of a scaled sum e1*x*exp(p) + e2*y*exp(p) equal to
    x*exp(p1) + y*exp(p2): p = max(p1, p2), so one weight is exactly 1 and the other
    exp(-|p1 - p2|) <= 1 (one exp; selects of full rows only, see _NO_SCALAR_SELECT)."""
    x = jnp.exp(-jnp.abs(p1 - p2))
    keep = p1 >= p2
    one = jnp.ones_like(x)
    return jnp.where(keep, one, x), jnp.where(keep, x, one), jnp.maximum(p1, p2)


_LOG2E = 1.4426950408889634


def _exp_k(plan: _Plan, x):
    """exp(x) of a step's K: with approx_math, one ex2.approx of x*log2(e) on the GPU."""
    if not plan.approx_math:
        return jnp.exp(x)
    x = x * _LOG2E
    if plan.interpret:
        return jnp.exp2(x)
    [y] = plgpu.elementwise_inline_asm(
        "ex2.approx.ftz.f32 $0, $1;", args=[x], constraints="=f,f", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)])
    return y


def _recip(plan: _Plan, x):
    if not plan.approx_math or plan.interpret:
        return 1.0 / x
    [y] = plgpu.elementwise_inline_asm(
        "rcp.approx.ftz.f32 $0, $1;", args=[x], constraints="=f,f", pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)])
    return y


def _fwd_step_fn(plan: _Plan, w, u_log):
    """step(state, kraw, v, with_out) -> (state after, out, res): one forward step.

    res is what the backward needs besides out: 1/den (linear) or log(den) (log mode).
    """
    if plan.linear:
        d, u = jnp.exp(w), jnp.exp(u_log)
        eps = plan.k_eps

        def step(carry, kraw, v, with_out=True):
            A, Bs = carry
            kk = _exp_k(plan, _clamp(plan, kraw))
            out = r = None
            if with_out:
                ukk = u * kk
                r = _recip(plan, Bs + ukk + eps)
                out = (A + ukk * v) * r
            return (d * A + kk * v, d * Bs + kk), out, r

        return step

    log_eps = plan.log_eps

    def step(carry, kraw, v, with_out=True):
        aa, bb, pp = carry
        kc = _clamp(plan, kraw)
        out = lnd = None
        if with_out:
            ww = u_log + kc
            p = jnp.maximum(pp, ww)
            if log_eps is not None:
                p = jnp.maximum(p, log_eps)
            e1 = jnp.exp(pp - p)
            e2 = jnp.exp(ww - p)
            den = e1 * bb + e2
            if log_eps is not None:
                den = den + jnp.exp(log_eps - p)
            out, lnd = (e1 * aa + e2 * v) / den, p + jnp.log(den)
        # Update: decay the sums, add the current token.
        e1, e2, p2 = _log_add_weights(pp + w, kc)
        return (e1 * aa + e2 * v, e1 * bb + e2, p2), out, lnd

    return step


def _fwd_fold(plan: _Plan, w, carry, local):
    """State after a full chunk: decay `carry` by d^chunk and add the chunk's local state."""
    Lw = plan.chunk * w
    if plan.linear:
        dL = jnp.exp(Lw)
        return tuple(dL * c + l for c, l in zip(carry, local))
    aa, bb, pp = carry
    la, lb, lp = local
    pd = pp + Lw
    p = jnp.maximum(pd, lp)
    e1, e2 = jnp.exp(pd - p), jnp.exp(lp - p)
    return e1 * aa + e2 * la, e1 * bb + e2 * lb, p


def _zero_fwd_state(plan: _Plan):
    z = jnp.zeros((plan.bc,), jnp.float32)
    if plan.linear:
        return (z, z)
    return (z, z, jnp.full((plan.bc,), EMPTY_EXP, jnp.float32))


def _zero_bwd_carry(plan: _Plan):
    z = jnp.zeros((plan.bc,), jnp.float32)
    if plan.linear:
        return (z, z, z, z)
    return (z, z, z, z, jnp.full((plan.bc,), EMPTY_EXP, jnp.float32))


def _bwd_push(plan: _Plan, w, carry, g, out, res):
    """Carry for GA_{t-1} from the carry for GA_t and step t's (g, out, res)."""
    if plan.linear:
        d = jnp.exp(w)
        GA, GB, GA2, GB2 = carry
        x = g * res
        return d * GA + x, d * GB - x * out, d * (GA + GA2), d * (GB + GB2)
    ga, gb, ga2, gb2, q = carry
    a1, a2, qn = _log_add_weights(q + w, -res)
    return (a1 * ga + a2 * g, a1 * gb - a2 * g * out, a1 * (ga + ga2), a1 * (gb + gb2), qn)


def _bwd_fold(plan: _Plan, w, carry, local, length):
    """Carry before a chunk of `length` steps: transfer `carry` across it, add its local carry."""
    Lw = length * w
    if plan.linear:
        dL = jnp.exp(Lw)
        GA, GB, GA2, GB2 = carry
        lA, lB, lA2, lB2 = local
        return (dL * GA + lA, dL * GB + lB,
                dL * (GA2 + length * GA) + lA2, dL * (GB2 + length * GB) + lB2)
    ga, gb, ga2, gb2, q = carry
    la, lb, la2, lb2, lq = local
    qw = q + Lw
    qn = jnp.maximum(qw, lq)
    a1, a2 = jnp.exp(qw - qn), jnp.exp(lq - qn)
    return (a1 * ga + a2 * la, a1 * gb + a2 * lb,
            a1 * (ga2 + length * ga) + a2 * la2, a1 * (gb2 + length * gb) + a2 * lb2, qn)


def _bwd_walk(plan: _Plan, w, u_log, start, n, load_rows, load_ckpt, carry, emit):
    """Walk [start, start + n) backwards in blocks of U = unroll_train steps.

    Per block: load its U rows (k, v, g) and the forward state checkpointed at its start,
    recompute the forward over the block in registers (out and den never touch memory),
    then run the U backward steps in reverse. Rows and checkpoint of the next (earlier)
    block are loaded before the current block is processed. The last block of the range
    may be partial: its steps past the range run on clamped rows with a frozen carry, and
    their stores land on the range's last step before the real value overwrites them.
    One block per loop iteration: two (the ping-pong of `_time_loop`) make the Triton compile
    several times longer (the TritonGPUCoalesce pass grows with the number of loads and
    stores times the size of the function).

    emit: None (carry only, for chunk-local carries) or store(t, dk, dv); then the
    returned carry is (carry, du, dw) with per-channel sums of d log u and d log d.
    """
    U = plan.unroll_train
    fwd = _fwd_step_fn(plan, w, u_log)
    if plan.linear:
        u = jnp.exp(u_log)
    last = start + n - 1
    n_blocks = (n + U - 1) // U

    def fetch(j):  # block j of the range (clamped to block 0 when negative)
        j = jnp.maximum(j, 0)
        rows = tuple(load_rows(jnp.minimum(start + j * U + i, last)) for i in range(U))
        return rows, load_ckpt(j)

    def block(c, fetched, j, valid):
        rows, st = fetched
        carry, du, dw = c
        outs = []
        for i in range(U):  # forward recompute
            st, out, res = fwd(st, rows[i][0], rows[i][1])
            outs.append((out, res))
        for i in reversed(range(U)):
            kraw, v, g = rows[i]
            out, res = outs[i]
            new = _bwd_push(plan, w, carry, g, out, res)
            if emit is not None:
                kc = _clamp(plan, kraw)
                if plan.linear:
                    GA, GB, GA2, GB2 = carry
                    kk = _exp_k(plan, kc)
                    direct = u * kk * g * res
                else:
                    GA, GB, GA2, GB2, q = carry
                    kk = jnp.exp(kc + q)  # k_t * exp(q): the carry's scale folded in
                    direct = g * jnp.exp(u_log + kc - res)
                dv = kk * GA + direct
                dk = kk * (v * GA + GB) + direct * (v - out)
                mask = _clamp_grad(plan, kraw)
                if mask is not None:
                    dk = dk * mask
                t = start + j * U + i
                emit(t if valid is None else jnp.minimum(t, last), dk, dv)
                ddu = direct * (v - out)
                ddw = kk * (v * GA2 + GB2)
            if valid is not None:  # steps past the range leave everything unchanged
                ok = i < valid
                new = tuple(jnp.where(ok, a, b) for a, b in zip(new, carry))
                if emit is not None:
                    zero = jnp.zeros_like(ddu)
                    ddu, ddw = jnp.where(ok, ddu, zero), jnp.where(ok, ddw, zero)
            carry = new
            if emit is not None:
                du, dw = du + ddu, dw + ddw
        return carry, du, dw

    zero = jnp.zeros((plan.bc,), jnp.float32)
    j_last = n_blocks - 1
    valid_last = n - j_last * U  # steps of the last block inside the range, 1..U
    static_full = _is_static(valid_last, U)

    def body(i, cc):  # block j = j_last - i; the next one's rows are loaded first
        c, fetched = cc
        j = j_last - i
        nxt = fetch(j - 1)
        # valid_last for the first block walked, U after (arithmetic: see _NO_SCALAR_SELECT)
        valid = None if static_full else valid_last + jnp.minimum(i, 1) * (U - valid_last)
        return block(c, fetched, j, valid), nxt

    c, _ = lax.fori_loop(0, n_blocks, body, ((carry, zero, zero), fetch(j_last)))
    return c if emit is not None else c[0]


# ----------------------------------------------------------------------------------------
# Kernels.


def _load_kv(k_ref, v_ref, b, cs):
    return lambda t: (k_ref[b, t, cs].astype(jnp.float32), v_ref[b, t, cs].astype(jnp.float32))


def _fwd_local_kernel(k_ref, v_ref, td_ref, tf_ref, *loc_refs, plan: _Plan):
    """Chunk-local end state (from a zero state) of each chunk: [n_chunks, B, C] each."""
    b, cs, chunk = _program(plan)
    w, u_log = _params(td_ref, tf_ref, cs)
    start, n = _chunk_range(plan, chunk)
    fwd = _fwd_step_fn(plan, w, u_log)
    step = lambda carry, row, t: fwd(carry, *row, with_out=False)[0]
    carry = _time_loop(plan.unroll, start, n, _load_kv(k_ref, v_ref, b, cs), step,
                       _zero_fwd_state(plan))
    for ref, x in zip(loc_refs, carry):
        ref[chunk, b, cs] = x


def _fwd_kernel(*refs, plan: _Plan, state_in: bool, state_out: bool, save: bool):
    """out [B, T, C]; with `save`, the state every unroll_train steps [B, n_ckpt, C] each;
    with `state_out`, each chunk's end state [n_chunks, B, C] each (the last is the final)."""
    it = iter(refs)
    k_ref, v_ref, td_ref, tf_ref = (next(it) for _ in range(4))
    s0_refs = [next(it) for _ in range(3)] if state_in else None
    loc_refs = [next(it) for _ in range(plan.n_state)] if plan.n_chunks > 1 else None
    out_ref = next(it)
    ck_refs = [next(it) for _ in range(plan.n_state)] if save else None
    sT_refs = [next(it) for _ in range(3)] if state_out else None

    b, cs, chunk = _program(plan)
    w, u_log = _params(td_ref, tf_ref, cs)
    carry = tuple(r[b, cs] for r in s0_refs) if state_in else _zero_fwd_state(plan)
    if plan.n_chunks > 1:

        def fold(j, carry):
            return _fwd_fold(plan, w, carry, tuple(r[j, b, cs] for r in loc_refs))

        carry = lax.fori_loop(0, chunk, fold, carry)

    fwd = _fwd_step_fn(plan, w, u_log)

    def step(carry, row, t):
        carry, out, _ = fwd(carry, *row)
        out_ref[b, t, cs] = out
        return carry

    on_block = None
    U = plan.unroll
    if save:
        U = plan.unroll_train
        blk0 = chunk * (plan.chunk // U)

        def save_block(j, carry):
            for ref, x in zip(ck_refs, carry):
                ref[b, blk0 + j, cs] = x

        on_block = save_block

    start, n = _chunk_range(plan, chunk)
    # The log mode's forward that saves has ~70 instructions per step: two blocks of 16 would
    # be ~36 KB of loop code, past the instruction cache; so one block per iteration there.
    ping_pong = plan.linear or not save
    carry = _time_loop(U, start, n, _load_kv(k_ref, v_ref, b, cs), step, carry, on_block,
                       ping_pong=ping_pong)
    if state_out:
        for ref, x in zip(sT_refs, carry):
            ref[chunk, b, cs] = x


def _uses_tiles(plan: _Plan, state_in: bool, state_out: bool, save: bool) -> bool:
    """Whether a forward runs `_fwd_tile_kernel` (else `_fwd_kernel`)."""
    tile = plan.time_split * (plan.unroll_train if save else plan.unroll)
    return (plan.time_split > 1 and plan.linear and plan.n_chunks == 1 and not state_in
            and not state_out and plan.T % tile == 0)


def _tile_rows(P: int, S: int, tile, s):
    """Time rows of step s of every sub-chunk of a tile: row p of the [P, bc] block is step
    P*S*tile + p*S + s, the layout both tile kernels (and their checkpoints) share."""
    return pl.ds(tile * (P * S) + s, P, stride=S)


def _fwd_tile_kernel(k_ref, v_ref, td_ref, tf_ref, out_ref, *ck_refs, plan: _Plan):
    """The linear-mode forward with time split across the program's warps.

    Time is walked in tiles of P*S steps (P = time_split warps; S = unroll, or unroll_train
    when it saves checkpoints). Warp p
    owns the sub-chunk [P*S*j + p*S, P*S*j + (p+1)*S) of tile j: each value is a [P, bc]
    array whose row p lives on warp p (one channel per thread), loaded as a strided row set.
    Per tile: (1) each sub-chunk's local end state from a zero state (S steps, all P warps at
    once); (2) the state at each sub-chunk's start, an exclusive scan over rows:
    start_p = D^p * carry + sum_{i<p} D^(p-1-i) * local_i with D = d^S (and the next tile's
    carry likewise); (3) the S steps again from those starts, writing out. So one program
    keeps P times the rows in flight of `_fwd_kernel` (P warps instead of one), at the cost
    of two more multiply-adds per step and one exchange between the warps per tile (the
    local sums of A and B through shared memory). With `ck_refs` it
    saves the state at every sub-chunk start: the checkpoints of `_fwd_kernel(save=True)`.
    """
    b, cs, _ = _program(plan)
    w, u_log = _params(td_ref, tf_ref, cs)
    P, S, bc = plan.time_split, (plan.unroll_train if ck_refs else plan.unroll), plan.bc
    d, u, eps = jnp.exp(w)[None], jnp.exp(u_log)[None], plan.k_eps
    # Scan weights, [i, p, channel] (summed over i, axis 0: Triton puts the warps on axis 1):
    # W[i, p] = D^(p-1-i) for i < p (else 0), Wn[i, p] = D^(P-1-i); Dp[p] = D^p.
    i_i = lax.broadcasted_iota(jnp.int32, (P, P, bc), 0)
    p_i = lax.broadcasted_iota(jnp.int32, (P, P, bc), 1)
    Sw = S * w
    W = jnp.where(i_i < p_i, jnp.exp((p_i - 1 - i_i).astype(jnp.float32) * Sw[None, None]),
                  jnp.zeros((P, P, bc), jnp.float32))
    # The carry is a [P, bc] array of P equal rows, so that the next tile's carry comes from
    # the same broadcast of the local states as the starts (one exchange between warps).
    Wn = jnp.exp((P - 1 - i_i).astype(jnp.float32) * Sw[None, None])
    row = lax.broadcasted_iota(jnp.int32, (P, bc), 0).astype(jnp.float32)
    Dp = jnp.exp(row * Sw[None])
    DP = jnp.exp(P * Sw)[None]

    rows_at = functools.partial(_tile_rows, P, S)

    def load(tile):
        return tuple((k_ref[b, rows_at(tile, s), cs].astype(jnp.float32),
                      v_ref[b, rows_at(tile, s), cs].astype(jnp.float32)) for s in range(S))

    def run_tile(carry, rows, tile):
        A0, B0 = carry  # [P, bc], P equal rows: the state before the tile
        ek = [_exp_k(plan, _clamp(plan, kraw)) for kraw, _ in rows]
        kv = [e * v for e, (_, v) in zip(ek, rows)]
        LA = LB = jnp.zeros((P, bc), jnp.float32)
        for s in range(S):
            LA, LB = d * LA + kv[s], d * LB + ek[s]
        LA, LB = LA[:, None], LB[:, None]
        A = jnp.sum(W * LA, axis=0) + Dp * A0
        Bs = jnp.sum(W * LB, axis=0) + Dp * B0
        nxt = (jnp.sum(Wn * LA, axis=0) + DP * A0, jnp.sum(Wn * LB, axis=0) + DP * B0)
        if ck_refs:
            ck_rows = pl.ds(tile * P, P)
            ck_refs[0][b, ck_rows, cs] = A
            ck_refs[1][b, ck_rows, cs] = Bs
        for s in range(S):
            ukk = u * ek[s]
            r = _recip(plan, Bs + ukk + eps)
            out_ref[b, rows_at(tile, s), cs] = (A + ukk * rows[s][1]) * r
            A, Bs = d * A + kv[s], d * Bs + ek[s]
        return nxt

    # One tile per loop iteration: a tile already keeps P*S rows in flight, and two per
    # iteration would compile several times longer.
    z = jnp.zeros((P, bc), jnp.float32)
    _time_loop(1, 0, plan.T // (P * S), load, run_tile, (z, z), ping_pong=False)


def _bwd_tile_kernel(k_ref, v_ref, g_ref, td_ref, tf_ref, ckA_ref, ckB_ref,
                     dk_ref, dv_ref, du_ref, dw_ref, *, plan: _Plan):
    """The linear-mode backward with time split across the program's warps.

    Tiles of P*S steps (P = time_split, S = unroll_train, the checkpoint interval) are
    walked in reverse; warp p owns sub-chunk p of each tile, as in `_fwd_tile_kernel`.
    Per tile: (1) each sub-chunk recomputes its forward from its checkpoint (state before
    each step, 1/den, out: registers only); (2) its local adjoints of the sums at its start,
    from a zero adjoint at its end (GA_{t-1} = d*GA_t + g_t/den_t, GB_{t-1} = d*GB_t -
    g_t*out_t/den_t); (3) the true adjoint at each sub-chunk's end, a reverse exclusive scan
    over rows: E_p = D^(P-1-p) * carry + sum_{i>p} D^(i-1-p) * local_i (D = d^S); (4) the S
    steps in reverse from E_p, writing dk, dv. The time_decay gradient uses the recomputed
    states instead of the serial kernel's GA', GB' recurrences:
    d/d(log d) = d * sum_t (A_t * GA_{t+1} + B_t * GB_{t+1}) (A_t, B_t the sums before step t).
    """
    b, cs, _ = _program(plan)
    w, u_log = _params(td_ref, tf_ref, cs)
    P, S, bc = plan.time_split, plan.unroll_train, plan.bc
    d1 = jnp.exp(w)
    d, u, eps = d1[None], jnp.exp(u_log)[None], plan.k_eps
    # Scan weights, [p, i, channel]: W[p, i] = D^(i-1-p) for i > p (else 0), De[p] = D^(P-1-p),
    # Wn[i] = D^i; the carry is one [bc] row, which runs faster in this longer kernel than
    # the forward's layout ([i, p] with P equal carry rows).
    p_i = lax.broadcasted_iota(jnp.int32, (P, P, bc), 0)
    i_i = lax.broadcasted_iota(jnp.int32, (P, P, bc), 1)
    Sw = S * w
    W = jnp.where(i_i > p_i, jnp.exp((i_i - 1 - p_i).astype(jnp.float32) * Sw[None, None]),
                  jnp.zeros((P, P, bc), jnp.float32))
    row = lax.broadcasted_iota(jnp.int32, (P, bc), 0).astype(jnp.float32)
    De = jnp.exp((P - 1 - row) * Sw[None])
    Wn = jnp.exp(row * Sw[None])
    DP = jnp.exp(P * Sw)
    n_tiles = plan.T // (P * S)

    rows_at = functools.partial(_tile_rows, P, S)

    def load(i):
        tile = n_tiles - 1 - i
        rows = tuple((k_ref[b, rows_at(tile, s), cs].astype(jnp.float32),
                      v_ref[b, rows_at(tile, s), cs].astype(jnp.float32),
                      g_ref[b, rows_at(tile, s), cs]) for s in range(S))
        ck_rows = pl.ds(tile * P, P)
        return rows, (ckA_ref[b, ck_rows, cs], ckB_ref[b, ck_rows, cs])

    def run_tile(carry, fetched, i):
        CA, CB, du, dw = carry  # CA, CB [bc]: adjoints of the sums after the tile
        rows, (A, Bs) = fetched
        tile = n_tiles - 1 - i
        ek, x, out, As, Bss = [], [], [], [], []
        for kraw, v, g in rows:  # forward recompute from the checkpoints
            e = _exp_k(plan, _clamp(plan, kraw))
            ukk = u * e
            r = _recip(plan, Bs + ukk + eps)
            o = (A + ukk * v) * r
            ek.append(e), x.append(g * r), out.append(o), As.append(A), Bss.append(Bs)
            A, Bs = d * A + e * v, d * Bs + e
        LA = LB = jnp.zeros((P, bc), jnp.float32)
        for s in reversed(range(S)):
            LA, LB = d * LA + x[s], d * LB - x[s] * out[s]
        GA = jnp.sum(W * LA[None], axis=1) + De * CA[None]
        GB = jnp.sum(W * LB[None], axis=1) + De * CB[None]
        nxt = (jnp.sum(Wn * LA, axis=0) + DP * CA, jnp.sum(Wn * LB, axis=0) + DP * CB)
        for s in reversed(range(S)):
            kraw, v, _ = rows[s]
            direct = u * ek[s] * x[s]
            dv = ek[s] * GA + direct
            dk = ek[s] * (v * GA + GB) + direct * (v - out[s])
            mask = _clamp_grad(plan, kraw)
            if mask is not None:
                dk = dk * mask
            dk_ref[b, rows_at(tile, s), cs] = dk.astype(dk_ref.dtype)
            dv_ref[b, rows_at(tile, s), cs] = dv.astype(dv_ref.dtype)
            du = du + direct * (v - out[s])
            dw = dw + As[s] * GA + Bss[s] * GB
            GA, GB = d * GA + x[s], d * GB - x[s] * out[s]
        return (*nxt, du, dw)

    z, zz = jnp.zeros((bc,), jnp.float32), jnp.zeros((P, bc), jnp.float32)
    # One tile per loop iteration, as in the forward.
    _, _, du, dw = _time_loop(1, 0, n_tiles, load, run_tile, (z, z, zz, zz), ping_pong=False)
    du_ref[0, b, cs] = jnp.sum(du, axis=0)
    dw_ref[0, b, cs] = jnp.sum(dw, axis=0) * d1


def _bwd_refs(refs, plan):
    it = iter(refs)
    k_ref, v_ref, g_ref, td_ref, tf_ref = (next(it) for _ in range(5))
    ck_refs = [next(it) for _ in range(plan.n_state)]
    rest = list(it)
    b, cs, chunk = _program(plan)
    w, u_log = _params(td_ref, tf_ref, cs)
    blk0 = chunk * (plan.chunk // plan.unroll_train)

    def load_rows(t):
        return (k_ref[b, t, cs].astype(jnp.float32), v_ref[b, t, cs].astype(jnp.float32),
                g_ref[b, t, cs])

    def load_ckpt(j):
        return tuple(r[b, blk0 + j, cs] for r in ck_refs)

    return (b, cs, chunk, w, u_log, load_rows, load_ckpt), rest


def _bwd_local_kernel(*refs, plan: _Plan):
    """Chunk-local backward carry at each chunk's start (from a zero carry at its end)."""
    (b, cs, chunk, w, u_log, load_rows, load_ckpt), loc_refs = _bwd_refs(refs, plan)
    start, n = _chunk_range(plan, chunk)
    carry = _bwd_walk(plan, w, u_log, start, n, load_rows, load_ckpt, _zero_bwd_carry(plan), None)
    for ref, x in zip(loc_refs, carry):
        ref[chunk, b, cs] = x


def _bwd_kernel(*refs, plan: _Plan, state: bool):
    (b, cs, chunk, w, u_log, load_rows, load_ckpt), rest = _bwd_refs(refs, plan)
    it = iter(rest)
    ct_refs = [next(it) for _ in range(3)] if state else None  # gaa, gbb, ppT
    loc_refs = [next(it) for _ in range(plan.n_carry)] if plan.n_chunks > 1 else None
    dk_ref, dv_ref, du_ref, dw_ref = (next(it) for _ in range(4))
    c0_refs = [next(it) for _ in range(plan.n_carry)] if state else None

    if state:  # log mode: GA = gaa * exp(-ppT), GB = gbb * exp(-ppT)
        z = jnp.zeros((plan.bc,), jnp.float32)
        carry = (ct_refs[0][b, cs], ct_refs[1][b, cs], z, z, -ct_refs[2][b, cs])
    else:
        carry = _zero_bwd_carry(plan)
    if plan.n_chunks > 1:
        last = plan.T - (plan.n_chunks - 1) * plan.chunk

        def fold(i, carry):
            j = plan.n_chunks - 1 - i
            # last for the last chunk, plan.chunk before it (arithmetic: see _NO_SCALAR_SELECT)
            length = (plan.chunk - (plan.chunk - last) * (j == plan.n_chunks - 1).astype(jnp.int32))
            length = length.astype(jnp.float32)
            return _bwd_fold(plan, w, carry, tuple(r[j, b, cs] for r in loc_refs), length)

        carry = lax.fori_loop(0, plan.n_chunks - 1 - chunk, fold, carry)

    def emit(t, dk, dv):
        dk_ref[b, t, cs] = dk.astype(dk_ref.dtype)
        dv_ref[b, t, cs] = dv.astype(dv_ref.dtype)

    start, n = _chunk_range(plan, chunk)
    carry, du, dw = _bwd_walk(plan, w, u_log, start, n, load_rows, load_ckpt, carry, emit)
    du_ref[chunk, b, cs] = du
    dw_ref[chunk, b, cs] = dw
    if state:
        for ref, x in zip(c0_refs, carry):
            ref[chunk, b, cs] = x


# ----------------------------------------------------------------------------------------
# Calls.


def _call(plan: _Plan, kernel, out_shapes, *args, name: str):
    return pl.pallas_call(
        kernel,
        out_shape=out_shapes,
        grid=plan.grid,
        interpret=plan.interpret,
        name=name,
        compiler_params=plgpu.CompilerParams(
            num_warps=plan.num_warps, num_stages=plan.num_stages
        ),
    )(*args)


def _sds(shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


def _forward(plan: _Plan, k, v, td, tf, state0, *, save: bool, state_out: bool):
    """(out, checkpoints or None, final state or None) on padded arrays."""
    B, T, C, NC = plan.B, plan.T, plan.C, plan.n_chunks
    local = ()
    if NC > 1:
        local = _call(
            plan, functools.partial(_fwd_local_kernel, plan=plan),
            [_sds((NC, B, C))] * plan.n_state, k, v, td, tf, name="wkv_fwd_chunk_states",
        )
    out_shapes = ([_sds((B, T, C))] + [_sds((B, plan.n_ckpt, C))] * plan.n_state * save
                  + [_sds((NC, B, C))] * 3 * state_out)
    if _uses_tiles(plan, state0 is not None, state_out, save):
        outs = _call(dataclasses.replace(plan, num_warps=plan.tile_warps),
                     functools.partial(_fwd_tile_kernel, plan=plan), out_shapes, k, v, td, tf,
                     name="wkv_fwd_tiles")
        return outs[0], (tuple(outs[1:]) if save else None), None
    kernel = functools.partial(
        _fwd_kernel, plan=plan, state_in=state0 is not None, state_out=state_out, save=save,
    )
    outs = _call(plan, kernel, out_shapes, k, v, td, tf, *(state0 or ()), *local, name="wkv_fwd")
    ckpts = tuple(outs[1:1 + plan.n_state]) if save else None
    final = tuple(x[-1] for x in outs[len(outs) - 3:]) if state_out else None
    return outs[0], ckpts, final


def _backward(plan: _Plan, k, v, td, tf, ckpts, g, final_ct):
    """(dk, dv, d log u summed, d log d summed, carry at t=-1 or None) on padded arrays."""
    B, T, C, NC = plan.B, plan.T, plan.C, plan.n_chunks
    local = ()
    if NC > 1:
        local = _call(
            plan, functools.partial(_bwd_local_kernel, plan=plan),
            [_sds((NC, B, C))] * plan.n_carry, k, v, g, td, tf, *ckpts,
            name="wkv_bwd_chunk_carries",
        )
    state = final_ct is not None
    out_shapes = ([_sds((B, T, C), k.dtype), _sds((B, T, C), v.dtype)]
                  + [_sds((NC, B, C))] * 2 + [_sds((NC, B, C))] * plan.n_carry * state)
    if _uses_tiles(plan, state, state, save=True):
        dk, dv, du, dw = _call(dataclasses.replace(plan, num_warps=plan.tile_warps),
                               functools.partial(_bwd_tile_kernel, plan=plan), out_shapes,
                               k, v, g, td, tf, *ckpts, name="wkv_bwd_tiles")
        return dk, dv, du.sum((0, 1)), dw.sum((0, 1)), None
    outs = _call(
        plan, functools.partial(_bwd_kernel, plan=plan, state=state), out_shapes,
        k, v, g, td, tf, *ckpts, *(final_ct or ()), *local, name="wkv_bwd",
    )
    dk, dv, du, dw = outs[:4]
    carry0 = tuple(x[0] for x in outs[4:]) if state else None
    return dk, dv, du.sum((0, 1)), dw.sum((0, 1)), carry0


# Without state: out = f(k, v, time_decay, time_first).


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _wkv_core(plan, k, v, td, tf):
    return _forward(plan, k, v, td, tf, None, save=False, state_out=False)[0]


def _wkv_core_fwd(plan, k, v, td, tf):
    out, ckpts, _ = _forward(plan, k, v, td, tf, None, save=True, state_out=False)
    return out, (k, v, td, tf, ckpts)


def _wkv_core_bwd(plan, saved, g):
    k, v, td, tf, ckpts = saved
    dk, dv, du, dw, _ = _backward(plan, k, v, td, tf, ckpts, g.astype(jnp.float32), None)
    return dk, dv, dw * -jnp.exp(td), du


_wkv_core.defvjp(_wkv_core_fwd, _wkv_core_bwd)


# With state (log mode): (out, aa, bb, pp) = f(k, v, time_decay, time_first, aa0, bb0, pp0).


def _final_pp(k, td, pp0, k_clamp):
    """pp after the last step, as a closed form: max(pp0 + T*w, max_t(K_t + (T-1-t)*w))."""
    T = k.shape[1]
    kc = k.astype(jnp.float32)
    if k_clamp is not None:
        kc = jnp.minimum(kc, k_clamp)
    w = -jnp.exp(td)
    lag = (T - 1 - jnp.arange(T)).astype(jnp.float32)[:, None] * w  # [T, C]
    x = kc + lag  # [B, T, C]
    # Gradients reach the maximum through its index: jnp.max's gradient tests x == max(x),
    # and under jit XLA may round x differently on the two sides of that test.
    t = jnp.argmax(jax.lax.stop_gradient(x), axis=1)[:, None, :]
    last = jnp.take_along_axis(x, t, axis=1)[:, 0]
    start = pp0 + T * w
    return jnp.where(start >= last, start, last)


# K at padded steps of `wkv_with_state(lengths=)`: exp(PAD_K) is 0 in float32 and bfloat16,
# and every expression of the kernels stays finite with it (no inf - inf).
PAD_K = -1e30


def _pp_at_lengths(k, td, pp0, lengths, k_clamp):
    """pp after lengths[b] steps of row b, in closed form:
    max(pp0 + n*w, max_{t<n}(K_t + (n-1-t)*w)) with n = lengths[b], w = log d."""
    T = k.shape[1]
    kc = k.astype(jnp.float32)
    if k_clamp is not None:
        kc = jnp.minimum(kc, k_clamp)
    w = -jnp.exp(td.astype(jnp.float32))
    n = lengths.astype(jnp.int32)[:, None, None]  # [B, 1, 1]
    t = jnp.arange(T)[None, :, None]
    lag = (n - 1 - t).astype(jnp.float32) * w  # [B, T, C]
    terms = jnp.where(t < n, kc + lag, -jnp.inf)
    return jnp.maximum(pp0 + n[:, 0].astype(jnp.float32) * w, jnp.max(terms, axis=1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _wkv_state_core(plan, k, v, td, tf, aa0, bb0, pp0):
    out, _, final = _forward(plan, k, v, td, tf, (aa0, bb0, pp0), save=False, state_out=True)
    return (out, *final)


def _wkv_state_core_fwd(plan, k, v, td, tf, aa0, bb0, pp0):
    out, ckpts, final = _forward(plan, k, v, td, tf, (aa0, bb0, pp0), save=True, state_out=True)
    return (out, *final), (k, v, td, tf, aa0, bb0, pp0, ckpts, final)


def _wkv_state_core_bwd(plan, saved, cts):
    k, v, td, tf, aa0, bb0, pp0, ckpts, (aaT, bbT, ppT) = saved
    g, gaa, gbb, gpp = (x.astype(jnp.float32) for x in cts)
    dk, dv, du, dw, (ga, gb, ga2, gb2, q) = _backward(
        plan, k, v, td, tf, ckpts, g, (gaa, gbb, ppT)
    )
    # Initial state: the carry at t = -1 is the adjoint of its true sums aa0*exp(pp0), ...
    scale = jnp.exp(q + pp0)
    daa0, dbb0 = ga * scale, gb * scale
    dpp0 = daa0 * aa0 + dbb0 * bb0
    dw = dw + ((ga2 * aa0 + gb2 * bb0) * scale).sum(0)
    dtd = dw * -jnp.exp(td)
    # The final pp itself: what its cotangent carries beyond the scale of aa, bb.
    gpp_eff = gpp - gaa * aaT - gbb * bbT
    _, pp_vjp = jax.vjp(functools.partial(_final_pp, k_clamp=plan.k_clamp), k, td, pp0)
    dk_pp, dtd_pp, dpp0_pp = pp_vjp(gpp_eff)
    return (dk + dk_pp.astype(dk.dtype), dv, dtd + dtd_pp, du, daa0, dbb0, dpp0 + dpp0_pp)


_wkv_state_core.defvjp(_wkv_state_core_fwd, _wkv_state_core_bwd)


# With lengths (right-padded rows): the kernel forward on masked K; the backward is the
# reference's. Through padded steps the kernel's state gradient w.r.t. time_decay is a
# difference of two terms that grow with the padding (the decay of the true sums, and
# of their scale exp(pp)), which cancel only to ~1e-3 in float32 after a few dozen padded
# steps; differentiating a ragged prefill is rare, so exactness wins over speed there.


def _ragged_forward(opts, k, v, td, tf, aa0, bb0, pp0, lengths):
    k_clamp, k_eps, interpret, block_sizes = opts
    T = k.shape[1]
    valid = jnp.arange(T)[None, :, None] < lengths[:, None, None]
    out, (aa, bb, _) = wkv_with_state(
        jnp.where(valid, k, jnp.asarray(PAD_K, k.dtype)), v, td, tf, WKVState(aa0, bb0, pp0),
        k_clamp=k_clamp, k_eps=k_eps, interpret=interpret, block_sizes=block_sizes,
    )
    return out, aa, bb, _pp_at_lengths(k, td, pp0, lengths, k_clamp)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _ragged(opts, k, v, td, tf, aa0, bb0, pp0, lengths):
    return _ragged_forward(opts, k, v, td, tf, aa0, bb0, pp0, lengths)


def _ragged_fwd(opts, k, v, td, tf, aa0, bb0, pp0, lengths):
    return _ragged_forward(opts, k, v, td, tf, aa0, bb0, pp0, lengths), (k, v, td, tf, aa0, bb0, pp0, lengths)


def _ragged_bwd(opts, saved, cts):
    k_clamp, k_eps, _, _ = opts
    k, v, td, tf, aa0, bb0, pp0, lengths = saved

    def ref(k, v, td, tf, aa0, bb0, pp0):
        out, st = wkv_with_state_reference(k, v, td, tf, WKVState(aa0, bb0, pp0), k_clamp=k_clamp,
                                           k_eps=k_eps, lengths=lengths)
        return (out, *st)

    _, pullback = jax.vjp(ref, k, v, td, tf, aa0, bb0, pp0)
    return (*pullback(tuple(cts)), None)


_ragged.defvjp(_ragged_fwd, _ragged_bwd)


# ----------------------------------------------------------------------------------------
# Public API.


def _check(k, v, time_decay, time_first):
    if k.ndim != 3 or v.shape != k.shape:
        raise ValueError(f"wkv: k and v must be [B, T, C] of one shape, got {k.shape=} {v.shape=}")
    B, T, C = k.shape
    if time_decay.shape != (C,) or time_first.shape != (C,):
        raise ValueError(
            f"wkv: time_decay and time_first must be [C={C}], got "
            f"{time_decay.shape=} {time_first.shape=}"
        )
    if T < 1 or B < 1 or C < 1:
        raise ValueError(f"wkv: empty input {k.shape=}")


def _pad_c(x, c_pad, value=0.0):
    extra = c_pad - x.shape[-1]
    if extra == 0:
        return x
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)], constant_values=value)


def wkv(
    k: jax.Array,  # [B, T, C] K before exp, float32 or bfloat16
    v: jax.Array,  # [B, T, C]
    time_decay: jax.Array,  # [C] raw parameter: d = exp(-exp(time_decay))
    time_first: jax.Array,  # [C] raw parameter: u = exp(time_first)
    *,
    k_clamp: Optional[float] = 60.0,
    k_eps: float = 1e-9,
    interpret: bool = False,
    block_sizes: Optional[WKVBlockSizes] = None,
    mode: Optional[str] = None,
) -> jax.Array:
    """out [B, T, C] float32 = num / den of the spec, from the start of a sequence.

    Same function as `wkv_reference`. Differentiable (custom VJP, Pallas
    backward) in k, v, time_decay and time_first; k's gradient is 0 where the clamp cuts.
    mode: None picks "linear" when k_clamp <= 64 and k_eps > 0, else "log" (see module doc).
    interpret=True runs the kernels in the Pallas interpreter (CPU).
    """
    _check(k, v, time_decay, time_first)
    if mode is None:
        linear = k_clamp is not None and k_clamp <= LINEAR_MAX_CLAMP and k_eps >= LINEAR_MIN_EPS
    elif mode in ("linear", "log"):
        linear = mode == "linear"
        if linear and (k_clamp is None or k_clamp > LINEAR_MAX_CLAMP or k_eps < LINEAR_MIN_EPS):
            raise ValueError(
                f"wkv: mode='linear' needs k_clamp <= {LINEAR_MAX_CLAMP} and "
                f"k_eps >= {LINEAR_MIN_EPS}, got {k_clamp=} {k_eps=}"
            )
    else:
        raise ValueError(f"wkv: {mode=} must be None, 'linear' or 'log'")
    B, T, C = k.shape
    plan = _make_plan(B, T, C, k_clamp=k_clamp, k_eps=k_eps, linear=linear,
                      blocks=block_sizes or DEFAULT_BLOCK_SIZES, interpret=interpret)
    out = _wkv_core(
        plan, _pad_c(k, plan.C), _pad_c(v, plan.C),
        _pad_c(time_decay.astype(jnp.float32), plan.C),
        _pad_c(time_first.astype(jnp.float32), plan.C),
    )
    return out[..., :C]


def wkv_with_state(
    k: jax.Array,  # [B, T, C] K before exp
    v: jax.Array,  # [B, T, C]
    time_decay: jax.Array,  # [C]
    time_first: jax.Array,  # [C]
    state: Optional[WKVState] = None,
    *,
    k_clamp: Optional[float] = 60.0,
    k_eps: float = 1e-9,
    interpret: bool = False,
    block_sizes: Optional[WKVBlockSizes] = None,
    lengths: Optional[jax.Array] = None,
) -> Tuple[jax.Array, WKVState]:
    """(out [B, T, C] float32, state after the last step), starting from `state` (None: empty).

    Same function and state convention as `wkv_with_state_reference` (always the
    running-max "log" mode, so the returned (aa, bb, pp) match the reference's).
    Differentiable in k, v, time_decay, time_first and the initial state, and through the
    returned state.

    lengths [B] int (optional): row b is right-padded after lengths[b] >= 1 tokens; the state
    returned is the one after its token lengths[b] - 1, as the reference's (outputs at padded
    steps are junk). The kernel itself is unchanged: K is set to PAD_K (exp -> exactly 0) at
    padded steps, which leaves aa and bb bit-for-bit unchanged and only decays pp by w per
    step; pp is then taken from its closed form at lengths[b] (see `_pp_at_lengths`).
    Gradients with lengths come from the plain-JAX reference (see `_ragged`).
    """
    _check(k, v, time_decay, time_first)
    B, T, C = k.shape
    if state is None:
        state = WKVState.zeros(B, C)
    for name, x in zip(WKVState._fields, state):
        if x.shape != (B, C):
            raise ValueError(f"wkv_with_state: state.{name} must be [B={B}, C={C}], got {x.shape}")
    if lengths is not None:
        if jnp.shape(lengths) != (B,):
            raise ValueError(f"wkv_with_state: lengths must be [B={B}], got shape {jnp.shape(lengths)}")
        opts = (k_clamp, k_eps, interpret, block_sizes)
        out, aa, bb, pp = _ragged(opts, k, v, time_decay, time_first, *state, jnp.asarray(lengths, jnp.int32))
        return out, WKVState(aa, bb, pp)
    plan = _make_plan(B, T, C, k_clamp=k_clamp, k_eps=k_eps, linear=False,
                      blocks=block_sizes or DEFAULT_BLOCK_SIZES, interpret=interpret)
    out, aa, bb, pp = _wkv_state_core(
        plan, _pad_c(k, plan.C), _pad_c(v, plan.C),
        _pad_c(time_decay.astype(jnp.float32), plan.C),
        _pad_c(time_first.astype(jnp.float32), plan.C),
        *(_pad_c(x.astype(jnp.float32), plan.C) for x in state),
    )
    return out[..., :C], WKVState(aa[:, :C], bb[:, :C], pp[:, :C])
