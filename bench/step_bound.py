"""Where the batch-1 decode step's time goes: its variants, and whether the GPU sets the pace.

    python bench/step_bound.py                       # GPU: L24-D1024, bf16, B = 1
    python bench/step_bound.py --trace               # also GPU busy/span per step (a profiler trace)
    XLA_FLAGS=--xla_gpu_enable_command_buffer= python bench/step_bound.py   # CUDA graphs off
    python bench/step_bound.py --preset L2-D64 --steps 2 --wkv-impl pallas_interpret   # CPU smoke run

Session 11 timed the head through pallas_kernels.matvec at 27 us against cuBLAS's 36 in a
trace, yet the jitted loop of steps was no faster (docs/PERF.md). For the fused step (the
default at batch 1) this prints, per variant, the wall time per step of a `lax.fori_loop` of
--steps greedy steps (bench/decode.py's greedy_steps, what the table's loop-of-steps row
times; compiled once ahead of time), the copies and command buffers (CUDA graphs) in XLA's
compiled loop, and with --trace, from a jax.profiler trace of --trace-steps steps, the GPU's
busy time per step (the sum of the kernels' durations), its span per step (first kernel
start to last kernel end) and the kernels per step: wall well above busy means the GPU waits.
Then `rw.generate`'s time per token (512 greedy tokens) with the default step.

Variants (rwkv2_jax.generation.step.StepSpec fields): `default`; `in-place-shift`
(shift_in_place=True: the output kernels write the layers' token-shift vectors into the state in
place instead of stacking them after the step; the default during session 13's first run, 2%
slower); `stacked-shift` (shift_in_place=False, the default since); `pallas-head`
(pallas_head=True); `no-head` (a diagnostic, not a model: the head cut to its first 1,024 rows,
to see whether ~35 us less GPU work shows in the wall time); `no-stream` (stream_weights=False:
no L2 hints, XLA's head, the step before session 17); `no-resident` (resident_out_bytes=0:
every matrix streamed); `head-bi512` (the stream head with pallas_kernels.matvec's default
512-column blocks). Results: docs/PERF.md, session 13: the loop is GPU-bound (busy = wall per
step in a trace) and its head already takes only ~26 us; session 17: the L2 hints.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pallas_kernels.matvec import MatvecBlockSizes  # noqa: E402 - a frozen dataclass (imports jax, runs nothing)

VARIANTS = {"default": {}, "in-place-shift": {"shift_in_place": True}, "stacked-shift": {"shift_in_place": False},
            "pallas-head": {"pallas_head": True}, "no-head": {},
            "no-stream": {"stream_weights": False}, "no-resident": {"resident_out_bytes": 0},
            "head-bi512": {"matvec_blocks": MatvecBlockSizes()}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="L24-D1024")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--variants", default="default,in-place-shift,pallas-head,no-head,default",
                    help=f"comma-separated, of {sorted(VARIANTS)} (a repeat shows the drift)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--trace", action="store_true")
    ap.add_argument("--trace-steps", type=int, default=8)
    ap.add_argument("--compiler-options", default="", help="k=v;k=v: XLA options for the loop's compile only "
                    "(jax's compile(compiler_options=...)), e.g. xla_gpu_enable_command_buffer=FUSION,CUSTOM_CALL")
    ap.add_argument("--wkv-impl", default="auto", help="pallas_interpret: the fused step on CPU (a smoke run)")
    ap.add_argument("--gen-tokens", type=int, default=512, help="0: no generate row")
    args = ap.parse_args(argv)

    import jax
    import jax.numpy as jnp

    import rwkv2_jax as rw
    from bench.decode import greedy_steps, parse_size, random_params
    from bench.timing import gpu_kernel_events, median_time
    from rwkv2_jax.generation import step as decode_step
    from rwkv2_jax.generation.step import decode_params, rnn_step, spec_of
    from rwkv2_jax.generation.generator import prefill

    cfg = parse_size(args.preset)
    from rwkv2_jax.generation.generator import with_weight_dtype

    model = with_weight_dtype(rw.Model(cfg, random_params(cfg, 0), wkv_impl=args.wkv_impl), jnp.bfloat16)  # bf16 weights: fused step
    dparams = decode_params(model)
    _, state0 = prefill(model, [[1, 2, 3]])
    token0 = jnp.zeros((1,), jnp.int32)
    print(f"{jax.devices()[0].device_kind}  {args.preset} bf16 B=1  XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")
    print("| variant | fused kernels | fori_loop ms/step | copies | command buffers | GPU busy ms/step | GPU span ms/step "
          "| kernels/step |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|", flush=True)
    copts = dict(kv.split("=", 1) for kv in args.compiler_options.split(";") if kv)
    if copts:
        print(f"compiler options of the loops: {copts}")
    original = decode_step._head
    for variant in args.variants.split(","):
        if variant == "no-head":
            def small_head(spec, dparams, x, **kw):
                return original(spec, {**dparams, "head_t": dparams["head_t"][:1024]}, x, **kw)
            decode_step._head = small_head
        try:
            spec = dataclasses.replace(spec_of(model), **VARIANTS[variant])
            t0 = time.perf_counter()
            loop = greedy_steps(spec, args.steps).lower(dparams, token0, state0).compile(copts or None)
            text = loop.as_text()
            jaxpr = jax.make_jaxpr(rnn_step, static_argnums=0)(spec, dparams, token0, state0).jaxpr
            fused = sum(e.primitive.name == "pallas_call" and "decode_" in str(e.params.get("name", ""))
                        for e in jaxpr.eqns)
            copies = len(re.findall(r"= \S+ copy\(", text))
            n_cb = text.count("command_buffer")
            jax.block_until_ready(loop(dparams, token0, state0))
            t_loop = median_time(lambda: jax.block_until_ready(loop(dparams, token0, state0)),
                                 args.repeats) / args.steps
            busy = span = per = float("nan")
            if args.trace:
                short = greedy_steps(spec, args.trace_steps).lower(dparams, token0, state0).compile()
                jax.block_until_ready(short(dparams, token0, state0))
                with tempfile.TemporaryDirectory() as d:
                    with jax.profiler.trace(d):
                        jax.block_until_ready(short(dparams, token0, state0))
                    ev = gpu_kernel_events(d) or []
                if ev:
                    n = args.trace_steps
                    busy = sum(e[2] for e in ev) / 1e6 / n
                    span = (max(e[1] + e[2] for e in ev) - min(e[1] for e in ev)) / 1e6 / n
                    per = len(ev) / n
            print(f"| {variant} | {fused} | {1e3 * t_loop:.3f} | {copies} | {n_cb} | {busy:.3f} | {span:.3f} | {per:.1f} "
                  f"|  ({time.perf_counter() - t0:.0f} s)", flush=True)
        finally:
            decode_step._head = original
    if args.gen_tokens:
        n = args.gen_tokens
        run = lambda: rw.generate(model, [[1]], n, temperature=0)  # noqa: E731
        run()
        sec = median_time(run, args.repeats)
        print(f"rw.generate, default step, {n} greedy tokens: {1e3 * sec / n:.3f} ms per token "
              f"({n / sec:,.0f} tokens/s)", flush=True)


if __name__ == "__main__":
    main()
