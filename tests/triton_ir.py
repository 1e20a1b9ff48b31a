"""Lower a Pallas kernel to Triton IR for CUDA on a machine without a GPU, and read it.

Interpret mode cannot see lowering bugs; the IR can. Used by the kernel tests.
"""

import functools
import sys

import jax
import pytest


def lower_to_triton_ir(fn, args, *, kernel_module: str, monkeypatch, capsys) -> str:
    """The Triton IR (text) of every Pallas kernel in jax.jit(fn)(*args), lowered for CUDA.

    kernel_module: the module whose `pl.pallas_call` builds the kernels (patched to print its
    IR). Skips the test where this jaxlib cannot lower for CUDA.
    """
    module = sys.modules[kernel_module]
    monkeypatch.setattr(module.pl, "pallas_call", functools.partial(module.pl.pallas_call, debug=True))
    capsys.readouterr()  # drop earlier output
    try:
        jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))
    except Exception as e:  # noqa: BLE001 - jaxlib's error types vary
        if "cuda" in str(e).lower() and "platform" in str(e).lower():
            pytest.skip(f"this jaxlib cannot lower for CUDA: {e}")
        raise
    return capsys.readouterr().out


def assert_no_scalar_select(ir: str):
    """No i1 select: the Pallas Triton lowering turns a jnp.where between weak-typed scalar
    literals into one (pallas_kernels/wkv.py, _NO_SCALAR_SELECT)."""
    bad = [line.strip() for line in ir.splitlines() if "arith.select" in line and ": i1 " in line]
    assert not bad, "i1 select in the Triton IR (scalar-literal jnp.where?):\n" + "\n".join(bad[:5])
