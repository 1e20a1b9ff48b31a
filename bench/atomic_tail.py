"""What an output product split over programs costs in atomics (a probe for the two-kernel decode layer).

    python bench/atomic_tail.py                  # GPU: C = 1024, bf16, B = 1
    python bench/atomic_tail.py --interpret --width 64 --matrices 2   # CPU smoke run

The batch-1 decode step runs four kernels per layer (pallas_kernels/decode.py); each kernel
boundary costs ~2 us on an H200 (docs/PERF.md, session 12). Two of the four are output
products (W_out @ u, W_value @ u) that could be folded into the kernels producing u: a
program that owns rows r of u multiplies them with rows r of W^T ([in, out]) and adds its
partial [C] vector into the output with atomics. This measures, for one [C, C] matrix, a
kernel whose programs each load `block` rows of W^T and reduce them to a partial vector, then:

* sum:    store one float per program (no output traffic: the load and reduction alone);
* store:  store the partial vector to its own row of a [P, C] array (plain stores);
* f32:    atomic float32 add into one [C] vector (the order of the additions varies);
* i32:    two atomic int32 adds (a fixed-point high and low part: deterministic sums);
* i32r:   the same with relaxed atomics (Pallas' Triton lowering issues acq_rel ones).

Each kernel's GPU time (median, from a jax.profiler trace) over `--matrices` distinct matrices
(more bytes than the L2 cache), beside the existing separate output-product kernel
(pallas_kernels.decode.mix_out) on the same matrices. Each variant's result is checked
against the plain product (PASS or FAIL).
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import pallas as pl  # noqa: E402
from jax.experimental.pallas import triton as plgpu  # noqa: E402

HI, LO = 256.0, float(2 ** 21)


def _kernel(u_ref, w_ref, *out_refs, mode, block, C, B):
    pid = pl.program_id(0)
    rows = pl.ds(pid * block, block)
    w = w_ref[rows, :].astype(jnp.float32)  # [block, C]
    for b in range(B):
        u = u_ref[b, rows].astype(jnp.float32)
        part = jnp.sum(w * u[:, None], axis=0)  # [C]
        if mode == "sum":
            out_refs[-1][pl.ds(pid * B + b, 1)] = jnp.sum(part)[None]
        elif mode == "store":
            out_refs[-1][pl.ds(pid * B + b, 1), :] = part[None, :]
        elif mode == "f32":
            plgpu.atomic_add(out_refs[-1], (pl.ds(b, 1), slice(None)), part[None, :])
        else:
            a = part * HI
            hi = jnp.floor(a)
            lo = ((a - hi) * LO + 0.5).astype(jnp.int32)
            plgpu.atomic_add(out_refs[-1], (pl.ds(2 * b, 1), slice(None)), hi.astype(jnp.int32)[None, :])
            plgpu.atomic_add(out_refs[-1], (pl.ds(2 * b + 1, 1), slice(None)), lo[None, :])


def split_product(u, w_in, *, mode, block, interpret, num_warps=4):
    """u [B, C] @ w_in [C, C] ([in, out]) -> the kernel's raw output."""
    B, C = u.shape
    P = C // block
    shape = {"sum": ((P * B,), jnp.float32), "store": ((P * B, C), jnp.float32), "f32": ((B, C), jnp.float32),
             "i32": ((2 * B, C), jnp.int32), "i32r": ((2 * B, C), jnp.int32)}[mode]
    out = jnp.zeros(*shape)
    return pl.pallas_call(
        functools.partial(_kernel, mode=mode, block=block, C=C, B=B),
        out_shape=jax.ShapeDtypeStruct(*shape), grid=(P,), interpret=interpret,
        input_output_aliases={2: 0}, name=f"split_{mode}",
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
    )(u, w_in, out)


def result(mode, raw, B):
    if mode == "sum":
        return None
    if mode == "store":
        return raw.reshape(-1, B, raw.shape[-1]).sum(0)
    if mode == "f32":
        return raw
    raw = np.asarray(raw).reshape(B, 2, -1)
    return raw[:, 0].astype(np.float64) / HI + raw[:, 1].astype(np.uint32).astype(np.float64) / (HI * LO)


class _Relaxed:
    """Pallas' Triton lowering issues atomics as acq_rel at GPU scope; during this block, relaxed."""

    def __enter__(self):
        from jax._src.pallas.triton import lowering

        self.fn = lowering._atomic_rmw
        self.saved = self.fn.__defaults__
        self.fn.__defaults__ = (None, lowering.tt_dialect.MemSemantic.RELAXED, self.saved[2])

    def __exit__(self, *a):
        self.fn.__defaults__ = self.saved


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--width", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--matrices", type=int, default=48)
    ap.add_argument("--blocks", default="2,4,8")
    ap.add_argument("--warps", default="4")
    ap.add_argument("--modes", default="sum,store,f32,i32,i32r")
    ap.add_argument("--interpret", action="store_true")
    args = ap.parse_args(argv)
    from bench.timing import device_time
    from pallas_kernels import decode

    C, B = args.width, args.batch
    keys = jax.random.split(jax.random.PRNGKey(0), args.matrices + 1)
    ws = [jax.random.normal(k, (C, C), jnp.float32).astype(jnp.bfloat16) / 32 for k in keys[1:]]
    u = jax.random.normal(keys[0], (B, C), jnp.float32).astype(jnp.bfloat16)
    ref = np.asarray(jnp.dot(u.astype(jnp.float32), ws[0].astype(jnp.float32)))
    scale = float(np.max(np.abs(ref)))
    print(f"{jax.devices()[0].device_kind}  C={C} B={B} bf16, {args.matrices} matrices "
          f"({args.matrices * C * C * 2 / 2**20:.0f} MiB); GPU us per kernel")
    w_t = [w.T for w in ws]
    base = jnp.zeros((B, C), jnp.float32)
    for bo in (1, 2):
        f = jax.jit(lambda u, w, bo=bo: decode.mix_out(u, w, base, blocks=decode.DecodeBlockSizes(block_out=bo),
                                                        interpret=args.interpret))
        t = None if args.interpret else device_time(f, [(u, w) for w in w_t], 4 * args.matrices)
        err = float(np.max(np.abs(np.asarray(f(u, w_t[0])) - ref)))
        verdict = "PASS" if err <= 2e-2 * scale else "FAIL"  # the product rounded to bf16
        print(f"  mix_out (separate kernel) block_out={bo}: {t * 1e6 if t else float('nan'):7.2f} us  "
              f"max err {err:.2e} {verdict}")
    for warps in map(int, args.warps.split(",")):
        for block in map(int, args.blocks.split(",")):
            for mode in args.modes.split(","):
                ctx = _Relaxed() if mode == "i32r" and not args.interpret else None
                f = jax.jit(functools.partial(split_product, mode=mode, block=block, interpret=args.interpret,
                                              num_warps=warps))
                try:
                    if ctx:
                        ctx.__enter__()
                    raw = f(u, ws[0])
                    t = None if args.interpret else device_time(f, [(u, w) for w in ws], 4 * args.matrices)
                except Exception as e:  # noqa: BLE001 - a probe: report and go on
                    print(f"  {mode:5s} block={block} warps={warps}: FAILED {type(e).__name__}: {str(e)[:200]}")
                    continue
                finally:
                    if ctx:
                        ctx.__exit__()
                got = result(mode, raw, B)
                if got is None:
                    err = ""
                else:  # float32 sums in another order (and the fixed point's 2^-29 steps)
                    e = float(np.max(np.abs(np.asarray(got) - ref)))
                    err = f"max err {e:.2e} {'PASS' if e <= 1e-4 * scale else 'FAIL'}"
                print(f"  {mode:5s} block={block} warps={warps} programs={C // block}: "
                      f"{t * 1e6 if t else float('nan'):7.2f} us  {err}")


if __name__ == "__main__":
    main()
