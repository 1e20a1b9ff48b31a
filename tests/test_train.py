"""Training: loss and gradients vs the PyTorch reference (and the embedding gradient and the
loss, which use no scatter, against a plain sum and optax), the optimizer recipe, gradient
accumulation, mixed precision, sharded steps, the train.py CLI (loss falls, exports, exact
resume after a stop and after SIGKILL, context extension, log lines) and its one-line errors.
Faults (NaN, failing disks, signals) are in test_train_faults.py, several processes in
test_multiprocess.py."""

import hashlib
import json
import math
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

import rwkv2_jax as rw
from rwkv2_jax.cli import train
from rwkv2_jax.model import RWKV, embed
from rwkv2_jax.training import trainer as tr
from rwkv2_jax.training.data import WindowSampler
from rwkv2_jax.training.sharding import make_mesh
from tests.conftest import REPO, SMALL
from rwkv2_jax.testing.torch_reference import TorchRWKV2
from tests.train_support import (
    checkpoint_steps,
    error_lines,
    final_arrays,
    metrics,
    same_arrays,
    tiny_args,
    write_char_data,
)


def rel_err(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, np.float64) - b) / max(np.linalg.norm(b), 1e-30))


# --- loss and gradients ------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["plain", pytest.param("ffn_pre", marks=pytest.mark.slow)])
def test_loss_and_grad_matches_torch(release_files, variant, rng):
    path = release_files[variant]
    model = rw.load_torch(path, k_eps=1e-9, verbose=False)
    sd = torch.load(path, weights_only=True)
    ref = TorchRWKV2(sd, k_eps=1e-9)
    exact = TorchRWKV2(sd, k_eps=1e-9, dtype=torch.float64)
    x = rng.integers(0, SMALL["vocab_size"], (3, 21))
    y = rng.integers(0, SMALL["vocab_size"], (3, 21))
    loss, grads = tr.loss_and_grad(model, x, y)
    ref_loss, ref_grads = ref.loss_and_grad(x, y)
    _, exact_grads = exact.loss_and_grad(x, y)
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    assert list(grads) == list(ref_grads)  # every release key, in release order
    for key, g in ref_grads.items():
        assert grads[key].shape == g.shape, key
        # These test checkpoints are badly conditioned on purpose (K beyond the clamp, fast and
        # slow decays): the float32 PyTorch reference itself is up to ~1.3e-4 from the float64
        # truth on some seeds, and ours (the log-mode scan's autodiff) further on a few: in 150
        # seeds, 3 had a leaf beyond 1e-4 of the reference, at worst block 0's time_decay at
        # 9.4e-4 from the float64 truth. Ours must be within 1e-4 of the reference, or within
        # 2e-3 (or 3x the float32 reference's own distance) of the float64 truth.
        err, ours_exact, ref_exact = (rel_err(grads[key], g), rel_err(grads[key], exact_grads[key]),
                                      rel_err(g, exact_grads[key]))
        assert err <= 1e-4 or ours_exact <= max(2e-3, 3 * ref_exact), (key, err, ours_exact, ref_exact)


def test_loss_and_grad_errors(release_files):
    model = rw.load_torch(release_files["plain"], k_eps=1e-9, verbose=False)
    with pytest.raises(ValueError, match=r"inputs \[2, 5\] and targets \[2, 4\]"):
        tr.loss_and_grad(model, np.zeros((2, 5), int), np.zeros((2, 4), int))
    targets = np.zeros((2, 5), int)
    targets[1, 2] = 67
    with pytest.raises(ValueError, match=r"token id 67 at position \[1, 2\]"):
        tr.loss_and_grad(model, np.zeros((2, 5), int), targets)


def test_embedding_gradient_sums_each_tokens_rows(rng):
    """The embedding's gradient (rwkv2_jax.model.embed, no scatter) is, per vocabulary row, the
    sum of the output gradients of the positions holding that token: repeated tokens, tokens
    that never occur, and odd shapes; computed twice, the same bits."""
    for shape, V, C in (((3, 7), 11, 5), ((1, 1), 4, 3), ((2, 33), 97, 8)):
        table = jnp.asarray(rng.standard_normal((V, C)), jnp.float32)
        tokens = rng.integers(0, V // 2 + 1, shape)  # half the vocabulary unused, many repeats
        d_rows = rng.standard_normal((*shape, C)).astype(np.float32)
        out, vjp = jax.vjp(lambda t: embed(t, jnp.asarray(tokens)), table)
        np.testing.assert_array_equal(out, np.asarray(table)[tokens])
        (got,) = jax.jit(vjp)(jnp.asarray(d_rows))
        want = np.zeros((V, C))
        np.add.at(want, tokens.reshape(-1), d_rows.reshape(-1, C).astype(np.float64))
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max(), err_msg=str(shape))
        assert np.array_equal(got, jax.jit(vjp)(jnp.asarray(d_rows))[0])


def test_token_nll_is_optax_cross_entropy(rng):
    """The loss picks the target logit without a gather: the same values and gradients as optax's."""
    logits = jnp.asarray(rng.standard_normal((2, 5, 13)) * 4, jnp.float32)
    targets = jnp.asarray(rng.integers(0, 13, (2, 5)))
    want = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    np.testing.assert_allclose(tr.token_nll(logits, targets), want, rtol=1e-6, atol=1e-6)
    g = jax.grad(lambda x: tr.cross_entropy(x, targets))(logits)
    g_want = jax.grad(lambda x: optax.softmax_cross_entropy_with_integer_labels(x, targets).mean())(logits)
    np.testing.assert_allclose(g, g_want, rtol=1e-6, atol=1e-7)


def test_padded_head_is_the_plain_head(rng):
    """head_multiple pads the head's product with zero columns: the same parameters, logits
    and gradients as the plain head (67 columns taken as 72)."""
    config = rw.RWKVConfig(**SMALL)
    plain, padded = (RWKV(config, wkv_impl="reference", head_multiple=m) for m in (1, 8))
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (2, 9)))
    targets = jnp.asarray(rng.integers(0, config.vocab_size, (2, 9)))
    params = jax.jit(plain.init)(jax.random.PRNGKey(3), tokens)["params"]
    assert jax.tree.all(jax.tree.map(lambda a, b: a.shape == b.shape and bool(jnp.all(a == b)), params,
                                     jax.jit(padded.init)(jax.random.PRNGKey(3), tokens)["params"]))
    params = jax.tree.map(lambda p: p + 0.05 * jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
    logits, _ = jax.jit(plain.apply)({"params": params}, tokens)
    logits_padded, _ = jax.jit(padded.apply)({"params": params}, tokens)
    assert logits_padded.shape == logits.shape == (2, 9, config.vocab_size)
    np.testing.assert_allclose(logits_padded, logits, rtol=1e-6, atol=1e-6)

    def grads(module):
        return jax.jit(jax.grad(lambda p: tr.cross_entropy(module.apply({"params": p}, tokens)[0], targets)))(params)

    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    for path, a, b in zip(paths, jax.tree.leaves(grads(plain)), jax.tree.leaves(grads(padded))):
        assert rel_err(b, np.asarray(a, np.float64)) <= 1e-5, path


# --- the optimizer recipe ----------------------------------------------------------------


def test_schedules():
    cfg = tr.TrainConfig(epochs=2, epoch_steps=50, lr_init=1e-3, lr_final=1e-5)
    exp = tr.make_schedule(cfg)
    steps = np.arange(100)
    want = 1e-3 * (1e-5 / 1e-3) ** (steps / 99)  # lr_init at the first step, lr_final at the last
    np.testing.assert_allclose([float(exp(s)) for s in steps], want, rtol=1e-5)

    cos = tr.make_schedule(cfg.replace(lr_schedule="cosine", warmup_steps=10))
    assert [float(cos(s)) for s in (0, 5)] == pytest.approx([0.0, 5e-4])
    assert float(cos(10)) == pytest.approx(1e-3)
    mid = 10 + 89 / 2  # halfway through the decay: the mean of the ends
    assert float(cos(mid)) == pytest.approx((1e-3 + 1e-5) / 2, rel=1e-5)
    assert float(cos(99)) == pytest.approx(1e-5, rel=1e-5)


def test_optimizer_is_clipped_adam():
    """Two steps of make_optimizer vs Adam written out in numpy (betas 0.9/0.99, eps, clip 1.0)."""
    cfg = tr.TrainConfig(epochs=1, epoch_steps=10, lr_init=0.1, lr_final=0.1)
    opt = tr.make_optimizer(cfg)
    r = np.random.default_rng(0)
    p = {"a": r.normal(size=(3, 4)).astype(np.float32), "b": r.normal(size=5).astype(np.float32)}
    state = opt.init(p)
    m = {k: np.zeros_like(v, np.float64) for k, v in p.items()}
    v = {k: np.zeros_like(x, np.float64) for k, x in p.items()}
    ours, ref = dict(p), {k: x.astype(np.float64) for k, x in p.items()}
    for t, scale in ((1, 3.0), (2, 0.01)):  # the first gradient is clipped, the second is not
        g = {k: (scale * r.normal(size=x.shape)).astype(np.float32) for k, x in p.items()}
        upd, state = opt.update(g, state, ours)
        ours = jax.tree.map(lambda a, b: a + b, ours, upd)
        norm = math.sqrt(sum(float((x.astype(np.float64) ** 2).sum()) for x in g.values()))
        for k in p:
            gk = g[k] * min(1.0, 1.0 / norm)
            m[k] = 0.9 * m[k] + 0.1 * gk
            v[k] = 0.99 * v[k] + 0.01 * gk ** 2
            ref[k] = ref[k] - 0.1 * (m[k] / (1 - 0.9 ** t)) / (np.sqrt(v[k] / (1 - 0.99 ** t)) + 1e-8)
    for k in p:
        np.testing.assert_allclose(ours[k], ref[k], rtol=1e-5, atol=1e-6)


def _step_setup(release_files, **cfg_kwargs):
    model = rw.load_torch(release_files["plain"], k_eps=1e-9, verbose=False)
    cfg = tr.TrainConfig(ctx_len=12, epochs=1, epoch_steps=4, lr_init=1e-3, lr_final=1e-3, dtype="float32",
                         precision="highest", wkv_impl="reference", **cfg_kwargs)
    return model, cfg, tr.setup(model.config, cfg, make_mesh(1, 1))


@pytest.mark.slow
def test_gradient_accumulation_and_mixed_precision(release_files):
    """A micro-batches of B/A rows make the step of one batch of B; bfloat16 compute keeps
    float32 parameters and optimizer state."""
    windows = np.random.default_rng(1).integers(0, SMALL["vocab_size"], (8, 13)).astype(np.int32)
    model, cfg, big = _step_setup(release_files, batch_size=8, grad_accum=1)
    _, _, acc = _step_setup(release_files, batch_size=4, grad_accum=2)
    s1, m1 = big.train_step(big.init_state(model.params), big.put_batch(windows[None]))
    s2, m2 = acc.train_step(acc.init_state(model.params), acc.put_batch(windows.reshape(2, 4, 13)))
    assert float(m2["loss"]) == pytest.approx(float(m1["loss"]), rel=1e-6)
    assert float(m2["grad_norm"]) == pytest.approx(float(m1["grad_norm"]), rel=1e-5)
    # The averaged gradient's norm against loss_and_grad on the whole batch.
    loss, grads = tr.loss_and_grad(model, windows[:, :-1], windows[:, 1:])
    norm = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads.values()))
    assert float(m1["loss"]) == pytest.approx(loss, rel=1e-6)
    assert float(m2["grad_norm"]) == pytest.approx(norm, rel=1e-5)
    # Adam moves each parameter by ~lr_init (1e-3) whatever its gradient's size, so where an
    # element's gradient is near zero the two summation orders can move its step by a few
    # 1e-6 (seen: 2.5e-6 on one element of 2,304 on one CPU): 1% of the step, while a wrong
    # accumulation (one micro-batch only, say) changes steps by a good part of lr_init.
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):
        np.testing.assert_allclose(a, b, atol=1e-2 * cfg.lr_init)
    assert int(s2.step) == 1

    bf16 = tr.setup(model.config, cfg.replace(dtype="bfloat16", precision=None), make_mesh(1, 1))
    state, m16 = bf16.train_step(bf16.init_state(model.params), bf16.put_batch(windows[None]))
    assert bf16.module.dtype == jnp.bfloat16
    assert {x.dtype for x in jax.tree.leaves(state.params)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(state.opt_state) if x.ndim} == {jnp.dtype(jnp.float32)}
    assert float(m16["loss"]) == pytest.approx(float(m1["loss"]), rel=2e-2)
    assert float(m16["loss"]) != float(m1["loss"])  # the matmuls really ran in bfloat16


def test_remat_step_equals_plain_step(release_files):
    """--remat recomputes each block in the backward pass instead of keeping its activations;
    the step it takes is the plain step's: loss, gradient norm and updated parameters."""
    windows = np.random.default_rng(2).integers(0, SMALL["vocab_size"], (1, 2, 13)).astype(np.int32)
    model, cfg, plain = _step_setup(release_files, batch_size=2)
    _, _, remat = _step_setup(release_files, batch_size=2, remat=True)
    assert remat.module.remat and not plain.module.remat
    start = jax.device_get(plain.init_state(model.params).params)
    s1, m1 = plain.train_step(plain.init_state(model.params), plain.put_batch(windows))
    s2, m2 = remat.train_step(remat.init_state(model.params), remat.put_batch(windows))
    assert float(m2["loss"]) == pytest.approx(float(m1["loss"]), rel=1e-6)
    assert float(m2["grad_norm"]) == pytest.approx(float(m1["grad_norm"]), rel=1e-5)
    for a, b in zip(jax.tree.leaves(s1.params), jax.tree.leaves(s2.params)):  # see the tolerance above
        np.testing.assert_allclose(a, b, atol=1e-2 * cfg.lr_init)
    moved = jax.tree.map(lambda a, b: float(np.abs(a - b).max()), jax.device_get(s2.params), start)
    assert max(jax.tree.leaves(moved)) > 0.5 * cfg.lr_init  # the step was taken


@pytest.mark.slow
def test_sharded_steps_equal_single_device():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    r = subprocess.run([sys.executable, "-m", "tests.sharded_check"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    assert {(x["impl"], x["data"], x["fsdp"]) for x in results} == {("reference", 2, 4), ("pallas_interpret", 2, 4)}
    for x in results:
        assert x["loss_rel"] <= 1e-5 and x["grad_norm_rel"] <= 1e-5, x
        assert x["grad_rel"] <= 1e-4, x  # every gradient leaf, not only the norm
        assert x["param_max_abs"] <= 0.1 * x["lr_init"], x
        assert x["specs"]["att.time_decay"] == "P()"  # vectors replicated
        # the [C, 4C] weight and its Adam moment split over fsdp
        assert x["specs"]["ffn.key"] == "P(None, 'fsdp')" == x["specs"]["adam_mu.ffn.key"]
        assert x["ffn_key_shard_shape"] == [64, 64]


# --- train.py ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def char_data(tmp_path_factory):
    return write_char_data(tmp_path_factory.mktemp("train_data"))


def cli_args(char_data, out_dir, *extra):
    root, vocab = char_data
    return ["--scratch", "--n-layer", "2", "--n-embd", "32", "--vocab-size", str(vocab),
            "--data", str(root / "train.npy"), "--ctx-len", "32", "--batch-size", "8", "--grad-accum", "2",
            "--epochs", "3", "--epoch-steps", "20", "--lr-init", "4e-3", "--lr-final", "1e-3",
            "--warmup-steps", "3", "--dtype", "float32", "--out-dir", str(out_dir), "--no-progress",
            "--log-every", "7", *extra]


def test_tiny_stop_and_resume_is_exact_and_logs(char_data, tmp_path, capsys):
    """The quick tier's train/resume: 12 steps at once, or 5 then 7, give the same bits; with
    --no-progress a line per --log-every steps, its rates leaving out the compiling first step."""
    assert train.main(tiny_args(char_data, tmp_path / "once", "--log-every", "4")) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["4/12", "8/12", "12/12"]
    assert re.fullmatch(r"step 4/12  loss \d\.\d{4}  lr \d\.\d\de-0\d  [\d,]+ tok/s  ETA \d\d:\d\d:\d\d", lines[0])
    recs = metrics(tmp_path / "once")
    assert [r["step"] for r in recs] == list(range(1, 13)) and not any(r["skipped"] for r in recs)
    assert recs[0]["tokens_per_s"] == recs[3]["tokens_per_s"] > 0  # steps 2..4, the first one left out
    assert train.main(tiny_args(char_data, tmp_path / "twice", "--stop-at-step", "5")) == 0
    assert train.main(tiny_args(char_data, tmp_path / "twice")) == 0
    assert same_arrays(final_arrays(tmp_path / "once"), final_arrays(tmp_path / "twice"))
    assert [r["loss"] for r in metrics(tmp_path / "twice")] == [r["loss"] for r in recs]


@pytest.fixture(scope="module")
def reference_run(char_data, tmp_path_factory):
    """An uninterrupted run: 60 steps, checkpoints every 20 (2 kept), held-out loss every 20."""
    out = tmp_path_factory.mktemp("run") / "ref"
    root, _ = char_data
    args = cli_args(char_data, out, "--eval-data", str(root / "held.npy"), "--keep", "2", "--eval-windows", "16")
    assert train.main(args) == 0
    return out


@pytest.mark.slow
def test_train_loss_falls_and_exports(reference_run):
    recs = metrics(reference_run)
    train_recs = [r for r in recs if "loss" in r]
    evals = [r for r in recs if "eval_loss" in r]
    assert [r["step"] for r in train_recs] == list(range(1, 61))
    assert [r["step"] for r in evals] == [20, 40, 60]
    first, last = train_recs[0]["loss"], np.mean([r["loss"] for r in train_recs[-5:]])
    assert first > math.log(38)  # about uniform over the characters at the start
    assert last < first - 0.8, (first, last)
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] < first
    assert train_recs[0]["lr"] == 0.0 and train_recs[3]["lr"] == pytest.approx(4e-3)
    assert train_recs[-1]["lr"] == pytest.approx(1e-3)
    assert all(r["tokens"] == r["step"] * 2 * 8 * 32 and r["tokens_per_s"] > 0 for r in train_recs)
    assert not any(r["skipped"] for r in train_recs)
    # Checkpoints: the last 2 kept; exports in both formats hold the same float32 parameters.
    assert sorted(int(p.name) for p in (reference_run / "checkpoints").iterdir()) == [40, 60]
    native = final_arrays(reference_run)
    pth = torch.load(reference_run / "final.pth", weights_only=True)
    assert sorted(pth) == sorted(native) == sorted(k for k in pth if k.startswith(("emb", "blocks", "ln_out", "head")))
    for k, v in pth.items():
        assert v.dtype == torch.float32 and np.array_equal(v.numpy(), native[k]), k
    model = rw.load_any(reference_run / "final.safetensors")
    assert model.config.ctx_len == 32
    assert (reference_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_stop_and_resume_is_exact(char_data, reference_run, tmp_path, capsys):
    out = tmp_path / "r"
    assert train.main(cli_args(char_data, out, "--stop-at-step", "27", "--save-every", "9",
                               "--export", "safetensors")) == 0
    assert "stopped at step 27" in capsys.readouterr().err
    assert not (out / "final.safetensors").exists()
    assert train.main(cli_args(char_data, out, "--save-every", "9", "--export", "safetensors")) == 0
    assert "resuming from" in capsys.readouterr().err
    ref, got = final_arrays(reference_run), final_arrays(out)
    assert all(np.array_equal(ref[k], got[k]) for k in ref)
    ref_losses = [r["loss"] for r in metrics(reference_run) if "loss" in r]
    assert [r["loss"] for r in metrics(out)] == ref_losses  # one record per step, none repeated


@pytest.mark.slow
def test_sigkill_and_resume_is_exact(char_data, reference_run, tmp_path):
    """Kill a training process (SIGKILL: no cleanup, an async save may be half-written),
    then run the same command again: it resumes and reaches the same parameters."""
    out = tmp_path / "k"
    args = cli_args(char_data, out, "--save-every", "2", "--keep", "50", "--export", "safetensors")
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    deadline = time.time() + 300
    ckpt_dir = out / "checkpoints"
    while time.time() < deadline and proc.poll() is None:
        done = [int(p.name) for p in ckpt_dir.glob("*") if p.name.isdigit()] if ckpt_dir.exists() else []
        if done and max(done) >= 10:
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-2000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    killed_at = max(int(p.name) for p in ckpt_dir.glob("*") if p.name.isdigit())
    assert 10 <= killed_at < 60
    assert train.main(args) == 0
    ref, got = final_arrays(reference_run), final_arrays(out)
    assert all(np.array_equal(ref[k], got[k]) for k in ref)


@pytest.mark.slow
def test_context_extension_from_release(release_files, tmp_path, capsys):
    """Start from a release .pth at a longer context; step 1's loss is the loss of that
    checkpoint on the windows the sampler gives step 0."""
    tokens = np.random.default_rng(3).integers(0, SMALL["vocab_size"], 5000).astype(np.uint16)
    np.save(tmp_path / "d.npy", tokens)
    out = tmp_path / "ext"
    args = ["--init", str(release_files["plain"]), "--k-eps", "1e-9", "--data", str(tmp_path / "d.npy"),
            "--ctx-len", "48", "--batch-size", "2", "--epochs", "1", "--epoch-steps", "2", "--dtype", "float32",
            "--precision", "highest", "--out-dir", str(out), "--no-progress", "--export", "safetensors"]
    assert train.main(args) == 0
    model = rw.load(out / "final.safetensors")
    assert model.config.ctx_len == 48 and model.config.k_eps == 1e-9
    windows = WindowSampler(tokens, 48, seed=0).batch(0, 1, 2)[0]
    start = rw.load_torch(release_files["plain"], k_eps=1e-9, verbose=False)
    loss, _ = tr.loss_and_grad(start, windows[:, :-1], windows[:, 1:])
    assert metrics(out)[0]["loss"] == pytest.approx(loss, rel=1e-5)


# --- bad input: one line, exit status 2, no checkpoint lost ----------------------------


def one_line_error(capsys, code, pattern, want_code=2):
    err = capsys.readouterr().err.strip()
    assert code == want_code, err
    assert "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("train.py: error: "), err
    assert pattern in lines[0], lines[0]


def tree_digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_bad_inputs(char_data, tmp_path, capsys):
    root, vocab = char_data
    out = tmp_path / "bad"

    def run(*extra, data=None):
        args = cli_args(char_data, out, *extra)
        if data is not None:
            args[args.index("--data") + 1] = str(data)
        return train.main(args)

    one_line_error(capsys, run(data=tmp_path / "missing.npy"), "--data token file not found: ")
    np.save(tmp_path / "big.npy", np.array([1, 2, vocab, 3] * 40, np.uint16))
    one_line_error(capsys, run(data=tmp_path / "big.npy"),
                   f"token id {vocab} at position 2 is outside [0, vocab_size={vocab})")
    np.save(tmp_path / "short.npy", np.arange(32, dtype=np.uint16))
    one_line_error(capsys, run(data=tmp_path / "short.npy"), "has 32 tokens, fewer than the 33 needed")
    one_line_error(capsys, run("--eval-data", str(root / "train.npy"), "--batch-size", "8", "--eval-windows", "4"),
                   "one evaluation batch needs")
    one_line_error(capsys, run("--data-parallel", "2"), "mesh data=2 x fsdp=1 needs 2 devices, 1 present")


def test_batch_not_divisible_by_data_axis(char_data, tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    args = cli_args(char_data, tmp_path / "o", "--batch-size", "6")
    r = subprocess.run([sys.executable, "train.py", *args], cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == (
        "train.py: error: batch size 6 is not divisible by the data axis of the mesh: data=8 x fsdp=1 = 8 "
        "devices each need the same number of rows")
    assert not (tmp_path / "o").exists()  # nothing written


def test_resume_with_other_settings_is_refused(char_data, tmp_path, capsys):
    out = tmp_path / "c"
    assert train.main(tiny_args(char_data, out, "--stop-at-step", "3")) == 0
    ckpts = out / "checkpoints"
    before = tree_digest(ckpts)
    one_line_error(capsys, train.main(tiny_args(char_data, out, "--lr-init", "1e-3")),
                   "with different settings: lr_init=0.003 in the checkpoint, 0.001 now")
    assert tree_digest(ckpts) == before
    # --no-resume refuses to touch a folder that holds checkpoints.
    one_line_error(capsys, train.main(tiny_args(char_data, out, "--no-resume")), "already holds checkpoints")
    assert tree_digest(ckpts) == before and checkpoint_steps(out) == [3]


def test_help_lists_every_flag():
    r = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0
    assert "75 stopped by SIGTERM/SIGINT with a checkpoint at the current step" in " ".join(r.stdout.split())
    parser_flags = set(re.findall(r"(--[a-z][a-z0-9-]*)", r.stdout))
    for flag in ("--init", "--scratch", "--data", "--eval-data", "--eval-every", "--ctx-len", "--batch-size",
                 "--grad-accum", "--lr-init", "--lr-final", "--lr-schedule", "--warmup-steps", "--dtype",
                 "--fsdp", "--data-parallel", "--distributed", "--save-every", "--keep", "--stop-at-step",
                 "--export", "--out-dir", "--seed", "--wkv-impl", "--remat", "--precision", "--deterministic",
                 "--no-deterministic", "--coordinator-address", "--num-processes", "--process-id",
                 "--max-bad-steps", "--allow-data-change", "--init-timeout", "--no-progress", "--log-every"):
        assert flag in parser_flags, flag
