"""Each fused decode kernel alone (pallas_kernels.decode), per block size: where the batch-1 step's time goes.

    python bench/decode_kernels.py                       # GPU: L24-D1024 shapes, bf16, B = 1
    python bench/decode_kernels.py --blocks 2x256,1x512x8 --kernels att_out,ffn_out
    python bench/decode_kernels.py --interpret --layers 2 --width 64   # CPU smoke run (interpret mode)

A layer's decode step is four kernels (pallas_kernels/decode.py): time_mix_in (the [3C, C]
K/V/R product, the LayerNorm, the mix and the WKV step), att_out (the [C, C] output product),
channel_mix_in (the [5C, C] K/R product) and ffn_out (the [C, 4C] value product). For each
kernel and each block size this runs one jitted program of the kernel over `--layers`
distinct random weight matrices (as the step reads a new matrix per layer, so nothing is
served from the L2 cache), each call's output feeding the next, and reports per kernel call:

* wall: back-to-back calls of the program (the host's dispatch overlaps the device), / layers;
* GPU: the kernel's time in a jax.profiler trace (no launch gaps), / layers, and the bytes it
  reads (its matrix) per GPU second.

Each variant's outputs are compared with the plain-JAX reference's (the kernel's `*_reference`,
run eagerly): the same function up to the order of float32 additions, so a rel. difference
far above the weights' rounding means a broken variant, marked FAIL. Block sizes: OUTxIN[xWARPS] as bench/decode.py --sweep-blocks; each kernel's default in the
decode step (pallas_kernels.decode.LayerBlockSizes) is timed first, marked *.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: this checkout first

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bench.decode import blocks_label, parse_blocks  # noqa: E402
from bench.timing import device_time, time_fn  # noqa: E402
from pallas_kernels import decode  # noqa: E402
from pallas_kernels.decode import DecodeBlockSizes, LayerBlockSizes  # noqa: E402

KERNELS = ("time_mix_in", "att_out", "channel_mix_in", "ffn_out")
DEFAULT_GRID = "2x256,1x256,4x256,8x256,1x512,2x512,4x512,2x1024,2x256x2,2x256x8,1x256x2,4x512x8"


def make_case(kernel: str, L: int, B: int, C: int, dtype, interpret: bool, seed: int = 0):
    """-> (program(blocks) -> jitted fn; reference() -> the outputs by the *_reference functions;
    args; bytes of weights one call reads)."""
    keys = iter(jax.random.split(jax.random.key(seed), 16 + L))
    f32 = jnp.float32
    normal = lambda shape, scale=1.0, dt=f32: (scale * jax.random.normal(next(keys), shape, f32)).astype(dt)  # noqa: E731
    rows = {"time_mix_in": 3 * C, "channel_mix_in": 5 * C, "att_out": C, "ffn_out": C}[kernel]
    cols = 4 * C if kernel == "ffn_out" else C
    # one matrix per layer, each its own buffer (slices of one stacked array would be copied
    # before each kernel: a copy kernel per call)
    w = [normal((rows, cols), cols ** -0.5, dtype) for _ in range(L)]
    x = normal((B, C))
    vec = dict(ln_scale=1.0 + normal((C,), 0.1), ln_bias=normal((C,), 0.1),
               time_mix=jax.random.uniform(next(keys), (C,), f32))
    prev = normal((L * B, C))
    if kernel == "time_mix_in":
        state = (normal((L * B, C)), jnp.abs(normal((L * B, C))) + 1.0, normal((L * B, C)))
        w_log, u_log = -jnp.exp(normal((C,), 0.5)), normal((C,), 0.5)

        def run(fn, x, w, state):
            out = []
            for layer in range(L):
                x, rwkv, *state = fn(
                    x, vec["ln_scale"], vec["ln_bias"], prev, vec["time_mix"], w[layer], *state, w_log, u_log,
                    jnp.full((1,), layer, jnp.int32), k_clamp=60.0, log_eps=None, ln_eps=1e-5)
                out.append(rwkv)
            return x, jnp.stack(out), *state
        args = (x, w, state)
    elif kernel == "channel_mix_in":
        def run(fn, x, w):
            out = []
            for layer in range(L):
                x, ksq, r = fn(x, vec["ln_scale"], vec["ln_bias"], prev, vec["time_mix"], w[layer],
                               jnp.full((1,), layer, jnp.int32), ln_eps=1e-5)
                out.append((ksq, r))
            return x, out
        args = (x, w)
    else:
        u = jax.nn.relu(normal((B, cols))).astype(dtype)
        gate = normal((B, C)) if kernel == "ffn_out" else None

        def run(fn, x, w, u):
            for layer in range(L):
                x = fn(u, w[layer], x, gate)
            return x
        args = (x, w, u)
    name = "mix_out" if kernel in ("att_out", "ffn_out") else kernel
    kernel_fn, reference_fn = getattr(decode, name), getattr(decode, name + "_reference")

    def program(blocks):
        return jax.jit(functools.partial(run, functools.partial(kernel_fn, blocks=blocks, interpret=interpret)))

    return program, lambda: run(reference_fn, *args), args, rows * cols * jnp.dtype(dtype).itemsize


def rel_diff(a, b) -> float:
    num = den = 0.0
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        x, y = x.astype(jnp.float32), y.astype(jnp.float32)
        num += float(jnp.sum((x - y) ** 2))
        den += float(jnp.sum(y ** 2))
    return (num / max(den, 1e-30)) ** 0.5


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kernels", default=",".join(KERNELS), help=f"comma-separated subset of {KERNELS}")
    p.add_argument("--blocks", default=DEFAULT_GRID, help="block sizes to time, OUTxIN[xWARPS], comma-separated "
                   "(each kernel's default in the step is timed first in any case)")
    p.add_argument("--layers", type=int, default=24, help="distinct weight matrices per program (default 24)")
    p.add_argument("--width", type=int, default=1024, help="C (default 1024)")
    p.add_argument("--batch", type=int, default=1, help="rows B (default 1)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="weights' dtype")
    p.add_argument("--min-time", type=float, default=0.2, help="seconds of back-to-back calls per timing rep")
    p.add_argument("--interpret", action="store_true", help="Pallas interpret mode (CPU smoke run; times meaningless)")
    p.add_argument("--log", help="also append the output to this file")
    args = p.parse_args(argv)

    kernels = [k for k in args.kernels.split(",") if k]
    bad = [k for k in kernels if k not in KERNELS]
    if bad:
        raise SystemExit(f"--kernels: unknown {bad}; choose from {KERNELS}")
    grid = parse_blocks(args.blocks, "--blocks")
    if any(not isinstance(b, DecodeBlockSizes) for b in grid):
        raise SystemExit("--blocks: one OUTxIN[xWARPS] per item here (each kernel is timed alone)")

    def log(line=""):
        print(line, flush=True)
        if args.log:
            with open(args.log, "a") as f:
                f.write(line + "\n")

    log(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    log(f"# L={args.layers} programs of one kernel call per layer, B={args.batch}, C={args.width}, {args.dtype}; "
        f"blocks OUTxINxWARPS; the step's defaults (LayerBlockSizes) first, marked *")
    log("| kernel | blocks | wall µs/call | GPU µs/call | GB/s (GPU) | rel. diff vs reference |")
    log("|---|---|---:|---:|---:|---:|")
    for kernel in kernels:
        program, reference, kargs, nbytes = make_case(kernel, args.layers, args.batch, args.width, jnp.dtype(args.dtype),
                                           args.interpret)
        ref = reference()
        default = getattr(LayerBlockSizes(), kernel)
        for blocks in [default] + [b for b in grid if b != default]:
            t0 = time.perf_counter()
            try:
                fn = program(blocks)
                out = jax.block_until_ready(fn(*kargs))
            except Exception as err:  # a block size the kernel cannot take: say so, go on
                log(f"| {kernel} | {blocks_label(blocks)}{' *' if blocks == default else ''} | — | — | — | error: {str(err).splitlines()[0][:100]} |")
                continue
            diff = rel_diff(out, ref)
            verdict = "PASS" if diff < 2e-2 else "FAIL"
            wall = time_fn(fn, [kargs], 3, args.min_time) / args.layers
            gpu = None if args.interpret else device_time(fn, [kargs], 5)
            gpu_cell = "—" if gpu is None else f"{1e6 * gpu / args.layers:.2f}"
            bw = "—" if gpu is None else f"{nbytes * args.layers / gpu / 1e9:,.0f}"
            log(f"| {kernel} | {blocks_label(blocks)}{' *' if blocks == default else ''} | {1e6 * wall:.2f} | {gpu_cell} | {bw} | {diff:.1e} {verdict} |"
                f"  ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
