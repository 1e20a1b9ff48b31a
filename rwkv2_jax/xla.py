"""`jit`: jax.jit with the XLA compiler options this project's programs run best with.

On GPUs XLA can compile a matrix product with its own Triton GEMM emitter or call cuBLAS.
Every jitted program of the package (training steps, GPT mode, prefill, scoring) uses cuBLAS
(GPU_COMPILER_OPTIONS) because the training step is faster with it; the decode steps keep
XLA's default (DECODE_COMPILER_OPTIONS), which is faster for them. docs/PERF.md's "tried and
not adopted" table has both measurements. The training step also keeps products that share
an operand apart (TRAINING_COMPILER_OPTIONS). The Pallas kernels are not XLA GEMMs and are
not affected.

Options are per program (`jax.jit(..., compiler_options=...)`), not the process-wide
XLA_FLAGS, so importing the package changes nothing. An option the user sets in XLA_FLAGS
wins: e.g. `XLA_FLAGS=--xla_gpu_enable_triton_gemm=true` brings back XLA's own GEMMs. The
backend is looked up at the first call, never at import.
"""

from __future__ import annotations

import functools
import os
from typing import Optional

import jax

GPU_COMPILER_OPTIONS = {"xla_gpu_enable_triton_gemm": False}
# XLA merges products that share an operand into one over concatenated operands. In the
# training step's backward pass that concatenates the time mix's three [B*T, C] gradients
# (one copy per layer); unmerged, the bf16 L24-D1024 step is 0.9% faster and 0.6 GiB smaller
# on an H100 (python3 bench/compare.py; docs/PERF.md, "Training step").
TRAINING_COMPILER_OPTIONS = {**GPU_COMPILER_OPTIONS, "xla_gpu_dot_merger_threshold_mb": 0}
# The decode steps keep XLA's default GEMMs, faster for them than cuBLAS at every batch size
# timed (python3 bench/decode.py --sweep-batches; docs/PERF.md, tried and not adopted).
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
