"""WKV on one GPU: correctness of the Pallas kernel first, then a timing table.

    python3 bench/wkv.py                  # checks, copy bandwidth, the table (markdown)
    python3 bench/wkv.py --sweep          # also time block-size variants of the kernel
    python3 bench/wkv.py --sweep-only unroll --no-check     # those variants and the defaults only
    python3 bench/wkv.py --trials 5       # each row on 5 fresh allocations: median (range)
    python3 bench/wkv.py --wall-only      # no profiler traces: wall time per call only
    python3 bench/wkv.py --kernels        # also list the GPU kernels of each Pallas call
    python3 bench/wkv.py --smoke          # tiny shapes in interpret mode (CPU, checks the script)

Each cell has up to three times per call, after a compile-and-warm-up call, rotating over
three input sets where they fit so the L2 cache does not hold the inputs:
* "GPU": the kernels' own time, from a jax.profiler trace of back-to-back calls (each GPU
  kernel's median duration times its count per call, summed). This is the kernel's speed.
* "jit16": the wall time per call of 16 independent calls (distinct inputs) inside one jitted
  function: what a call costs inside a jitted model, launch gaps and any XLA op around the
  Pallas calls included (skipped where 16 input sets would not fit in --jit16-gb).
* "wall": the median over repeats of N back-to-back calls followed by one block (repeat time
  / N). It includes the host's dispatch of each call: the script prints that floor (a jitted
  call of four inputs running one tiny kernel), and a kernel shorter than it is timed as the
  dispatch, not as itself.
Slow rows (over 0.1 s a call: the baselines) are not traced; their cell is the wall time.
"GB/s" is the fewest bytes the operation must move (inputs read once, outputs written once:
forward k, v, out; backward k, v, g, dk, dv) over the GPU time (else the wall time), and
"%copy" compares it with this card's measured device-to-device copy.
Implementations: the Pallas kernel (pallas_kernels.wkv), the plain-JAX O(T) scan
(pallas_kernels.wkv.wkv_reference) and the original O(T^2) convolution
(pallas_kernels.wkv.wkv_convolution, skipped where its [T, T, C] weights would not fit).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: this checkout first

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench.timing import copy_bandwidth, device_time, kernel_breakdown, time_fn  # noqa: E402

from pallas_kernels.wkv import WKVBlockSizes, wkv, wkv_with_state  # noqa: E402
from pallas_kernels.wkv import _make_plan  # noqa: E402
from pallas_kernels.wkv import WKVState, wkv_convolution, wkv_reference  # noqa: E402
from pallas_kernels.wkv import wkv_with_state_reference as reference_with_state  # noqa: E402

# (B, C, T): training shapes of the released widths and a longer context, single long rows
# (time chunks), then (1, 1024, 1024): one 1,024-token chunk of a batch-1 prefill.
SIZES = [(8, 1024, 768), (8, 1024, 1024), (8, 2048, 1024), (1, 1024, 16384), (1, 1024, 65536), (1, 1024, 1024)]
IN_JIT_CALLS = 16  # calls per jitted program of the "jit16" time (--smoke: 2)
CONV_MAX_BYTES = 10e9  # the convolution's [T, T, C] float32 weights must stay under this


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default=None,
                   help="B,C,T triples separated by ';' (default: SIZES)")
    p.add_argument("--reps", type=int, default=7, help="timed repeats per measurement (median)")
    p.add_argument("--min-time", type=float, default=0.15,
                   help="seconds of back-to-back calls per repeat (sets N)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="k and v dtype")
    p.add_argument("--sweep", action="store_true", help="also time block-size variants")
    p.add_argument("--sweep-only", default=None, metavar="TEXT",
                   help="only the sweep variants whose changed block sizes contain TEXT (e.g. unroll; "
                        "several texts separated by |), and the defaults to compare; no table")
    p.add_argument("--trials", type=int, default=1,
                   help="time each Pallas row this many times, each on freshly allocated inputs; "
                        "the cell shows the median and the range (baselines: once)")
    p.add_argument("--wall-only", action="store_true",
                   help="no profiler traces: only the wall time per call of back-to-back calls "
                        "(which includes the host's dispatch of each call)")
    p.add_argument("--kernels", action="store_true",
                   help="print each Pallas row's GPU kernels per call (from the trace of the jit16 calls)")
    p.add_argument("--jit16-gb", type=float, default=8.0,
                   help="largest total size of the 16 input sets of a jit16 measurement, GB (default 8)")
    p.add_argument("--no-check", action="store_true", help="skip the correctness checks")
    p.add_argument("--no-baselines", action="store_true", help="time only the Pallas kernel")
    p.add_argument("--smoke", action="store_true", help="tiny shapes, interpret mode (CPU)")
    return p.parse_args()


def rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    if not np.all(np.isfinite(x)):
        return float("inf")
    floor = 1e-2 * np.sqrt(ref.size)  # see tests/test_wkv_kernel.py
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), floor))


def make_inputs(seed, B, T, C, k_kind="normal", dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    k = {"normal": lambda: rng.normal(0, 3, (B, T, C)),
         "far_above_clamp": lambda: rng.normal(30, 80, (B, T, C)),
         "pm200": lambda: rng.uniform(-200, 200, (B, T, C))}[k_kind]()
    v = rng.normal(0, 1, (B, T, C))
    td = rng.uniform(-3, 1.5, C)
    tf = rng.normal(np.log(0.3), 1, C)
    g = rng.normal(0, 1, (B, T, C))
    return (jnp.asarray(k, dtype), jnp.asarray(v, dtype), jnp.asarray(td, jnp.float32),
            jnp.asarray(tf, jnp.float32)), jnp.asarray(g, jnp.float32)


def vjp_fn(fn):
    def run(k, v, td, tf, g):
        out, pullback = jax.vjp(fn, k, v, td, tf)
        return out, pullback(g)
    return jax.jit(run)


# ---------------------------------------------------------------------------------------
# Correctness on the device.


def check(args) -> bool:
    interpret = args.smoke
    seed = int(np.random.SeedSequence().entropy % 2**31)
    print(f"## Correctness (kernel vs pallas_kernels.wkv's reference, outputs and 4 gradients), seed={seed}")
    big = [] if args.smoke else [(8, 1024, 1024, "normal", 60.0, jnp.float32),
                                 (8, 1024, 1024, "normal", None, jnp.float32)]
    cases = big + [
        (3, 777 if not args.smoke else 77, 100, "normal", 60.0, jnp.float32),
        (3, 777 if not args.smoke else 77, 100, "normal", None, jnp.float32),
        (1, 5000 if not args.smoke else 300, 96, "far_above_clamp", 60.0, jnp.float32),
        (1, 5000 if not args.smoke else 300, 96, "pm200", None, jnp.float32),
        (2, 301, 256, "normal", 60.0, jnp.bfloat16),
        (1, 1, 7, "normal", 60.0, jnp.float32),
    ]
    if args.smoke:  # the script's paths, not the kernel's correctness (tests/test_wkv_kernel.py)
        cases = [cases[0], cases[5]]
    ok = True
    for i, (B, T, C, k_kind, k_clamp, dtype) in enumerate(cases):
        (k, v, td, tf), g = make_inputs(seed + i, B, T, C, k_kind, dtype)
        kern = vjp_fn(lambda *a: wkv(*a, k_clamp=k_clamp, interpret=interpret))
        ref = vjp_fn(lambda *a: wkv_reference(*a, k_clamp=k_clamp))
        (o, gr), (o_r, gr_r) = kern(k, v, td, tf, g), ref(k, v, td, tf, g)
        errs = [rel_err(o, o_r)] + [rel_err(a, b) for a, b in zip(gr, gr_r)]
        tol = 2e-2 if dtype == jnp.bfloat16 else (1e-3 if k_kind == "pm200" else 1e-4)
        good = all(e < tol for e in errs)
        ok &= good
        print(f"{'PASS' if good else 'FAIL'} B={B} T={T} C={C} K={k_kind} k_clamp={k_clamp} "
              f"{jnp.dtype(dtype).name}: rel err out/dk/dv/dtd/dtf = "
              + " ".join(f"{e:.1e}" for e in errs) + f" (tol {tol:g})")

    # State variant: a real mid-sequence state in, final state out, gradients through both.
    for k_clamp in (60.0,) if args.smoke else (60.0, None):
        B, T, C = 2, 600 if not args.smoke else 60, 128
        (k, v, td, tf), g = make_inputs(seed + 100, B, T, C)
        prev, _ = make_inputs(seed + 101, B, 50, C)
        _, s0 = reference_with_state(*prev, k_clamp=k_clamp)
        rng = np.random.default_rng(seed + 102)
        cts = (g, WKVState(*(jnp.asarray(rng.normal(size=(B, C)), jnp.float32) for _ in range(3))))

        def run(fn):
            def f(k, v, td, tf, s):
                (o, s1), pullback = jax.vjp(fn, k, v, td, tf, s)
                return o, s1, pullback(cts)
            return jax.jit(f)

        kern = run(lambda k, v, td, tf, s: wkv_with_state(k, v, td, tf, s, k_clamp=k_clamp, interpret=interpret))
        ref = run(lambda k, v, td, tf, s: reference_with_state(k, v, td, tf, s, k_clamp=k_clamp))
        (o, s1, gr), (o_r, s1_r, gr_r) = kern(k, v, td, tf, s0), ref(k, v, td, tf, s0)
        errs = [rel_err(o, o_r)] + [rel_err(a, b) for a, b in zip(s1, s1_r)]
        errs += [rel_err(a, b) for a, b in zip(jax.tree_util.tree_leaves(gr), jax.tree_util.tree_leaves(gr_r))]
        # Two chunks with the state carried equal one pass.
        cut = T // 3
        f = jax.jit(lambda k, v, s: wkv_with_state(k, v, td, tf, s, k_clamp=k_clamp, interpret=interpret))
        o1, sa = f(k[:, :cut], v[:, :cut], s0)
        o2, sb = f(k[:, cut:], v[:, cut:], sa)
        errs += [rel_err(jnp.concatenate([o1, o2], 1), o)] + [rel_err(a, b) for a, b in zip(sb, s1)]
        good = all(e < 1e-4 for e in errs)
        ok &= good
        print(f"{'PASS' if good else 'FAIL'} state B={B} T={T} C={C} k_clamp={k_clamp}: rel err "
              "out/aa/bb/pp/dk/dv/dtd/dtf/daa0/dbb0/dpp0/2-chunk out,aa,bb,pp = "
              + " ".join(f"{e:.1e}" for e in errs))
    print(f"CORRECTNESS: {'PASS' if ok else 'FAIL'}")
    return ok


# ---------------------------------------------------------------------------------------
# Timing.


def floor_bytes(B, T, C, itemsize):
    n = B * T * C
    fwd = n * (2 * itemsize + 4)  # read k, v; write out (float32)
    bwd = n * (2 * itemsize + 4 + 2 * itemsize)  # read k, v, g; write dk, dv
    return fwd, fwd + bwd


def time_cell(gpus, walls, nbytes, copy_bw, jit16=None, calls=IN_JIT_CALLS) -> str:
    """"GPU median (range); [jit16 t;] wall median (range) | GB/s (%copy)" in µs, over the trials."""
    def stat(ts):
        spread = f" ({min(ts) * 1e6:,.1f}–{max(ts) * 1e6:,.1f})" if len(ts) > 1 else ""
        return f"{statistics.median(ts) * 1e6:,.1f}{spread}"

    t = statistics.median(gpus or walls)
    gbs = nbytes / t / 1e9
    in_jit = "" if jit16 is None else f"jit{calls} {jit16 * 1e6:,.1f}; "
    times = f"GPU {stat(gpus)}; {in_jit}wall {stat(walls)}" if gpus else f"{in_jit}wall {stat(walls)}"
    return f"{times} | {gbs:,.0f} ({100 * gbs * 1e9 / copy_bw:.0f}%)"


def in_jit(fn):
    """One jitted function running fn on each of its input sets: independent calls in one program."""
    return jax.jit(lambda sets: [fn(*a) for a in sets])


def bench_row(name, fwd, fb, B, C, T, dtype, copy_bw, args, n_sets, trials=None, jit16=False):
    itemsize = jnp.dtype(dtype).itemsize
    b_fwd, b_fb = floor_bytes(B, T, C, itemsize)
    cells, compile_s = [], []
    for which, fn, nbytes in ((0, fwd, b_fwd), (1, fb, b_fb)):
        if fn is None:
            cells.append("- | -")
            continue
        try:
            walls, gpus = [], []
            for trial in range(trials or args.trials):  # fresh inputs, fresh addresses
                sets = [make_inputs(s + 1000 * trial, B, T, C, "normal", dtype) for s in range(n_sets)]
                fa = [a if which == 0 else (*a, g) for a, g in sets]
                walls.append(time_fn(fn, fa, args.reps, args.min_time))
                if trial == 0:
                    compile_s.append(f"{time_fn.first_call:.0f}s")
                if not args.wall_only and walls[-1] < 0.1:
                    gpu = device_time(fn, fa, max(3, min(200, int(args.min_time / walls[-1]))))
                    if gpu is not None:
                        gpus.append(gpu)
                del sets, fa
            per_call = None
            set_bytes = B * T * C * (2 * itemsize + (4 if which else 0))  # k, v (and g)
            if jit16 and args.jit_calls * set_bytes <= args.jit16_gb * 1e9:
                sets = [make_inputs(5000 + s, B, T, C, "normal", dtype) for s in range(args.jit_calls)]
                many = [(tuple(a if which == 0 else (*a, g) for a, g in sets),)]
                del sets
                multi = in_jit(fn)
                per_call = time_fn(multi, many, args.reps, args.min_time) / args.jit_calls
                if args.kernels and not args.wall_only:
                    for kname, n, us in kernel_breakdown(multi, many, 3) or ():
                        print(f"  {name} B={B} C={C} T={T} {'fwd+bwd' if which else 'fwd'}: kernel {kname[:80]} "
                              f"{n / args.jit_calls:g} per call x {us:,.1f} us")
                del many
            cells.append(time_cell(gpus, walls, nbytes, copy_bw, per_call, args.jit_calls))
        except Exception as e:  # noqa: BLE001 - one failure must not end the run
            print(f"  {name} B={B} C={C} T={T}: {type(e).__name__}: {str(e)[:300]}")
            cells.append("failed | -")
    row = f"| {name} | {B} | {C} | {T} | {cells[0]} | {cells[1]} |"
    print(row + f" compile+first call: {'/'.join(compile_s)}", flush=True)
    return row


TABLE_HEAD = ("| impl | B | C | T | fwd µs | fwd GB/s (%copy) | fwd+bwd µs | fwd+bwd GB/s (%copy) |\n"
              "|---|---|---|---|---|---|---|---|")


def table(args, copy_bw):
    dtype = jnp.dtype(args.dtype)
    sizes = SIZES
    if args.sizes:
        sizes = [tuple(int(x) for x in s.split(",")) for s in args.sizes.split(";")]
    blocks = None
    if args.smoke:  # time chunks; 2-step loop blocks, since interpret mode compiles each step
        sizes, blocks = [(1, 24, 130)], WKVBlockSizes(unroll=2, unroll_train=2)
    interp = args.smoke
    print(f"\n## Timing ({dtype.name} k, v; k_clamp=60 unless said; median of {args.reps})")
    print(TABLE_HEAD)
    rows = []
    for B, C, T in sizes:
        plan = _make_plan(B, T, C, k_clamp=60.0, k_eps=1e-9, linear=True, blocks=WKVBlockSizes(),
                          interpret=False)
        n_sets = 3 if B * T * C * 4 * 6 < 4e9 else 1
        impls = [("pallas", dict(k_clamp=60.0)), ("pallas k_clamp=None", dict(k_clamp=None))]
        if args.smoke:
            impls = impls[:1]  # the same script path; the smoke's time goes to interpret mode
        for name, kw in impls:
            fwd = jax.jit(lambda k, v, td, tf, kw=kw: wkv(k, v, td, tf, interpret=interp, block_sizes=blocks, **kw))
            fb = vjp_fn(lambda k, v, td, tf, kw=kw: wkv(k, v, td, tf, interpret=interp, block_sizes=blocks, **kw))
            rows.append(bench_row(f"{name} ({plan.n_chunks} chunk{'s' * (plan.n_chunks > 1)})",
                                  fwd, fb, B, C, T, dtype, copy_bw, args, n_sets, jit16=True))
        if args.no_baselines:
            continue
        rows.append(bench_row("plain-JAX scan", jax.jit(wkv_reference), vjp_fn(wkv_reference),
                              B, C, T, dtype, copy_bw, args, 1, trials=1))
        if T * T * C * 4 <= CONV_MAX_BYTES:
            rows.append(bench_row("O(T²) convolution", jax.jit(wkv_convolution),
                                  vjp_fn(wkv_convolution), B, C, T, dtype, copy_bw, args, 1, trials=1))
        else:
            print(f"| O(T²) convolution | {B} | {C} | {T} | skipped: [T,T,C] weights "
                  f"{T * T * C * 4 / 1e9:.0f} GB | - | - | - |")
    return rows


def sweep(args, copy_bw):
    """Block-size variants of the kernel at the shapes that matter most.

    Each variant times only what it changes: `unroll` only the forward, `unroll_train` only
    forward+backward (compiling a backward costs 7-29 s), everything else both."""
    print("\n## Sweep (pallas, k_clamp=60, float32): block sizes vs time")
    W = WKVBlockSizes
    big = (8, 1024, 1024)
    # (block sizes, which passes, shapes): one change of each default (WKVBlockSizes) at a time.
    variants = [
        (W(), "both", (big,)),
        (W(time_split=1), "both", (big,)),  # the serial kernels
        (W(time_split=2), "both", (big,)),
        (W(time_split=8), "both", (big,)),
        (W(block_c=16), "both", (big,)),  # twice the programs at the same threads
        (W(unroll=8), "fwd", (big,)),
        (W(unroll=32), "fwd", (big,)),
        (W(unroll_train=8), "fb", (big,)),
        (W(unroll_train=32), "fb", (big,)),
        (W(min_chunk=512), "both", ((1, 1024, 1024),)),  # 2 time chunks instead of 16 (a prefill chunk)
        (W(chunk_to=2048), "both", ((1, 1024, 65536),)),  # 64 time chunks instead of 16
    ]
    if args.smoke:
        variants = [(bs, which, ((2, 40, 64),)) for bs, which, _ in variants]
    print(TABLE_HEAD.replace("impl", "block sizes [chunks]"))
    seen = set()
    for bs, which, shapes in variants:
        for B, C, T in shapes:
            plan = _make_plan(B, T, C, k_clamp=60.0, k_eps=1e-9, linear=True, blocks=bs, interpret=False)
            if (B, C, T, plan, which) in seen:
                continue  # same plan as an earlier variant
            seen.add((B, C, T, plan, which))
            diff = {f.name: getattr(bs, f.name) for f in dataclasses.fields(bs)
                    if getattr(bs, f.name) != getattr(WKVBlockSizes(), f.name)}
            if args.sweep_only and diff and not any(t in str(diff) for t in args.sweep_only.split("|")):
                continue
            fwd = jax.jit(lambda k, v, td, tf, bs=bs: wkv(k, v, td, tf, block_sizes=bs, interpret=args.smoke))
            fb = vjp_fn(lambda k, v, td, tf, bs=bs: wkv(k, v, td, tf, block_sizes=bs, interpret=args.smoke))
            # Each variant against the reference first (one fresh input): the forward output,
            # and the four gradients where forward+backward is timed.
            (k, v, td, tf), g = make_inputs(B + C + T, B, T, C)
            err = rel_err(fwd(k, v, td, tf), jax.jit(wkv_reference)(k, v, td, tf))
            if which != "fwd":
                (_, grads), (_, grads_ref) = fb(k, v, td, tf, g), vjp_fn(wkv_reference)(k, v, td, tf, g)
                err = max([err] + [rel_err(a, b) for a, b in zip(grads, grads_ref)])
            label = (f"{diff or 'default'} [{plan.n_chunks} chunks] "
                     f"(max rel err {err:.1e}{'' if err < 1e-4 else ' FAIL'})")
            del k, v, g
            bench_row(label, fwd if which != "fb" else None,
                      fb if which != "fwd" else None, B, C, T, jnp.float32, copy_bw, args,
                      3 if B * T * C < (1 << 24) else 1)


def main():
    args = parse_args()
    args.jit_calls = 2 if args.smoke else IN_JIT_CALLS
    if args.smoke:
        args.reps, args.min_time = 2, 0.01
    dev = jax.devices()[0]
    print(f"# WKV benchmark: {dev.device_kind} ({dev.platform}), jax {jax.__version__}, "
          f"jaxlib {jax.lib.__version__ if hasattr(jax.lib, '__version__') else '?'}, "
          f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}")
    print("command: python3 " + " ".join(sys.argv))
    if dev.platform != "gpu" and not args.smoke:
        print("No GPU: the Pallas Triton kernels need one (use --smoke for interpret mode on CPU).")
        return 1
    ok = None if args.no_check else check(args)
    copy_bw = copy_bandwidth(args.smoke)
    print(f"copy bandwidth (read + write): {copy_bw / 1e9:.0f} GB/s")
    # The least a back-to-back call costs: a jitted call of four inputs running one tiny kernel
    # (a kernel shorter than this is timed as the host's dispatch, not as itself).
    (k, v, td, tf), _ = make_inputs(0, 1, 1, 1024)
    floor = time_fn(jax.jit(lambda k, v, td, tf: td + tf), [(k, v, td, tf)], args.reps, args.min_time)
    print(f"dispatch floor (a jitted call of 4 inputs, one tiny kernel): {floor * 1e6:.1f} us per call")
    rows = [] if args.sweep_only else table(args, copy_bw)
    if args.sweep or args.sweep_only:
        sweep(args, copy_bw)
    verdict = "not run (--no-check)" if ok is None else ("PASS" if ok else "FAIL")
    print(f"\n## Summary: {dev.device_kind}, copy {copy_bw / 1e9:.0f} GB/s, correctness {verdict}")
    print(TABLE_HEAD)
    print("\n".join(rows))
    return 1 if ok is False else 0


if __name__ == "__main__":
    sys.exit(main())
