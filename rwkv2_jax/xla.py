"""`jit`: jax.jit with the XLA compiler options this project's programs run best with.

On GPUs XLA can compile a matrix product with its own Triton GEMM emitter (which may fuse the
elementwise code around it) or call cuBLAS. For this model's training step cuBLAS was faster:
the bf16 step of L24-D1024 (B=8, T=768, Adam) took 47.6 ms with XLA's default choice and
40.4 ms with `xla_gpu_enable_triton_gemm=False` on an H200 (`python3 bench/train.py`,
docs/PERF.md). So every jitted program of the package (training steps, GPT mode, prefill,
scoring) is compiled with GPU_COMPILER_OPTIONS when it runs on a GPU, except the decode
steps, which were faster with XLA's default (DECODE_COMPILER_OPTIONS, below; the generation
numbers of docs/PERF.md sessions 3-14 were measured with cuBLAS). For prefill the choice is
not settled: a batch-1 prefill of 2,048 tokens took 10.6 ms so (bench/decode.py) and 10.0 ms
with XLA's default in an earlier run of another tool (bench/profile.py); not yet compared in
one run. The Pallas kernels are not affected (they are not XLA GEMMs).

Options are per program (`jax.jit(..., compiler_options=...)`), not the process-wide
XLA_FLAGS, so importing the package changes nothing. An option the user sets in XLA_FLAGS
wins: e.g. `XLA_FLAGS=--xla_gpu_enable_triton_gemm=true` brings back XLA's own GEMMs (to
compare both in one run). The backend is looked up at the first call, never at import.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import jax

GPU_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}
# The decode steps (rw.generate's loops and the RNN step after a prefill) keep XLA's default
# GEMMs: on an H200 their bf16 steps were faster so at every batch size timed (the
# per-operation step at 2/4/8/16 rows 0.75/0.81/1.00/0.82 ms vs 0.90/0.97/1.15/0.95 with
# cuBLAS; the fused step at 2 rows 0.55 vs 0.63, where only the head is an XLA product;
# bench/decode.py --sweep-batches), and rw.generate's greedy decoding at 1/8/64 rows gave
# 2,401/8,056/71,212 tokens/s against 2,341/7,056/60,865 (docs/PERF.md session 15).
DECODE_COMPILER_OPTIONS: dict = {}


def compiler_options(backend: Optional[str] = None, options: Optional[dict] = None) -> Optional[dict]:
    """The options (default GPU_COMPILER_OPTIONS) for programs compiled for `backend` (default:
    JAX's default backend), without those the user's XLA_FLAGS set (theirs win)."""
    backend = backend or jax.default_backend()
    if backend != "gpu":
        return None
    user = os.environ.get("XLA_FLAGS", "")
    options = GPU_COMPILER_OPTIONS if options is None else options
    return {k: v for k, v in options.items() if f"--{k}" not in user} or None


def jit(fn=None, *, options: Optional[dict] = None, **kwargs):
    """`jax.jit(fn, **kwargs)` plus `compiler_options(options=options)`, decided when first called.

    Usable as `jit(fn, ...)` or as a decorator `@jit` / `@functools.partial(jit, ...)`.
    """
    if fn is None:
        return functools.partial(jit, options=options, **kwargs)
    jitted = None

    def compiled_fn():
        nonlocal jitted
        if jitted is None:
            jitted = jax.jit(fn, compiler_options=compiler_options(options=options), **kwargs)
        return jitted

    @functools.wraps(fn)
    def call(*args, **kw):
        return compiled_fn()(*args, **kw)

    call.lower = lambda *args, **kw: compiled_fn().lower(*args, **kw)  # for HLO dumps and profiles
    return call
