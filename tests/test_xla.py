"""rwkv2_jax.xla.jit: jax.jit plus the project's GPU compiler options."""

import functools

import jax
import pytest
import jax.numpy as jnp
import numpy as np

import rwkv2_jax as rw
from rwkv2_jax import xla
from rwkv2_jax.generation import generator as gen
from rwkv2_jax.training import trainer as tr
from rwkv2_jax.training.sharding import make_mesh


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
    for options in (xla.GPU_COMPILER_OPTIONS, xla.TRAINING_COMPILER_OPTIONS):
        g = jax.jit(lambda x: x @ x, compiler_options=dict(options))
        assert float(g(jnp.eye(3)).sum()) == 3.0
    bad = jax.jit(lambda x: x @ x, compiler_options={"xla_gpu_enable_triton_gemm_typo": False})
    try:
        bad(jnp.eye(3))
    except Exception as err:  # noqa: BLE001 - XLA raises its own error types
        assert "triton_gemm_typo" in str(err)
    else:
        raise AssertionError("XLA accepted an unknown option: the check above proves nothing")


@pytest.mark.slow
def test_decode_programs_take_the_decode_options(monkeypatch):
    """rw.generate compiles its decode steps with DECODE_COMPILER_OPTIONS (XLA's default GEMMs,
    faster there on an H200) and its GPT-mode prefill with GPU_COMPILER_OPTIONS (cuBLAS)."""
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert xla.compiler_options("gpu", options=xla.DECODE_COMPILER_OPTIONS) is None  # XLA's defaults
    seen = {}

    def spy(fn, options=None, **kw):
        seen[fn.__name__] = options
        return xla.jit(fn, options=options, **kw)

    monkeypatch.setattr(gen, "jit", spy)
    gen._jit_for_backend.cache_clear()
    try:
        cfg = rw.RWKVConfig(n_layer=1, n_embd=8, vocab_size=16)
        model = rw.init(cfg, seed=0)
        assert len(gen.generate(model, [[1, 2, 3]], 3, temperature=0, chunk_size=2, decode_loop="device")[0]) == 3
        gen.generate(model, [[1, 2]], 2, temperature=0, decode_loop="host")
    finally:
        gen._jit_for_backend.cache_clear()  # the spied wrappers must not outlive the test
    assert seen == {"_prefill_chunk": None, "_feed": xla.DECODE_COMPILER_OPTIONS,
                    "_decode_loop": xla.DECODE_COMPILER_OPTIONS, "_decode_step": xla.DECODE_COMPILER_OPTIONS}


def test_train_step_takes_the_training_options(monkeypatch):
    """The training step compiles with TRAINING_COMPILER_OPTIONS (cuBLAS, products kept
    apart); its eval step and start state with GPU_COMPILER_OPTIONS."""
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert xla.compiler_options("gpu", options=xla.TRAINING_COMPILER_OPTIONS) == {
        "xla_gpu_enable_triton_gemm": False, "xla_gpu_dot_merger_threshold_mb": 0}
    seen = {}

    def spy(fn, options=None, **kw):
        seen[getattr(fn, "__name__", "start_state")] = options
        return xla.jit(fn, options=options, **kw)

    monkeypatch.setattr(tr, "jit", spy)
    config = rw.RWKVConfig(n_layer=1, n_embd=8, vocab_size=17)
    try:
        s = tr.setup(config, tr.TrainConfig(ctx_len=4, batch_size=2, epochs=1, epoch_steps=3,
                                            dtype="float32", wkv_impl="reference"), make_mesh(1, 1))
        start = s.init_state(tr.initial_params(config))
        state, metrics = s.train_step(start, s.put_batch(np.ones((1, 2, 5), np.int32)))
        assert int(state.step) == 1 and np.isfinite(float(metrics["loss"]))
    finally:
        tr.setup.cache_clear()  # the spied wrappers must not outlive the test
    assert seen == {"step": xla.TRAINING_COMPILER_OPTIONS, "evaluate": None, "start_state": None}
