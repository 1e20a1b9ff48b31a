"""rwkv2_jax.xla.jit: jax.jit plus the project's GPU compiler options."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from rwkv2_jax import xla


def test_options_only_for_gpu(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert xla.compiler_options("gpu") == {"xla_gpu_enable_triton_gemm": False}
    assert xla.compiler_options("cpu") is None
    opts = xla.compiler_options("gpu")
    opts["xla_gpu_enable_triton_gemm"] = True  # a copy: the module's dict is unchanged
    assert xla.GPU_COMPILER_OPTIONS["xla_gpu_enable_triton_gemm"] is False


def test_the_users_xla_flags_win(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_autotune_level=0 --xla_gpu_enable_triton_gemm=true")
    assert xla.compiler_options("gpu") is None  # theirs, not ours
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_autotune_level=0")
    assert xla.compiler_options("gpu") == {"xla_gpu_enable_triton_gemm": False}


def test_jit_passes_jit_arguments_and_compiles_once():
    traces = []

    @functools.partial(xla.jit, static_argnames=("n",))
    def f(x, n):
        traces.append(n)
        return x @ x.T * n

    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 4)), jnp.float32)
    np.testing.assert_allclose(f(x, n=2), 2 * np.asarray(x) @ np.asarray(x).T, rtol=1e-5)
    f(x, n=2)
    f(x + 1, n=2)
    assert traces == [2]  # cached like jax.jit
    f(x, n=3)
    assert traces == [2, 3]


def test_gpu_options_are_valid_xla_options():
    # The GPU options must be names XLA knows (a misspelt one fails at compile on every backend).
    g = jax.jit(lambda x: x @ x, compiler_options=dict(xla.GPU_COMPILER_OPTIONS))
    assert float(g(jnp.eye(3)).sum()) == 3.0
    bad = jax.jit(lambda x: x @ x, compiler_options={"xla_gpu_enable_triton_gemm_typo": False})
    try:
        bad(jnp.eye(3))
    except Exception as err:  # noqa: BLE001 - XLA raises its own error types
        assert "triton_gemm_typo" in str(err)
    else:
        raise AssertionError("XLA accepted an unknown option: the check above proves nothing")
