"""`jit`: jax.jit with the XLA compiler options this project's programs run best with.

On GPUs XLA can compile a matrix product with its own Triton GEMM emitter (which may fuse the
elementwise code around it) or call cuBLAS. For this model's training step cuBLAS was faster:
the bf16 step of L24-D1024 (B=8, T=768, Adam) took 47.6 ms with XLA's default choice and
40.4 ms with `xla_gpu_enable_triton_gemm=False` on an H200 (`python3 bench/train.py`,
docs/PERF.md). So every jitted program of the package (training steps, GPT mode, prefill,
decoding, scoring) is compiled with GPU_COMPILER_OPTIONS when it runs on a GPU; the
generation numbers of docs/PERF.md (session 3) were measured so. For inference the choice is
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


def compiler_options(backend: Optional[str] = None) -> Optional[dict]:
    """The options for programs compiled for `backend` (default: JAX's default backend),
    without those the user's XLA_FLAGS set (theirs win)."""
    backend = backend or jax.default_backend()
    if backend != "gpu":
        return None
    user = os.environ.get("XLA_FLAGS", "")
    return {k: v for k, v in GPU_COMPILER_OPTIONS.items() if f"--{k}" not in user} or None


def jit(fn=None, **kwargs):
    """`jax.jit(fn, **kwargs)` plus `compiler_options()`, decided when first called.

    Usable as `jit(fn, ...)` or as a decorator `@jit` / `@functools.partial(jit, ...)`.
    """
    if fn is None:
        return functools.partial(jit, **kwargs)
    jitted = None

    @functools.wraps(fn)
    def call(*args, **kw):
        nonlocal jitted
        if jitted is None:
            jitted = jax.jit(fn, compiler_options=compiler_options(), **kwargs)
        return jitted(*args, **kw)

    return call
