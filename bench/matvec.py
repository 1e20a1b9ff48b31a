"""Decode-step matrix products on one GPU: correctness of the Pallas matvec kernel first, then a
timing table against XLA's dot (what the decode step runs otherwise).

    python3 bench/matvec.py                 # checks, copy bandwidth, the table (B=1, bf16): < ~90 s
    python3 bench/matvec.py --batch 1 8     # also B=8 (checks and table)
    python3 bench/matvec.py --sweep         # also time ~15 block-size variants per shape (minutes)
    python3 bench/matvec.py --smoke         # tiny shapes in interpret mode (CPU, checks the script)

Shapes [out, in] are the L24-D1024 model's (bf16 weights): time-mix K/V/R merged (3072,
1024), time-mix output (1024, 1024), channel-mix K/R merged (5120, 1024), channel-mix value
(1024, 4096), head (50277, 1024).

Method: one jitted function computes the product of the same x with each of n distinct
weight matrices (n >= 24, and enough matrices for >= 200 MB, 4x the 50 MB L2, so no matrix
is still cached when its turn comes again); its time is the median over repeats of N
back-to-back calls followed by one block, after a compile-and-warm-up call, divided by n.
"GB/s" is the weight bytes over that time (x and y are negligible) and "%copy" compares it
with this card's measured device-to-device copy (bytes read + written per second).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: this checkout first

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.timing import copy_bandwidth, time_fn  # noqa: E402
from jax import lax  # noqa: E402

from pallas_kernels.matvec import MatvecBlockSizes, _make_plan, matvec, matvec_reference  # noqa: E402

SHAPES = [(3072, 1024), (1024, 1024), (5120, 1024), (1024, 4096), (50277, 1024)]
SMOKE_SHAPES = [(48, 40), (20, 100), (300, 64), (16, 4096)]  # the last one split-K
MIN_MATRICES = 24
ROTATE_BYTES = 200e6  # >= 4x the L2 cache of an H100/H200 (50 MB)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, nargs="+", default=[1], help="batch sizes B (default: 1)")
    p.add_argument("--reps", type=int, default=7, help="timed repeats per measurement (median)")
    p.add_argument("--min-time", type=float, default=0.1,
                   help="seconds of back-to-back calls per repeat (sets N)")
    p.add_argument("--sweep", action="store_true", help="also time block-size variants")
    p.add_argument("--no-check", action="store_true", help="skip the correctness checks")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode (CPU)")
    return p.parse_args()


# ---------------------------------------------------------------------------------------
# Correctness on the device.


def make_x(seed, B, inp):
    return jax.random.normal(jax.random.key(seed), (B, inp), jnp.float32)


def make_w(seed, out, inp, dtype):
    w = jax.random.normal(jax.random.key(seed), (out, inp), jnp.float32) / np.sqrt(inp)
    return w.astype(dtype)


def check_case(seed, B, out, inp, dtype, interpret, out_dtypes):
    """Max over outputs of |kernel - reference| / tol, for each out_dtype (None: w's dtype).

    tol = 2e-5 * sum_i |x_i w_i| (float32 sums in two orders; see tests/test_matvec_kernel.py)
    plus, for a bf16/f16 output, one ulp of the reference (the two round separately).
    """
    x, w = make_x(seed, B, inp), make_w(seed + 1, out, inp, dtype)
    scale = matvec_reference(jnp.abs(x.astype(dtype)), jnp.abs(w), out_dtype=jnp.float32)
    worst = 0.0
    for out_dtype in out_dtypes:
        y = jax.jit(lambda x, w, d=out_dtype: matvec(x, w, out_dtype=d, interpret=interpret))(x, w)
        ref = matvec_reference(x, w, out_dtype=out_dtype)
        y, ref = y.astype(jnp.float32), ref.astype(jnp.float32)
        tol = 2e-5 * scale + 1e-30
        if out_dtype is None and jnp.dtype(dtype) != jnp.float32:
            tol = tol + jnp.abs(ref) * float(jnp.finfo(dtype).eps)
        ratio = jnp.where(jnp.isfinite(y), jnp.abs(y - ref) / tol, jnp.inf)
        worst = max(worst, float(jnp.max(ratio)))
    return worst


def check(args) -> bool:
    seed = int(np.random.SeedSequence().entropy % 2**31)
    print(f"## Correctness (kernel vs matvec_reference, float32 and default outputs), seed={seed}")
    bf16, f32 = jnp.bfloat16, jnp.float32
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    # The timed shapes as timed (bf16 output), then float32 outputs too (the tight check) on
    # ragged rows and `in` tail, float32 weights, split-K with a tail, the tensor-core path.
    cases = [(B, out, inp, bf16, (None,)) for B in args.batch for out, inp in shapes]
    both = (jnp.float32, None)
    if args.smoke:
        extra = [(1, 16, 4096, bf16), (2, 57, 100, f32), (12, 40, 100, bf16), (3, 300, 1000, bf16)]
    else:
        extra = [(1, 1024, 4096, bf16), (2, 257, 1000, f32), (5, 1000, 4100, bf16),
                 (1, 50277, 768, f32), (16, 3072, 1024, bf16), (16, 1024, 4096, bf16),
                 (12, 50277, 1000, bf16)]
    cases += [(*c, both) for c in extra]
    ok = True
    for i, (B, out, inp, dtype, out_dtypes) in enumerate(cases):
        plan = _make_plan(B, out, inp, dtype, blocks=MatvecBlockSizes(), interpret=args.smoke)
        try:
            worst = check_case(seed + 2 * i, B, out, inp, dtype, args.smoke, out_dtypes)
        except Exception as e:  # noqa: BLE001 - report, go on
            worst = float("inf")
            print(f"  {type(e).__name__}: {str(e)[:400]}")
        good = worst <= 1.0
        ok &= good
        outs = "/".join("default" if d is None else jnp.dtype(d).name for d in out_dtypes)
        print(f"{'PASS' if good else 'FAIL'} B={B} out={out} in={inp} {jnp.dtype(dtype).name} "
              f"(out {outs}): max err/tol {worst:.2g} [{plan_str(plan)}]")
    print(f"CORRECTNESS: {'PASS' if ok else 'FAIL'}")
    return ok


def plan_str(plan) -> str:
    s = f"bo={plan.bo} bi={plan.bi}{'+tail' if plan.tail else ''} programs={plan.n_ob}x{plan.n_split}"
    return s + (" dot" if plan.dot else "")


# ---------------------------------------------------------------------------------------
# Timing.


def xla_product(x, w_t):
    """XLA's product as the decode step runs it (bf16 weights, [out, in])."""
    return lax.dot_general(x.astype(w_t.dtype), w_t, (((1,), (1,)), ((), ())))


def products(fn):
    """A jitted function: fn(x, w) for each of the weight matrices ws (one launch per call)."""
    return jax.jit(lambda x, ws: tuple(fn(x, w) for w in ws))


class Matrices:
    """n distinct [out, in] weight matrices, enough that the L2 cache cannot hold them."""

    def __init__(self, out, inp, dtype, smoke):
        nbytes = out * inp * jnp.dtype(dtype).itemsize
        self.n = 3 if smoke else max(MIN_MATRICES, -(-int(ROTATE_BYTES) // nbytes))
        self.nbytes = nbytes
        gen = jax.jit(lambda k: (jax.random.normal(k, (out, inp), jnp.float32) / np.sqrt(inp)).astype(dtype))
        self.ws = [gen(jax.random.key(100 + i)) for i in range(self.n)]


TABLE_HEAD = ("| impl | B | out | in | MB | µs per product | GB/s (%copy) | vs XLA | plan |\n"
              "|---|---|---|---|---|---|---|---|---|")


def time_row(name, fn, x, mats, copy_bw, args, xla_t=None, plan=None):
    try:
        t = time_fn(products(fn), [(x, mats.ws)], args.reps, args.min_time) / mats.n
    except Exception as e:  # noqa: BLE001 - one failure must not end the run
        print(f"  {name}: {type(e).__name__}: {str(e)[:300]}")
        return None, f"| {name} | {x.shape[0]} | - | - | - | failed | - | - | - |"
    gbs = mats.nbytes / t / 1e9
    vs = "-" if xla_t is None else f"{xla_t / t:.2f}x"
    out, inp = mats.ws[0].shape
    row = (f"| {name} | {x.shape[0]} | {out} | {inp} | {mats.nbytes / 1e6:.3g} | {t * 1e6:,.2f} | "
           f"{gbs:,.0f} ({100 * gbs * 1e9 / copy_bw:.0f}%) | {vs} | {plan_str(plan) if plan else '-'} |")
    print(row + f"  (n={mats.n}, compile+first call {time_fn.first_call:.1f}s)", flush=True)
    return t, row


def table(args, copy_bw):
    interp = args.smoke
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    print(f"\n## Timing (bf16 weights, bf16 x and y; median of {args.reps})")
    print(TABLE_HEAD)
    rows = []
    for out, inp in shapes:
        mats = Matrices(out, inp, jnp.bfloat16, args.smoke)
        for B in args.batch:
            x = make_x(B, B, inp).astype(jnp.bfloat16)
            xla_t, row = time_row("XLA dot_general", xla_product, x, mats, copy_bw, args)
            rows.append(row)
            plan = _make_plan(B, out, inp, jnp.bfloat16, blocks=MatvecBlockSizes(), interpret=interp)
            _, row = time_row("pallas matvec", lambda x, w: matvec(x, w, interpret=interp),
                              x, mats, copy_bw, args, xla_t, plan)
            rows.append(row)
        del mats
    return rows


def sweep(args, copy_bw):
    """Block-size variants of the kernel at every shape (variants whose plan equals an earlier
    variant's at a shape are skipped there)."""
    interp = args.smoke
    V = MatvecBlockSizes
    variants = [
        V(), V(block_out=4), V(block_out=16), V(block_out=32), V(block_in=256), V(block_in=1024),
        V(num_warps=2), V(num_warps=8), V(num_stages=2), V(num_stages=3),
        V(min_programs=1), V(min_programs=1024), V(min_programs=1024, min_split_blocks=1),
        V(eviction_policy="evict_first"),
        # Tensor cores at any B (x padded to 16 rows); Triton pipelines tl.dot's loads itself.
        V(dot_min_batch=1), V(dot_min_batch=1, block_out=32), V(dot_min_batch=1, block_out=64),
        V(dot_min_batch=1, block_in=256), V(dot_min_batch=1, num_stages=3),
    ]
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    print("\n## Sweep (pallas matvec, bf16): block sizes vs time")
    print(TABLE_HEAD.replace("| impl |", "| block sizes |").replace("| vs XLA |", "| vs default |"))
    default = V()
    for out, inp in shapes:
        mats = Matrices(out, inp, jnp.bfloat16, args.smoke)
        for B in args.batch:
            x = make_x(B, B, inp).astype(jnp.bfloat16)
            seen, base_t = set(), None
            for bs in variants:
                plan = _make_plan(B, out, inp, jnp.bfloat16, blocks=bs, interpret=interp)
                if plan in seen:
                    continue
                seen.add(plan)
                diff = {f.name: getattr(bs, f.name) for f in dataclasses.fields(bs)
                        if getattr(bs, f.name) != getattr(default, f.name)}
                t, _ = time_row(str(diff or "default"),
                                lambda x, w, bs=bs: matvec(x, w, block_sizes=bs, interpret=interp),
                                x, mats, copy_bw, args, base_t, plan)
                if base_t is None:
                    base_t = t
        del mats


def main():
    args = parse_args()
    if args.smoke:
        args.reps, args.min_time = 2, 0.01
    dev = jax.devices()[0]
    print(f"# matvec benchmark: {dev.device_kind} ({dev.platform}), jax {jax.__version__}, "
          f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print("command: python3 " + " ".join(sys.argv))
    if dev.platform != "gpu" and not args.smoke:
        print("No GPU: the Pallas Triton kernel needs one (use --smoke for interpret mode on CPU).")
        return 1
    t0 = time.perf_counter()
    ok = None if args.no_check else check(args)
    copy_bw = copy_bandwidth(args.smoke)
    print(f"copy bandwidth (read + write): {copy_bw / 1e9:.0f} GB/s")
    rows = table(args, copy_bw)
    if args.sweep:
        sweep(args, copy_bw)
    verdict = "not run (--no-check)" if ok is None else ("PASS" if ok else "FAIL")
    print(f"\n## Summary: {dev.device_kind}, copy {copy_bw / 1e9:.0f} GB/s, correctness {verdict}, "
          f"{time.perf_counter() - t0:.0f} s")
    print(TABLE_HEAD)
    print("\n".join(rows))
    return 1 if ok is False else 0


if __name__ == "__main__":
    sys.exit(main())
