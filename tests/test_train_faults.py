"""Training under faults (docs/reliability.md, "Training"): non-finite steps are skipped and
stop the run when they persist; no non-finite state is written or exported; a checkpoint
that does not read back whole gives way to the previous one; a failing save or export ends
the run at once with one line and no waiting thread; SIGTERM and SIGINT write a checkpoint
at the current step and exit 75; resuming on another data file is refused."""

import hashlib
import shutil
import signal
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from rwkv2_jax import formats
from rwkv2_jax.cli import train
from rwkv2_jax.config import RWKVConfig
from rwkv2_jax.training import checkpoints as ck
from rwkv2_jax.training import trainer as tr
from rwkv2_jax.training.data import WindowSampler
from rwkv2_jax.training.sharding import make_mesh
from tests import train_fault_runner
from tests.train_support import (
    Procs,
    checkpoint_steps,
    cpu_env,
    error_lines,
    final_arrays,
    metrics,
    same_arrays,
    tiny_args,
    write_char_data,
)

STEPS = 12


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_char_data(tmp_path_factory.mktemp("faults_data"))


@pytest.fixture(scope="module")
def clean_run(data, tmp_path_factory):
    """An uninterrupted tiny run: the parameters every interrupted run must reach."""
    out = tmp_path_factory.mktemp("clean") / "run"
    assert train.main(tiny_args(data, out, "--save-every", "3")) == 0
    return out


def one_line_error(capsys, code, want_code, pattern):
    err = capsys.readouterr().err
    assert code == want_code, err
    assert "Traceback" not in err
    lines = error_lines(err)
    assert len(lines) == 1 and lines[0].startswith("train.py: error: "), err
    assert pattern in lines[0], lines[0]
    return err


def tree_digest(folder):
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def restore(out_dir, step):
    """The TrainState of checkpoint `step` of a tiny run (host arrays), read as a resume does."""
    folder = ck.TrainingCheckpoints(out_dir / "checkpoints")
    try:
        record = folder.read_record(step)
        s = tr.setup(RWKVConfig.from_dict(record["model_config"]), tr.TrainConfig.from_dict(record["train_config"]),
                     make_mesh(1, 1))
        return jax.tree.map(np.array, jax.device_get(folder.restore(step, record, s.state_shape, s.state_shardings)))
    finally:
        folder.close()


def assert_trees_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)  # NaN equals NaN here


# --- non-finite steps ----------------------------------------------------------------


def tiny_setup(data, tmp_path):
    """The model, initial parameters and compiled steps of `tiny_args` (shared with the CLI runs)."""
    args = train.parse_args(tiny_args(data, tmp_path / "unused"))
    cfg = train.train_config(args)
    config, params = train.initial_model(args, cfg)
    return config, cfg, jax.tree.map(np.array, params), tr.setup(config, cfg, make_mesh(1, 1))


@pytest.mark.slow
def test_nonfinite_step_leaves_params_and_optimizer_state(data, tmp_path, rng):
    config, cfg, params, s = tiny_setup(data, tmp_path)
    shape = (cfg.grad_accum, cfg.batch_size, cfg.ctx_len + 1)
    batch = lambda: s.put_batch(rng.integers(0, config.vocab_size, shape).astype(np.int32))  # noqa: E731
    state, m = s.train_step(s.init_state(params), batch())
    assert not bool(m["skipped"]) and int(state.step) == 1 and int(state.skipped) == 0
    before = jax.device_get(state)
    # A NaN in one parameter: the loss and every gradient are NaN.
    poisoned = jax.tree.map(np.copy, before.params)
    poisoned["blocks_0"]["att"]["time_first"][0] = np.nan
    state, m = s.train_step(s.init_state(poisoned)._replace(
        step=jnp.int32(1), opt_state=jax.tree.map(jnp.asarray, before.opt_state)), batch())
    assert bool(m["skipped"]) and not np.isfinite(float(m["loss"]))
    after = jax.device_get(state)
    assert_trees_equal(after.params, poisoned)  # untouched, bit for bit
    assert_trees_equal(after.opt_state, before.opt_state)  # Adam's moments and counts too
    assert int(after.step) == 2 and int(after.skipped) == 1
    assert float(m["lr"]) == pytest.approx(float(s.schedule(1)))
    # The next step runs at the learning rate the skipped one would have had.
    _, m = s.train_step(state, batch())
    assert bool(m["skipped"]) and float(m["lr"]) == pytest.approx(float(s.schedule(1)))


@pytest.fixture
def poison(monkeypatch, data):
    """poison(batches): the windows of those 0-based steps hold token id V (outside the data),
    and the loss of a batch holding it is NaN (and so is its gradient)."""
    _, vocab = data
    real_loss, real_batch = tr.loss_fn, WindowSampler.batch
    bad = set()

    def loss_fn(module, params, inputs, targets):
        return real_loss(module, params, inputs, targets) * jnp.where(jnp.any(inputs == vocab), jnp.nan, 1.0)

    def batch(self, step, grad_accum, batch_size):
        windows = real_batch(self, step, grad_accum, batch_size)
        if step in bad:
            windows[..., 0] = vocab
        return windows

    monkeypatch.setattr(tr, "loss_fn", loss_fn)
    monkeypatch.setattr(WindowSampler, "batch", batch)
    tr.setup.cache_clear()  # the compiled steps of other tests hold the real loss
    yield lambda steps: bad.update(steps)
    tr.setup.cache_clear()


@pytest.mark.slow
def test_cli_skips_nonfinite_steps_logs_them_and_resumes_exactly(data, poison, tmp_path, capsys):
    _, vocab = data
    poison({3, 4})  # steps 4 and 5
    args = lambda out, *extra: tiny_args(data, out, "--vocab-size", str(vocab + 1), *extra)  # noqa: E731
    assert train.main(args(tmp_path / "a")) == 0
    recs = [r for r in metrics(tmp_path / "a") if "loss" in r]
    assert [r["step"] for r in recs if r["skipped"]] == [4, 5]
    assert all(r["loss"] is None and r["grad_norm"] is None for r in recs if r["skipped"])
    assert all(np.isfinite(r["loss"]) for r in recs if not r["skipped"])
    # The learning rate follows the applied steps: steps 4, 5 and 6 all use schedule(3).
    lr = {r["step"]: r["lr"] for r in recs}
    assert lr[4] == lr[5] == lr[6] != lr[3]
    assert all(np.isfinite(v).all() for v in final_arrays(tmp_path / "a").values())
    assert "step 5/12  loss nan" in capsys.readouterr().err  # the --no-progress log line
    # Stopped inside the bad stretch and resumed: the same parameters, bit for bit.
    assert train.main(args(tmp_path / "b", "--stop-at-step", "4")) == 0
    assert train.main(args(tmp_path / "b")) == 0
    assert same_arrays(final_arrays(tmp_path / "a"), final_arrays(tmp_path / "b"))


@pytest.mark.slow
def test_max_bad_steps_stops_and_keeps_the_finite_checkpoints(data, poison, tmp_path, capsys):
    _, vocab = data
    poison(range(6, STEPS))  # every step from 7 on
    out = tmp_path / "div"
    code = train.main(tiny_args(data, out, "--vocab-size", str(vocab + 1), "--max-bad-steps", "3",
                                "--save-every", "2", "--keep", "2"))
    one_line_error(capsys, code, 1, "step 9: 3 steps in a row had a non-finite loss or gradient norm")
    assert not (out / "final.safetensors").exists()
    assert checkpoint_steps(out) == [6, 8]  # 8 was written inside the bad stretch: the same finite state
    six, eight = restore(out, 6), restore(out, 8)
    assert_trees_equal(eight.params, six.params)
    assert_trees_equal(eight.opt_state, six.opt_state)
    assert (int(eight.step), int(eight.skipped)) == (8, 2)
    skipped = [r["step"] for r in metrics(out) if r.get("skipped")]
    assert skipped == [7, 8, 9]


def test_nonfinite_starting_weights_are_refused(data, tmp_path, capsys):
    _, vocab = data
    config = RWKVConfig(n_layer=1, n_embd=16, vocab_size=vocab)
    arrays = formats.params_to_release(jax.tree.map(np.array, tr.initial_params(config)), config)
    arrays["blocks.0.ffn.key.weight"][1, 2] = np.nan
    formats.write_native(arrays, config, tmp_path / "nan.safetensors")
    args = ["--init", str(tmp_path / "nan.safetensors"), *tiny_args(data, tmp_path / "out")[7:]]  # not --scratch
    code = train.main(args)
    err = capsys.readouterr().err
    assert code == 2 and len(error_lines(err)) == 1 and "Traceback" not in err, err
    assert "finite" in error_lines(err)[0].lower() or "nan" in error_lines(err)[0].lower(), err
    assert checkpoint_steps(tmp_path / "out") == []


def test_nonfinite_state_is_never_written(data, tmp_path):
    config, cfg, params, s = tiny_setup(data, tmp_path)
    record = ck.make_record(config, cfg, data={}, init=None)
    folder = ck.TrainingCheckpoints(tmp_path / "checkpoints", keep=1)
    try:
        folder.save(1, s.init_state(params), record)
        folder.wait()
        params["head"]["kernel"][0, 0] = np.inf
        with pytest.raises(ck.TrainingCheckpointError, match=r"step 2: the training state holds non-finite values"):
            folder.save(2, s.init_state(params), record)
        folder.wait()
        assert folder.steps() == [1]  # keep=1 rotated nothing away
    finally:
        folder.close()


# --- checkpoints that do not read back whole -------------------------------------------


def flip_a_bit_of_the_arrays(out, step):
    """Flip one bit (size unchanged) where checkpoint `step` keeps its arrays: the first of a
    few places in its data files, largest file first, where the flip changes what a restore
    reads. Some data files hold nothing a restore reads, and which ones differs between runs."""
    files = [p for p in (out / "checkpoints" / str(step) / "state").rglob("*") if p.is_file() and "ocdbt" in str(p)]
    for path in sorted(files, key=lambda p: -p.stat().st_size):
        raw = path.read_bytes()
        for at in (len(raw) // 2, len(raw) // 3, 2 * len(raw) // 3):
            flipped = bytearray(raw)
            flipped[at] ^= 0x10
            path.write_bytes(bytes(flipped))
            try:
                restore(out, step)
            except ck.TrainingCheckpointError as err:
                if "do not match the fingerprints" in str(err):
                    return
            path.write_bytes(raw)
    raise AssertionError(f"no one-bit flip in {out / 'checkpoints' / str(step)} changed what a restore reads")


@pytest.mark.slow
def test_bit_flip_in_a_checkpoint_falls_back_to_the_previous(data, clean_run, tmp_path, capsys):
    out = tmp_path / "flip"
    assert train.main(tiny_args(data, out, "--save-every", "3", "--stop-at-step", "9")) == 0
    assert checkpoint_steps(out) == [3, 6, 9]
    flip_a_bit_of_the_arrays(out, 9)
    capsys.readouterr()
    assert train.main(tiny_args(data, out, "--save-every", "3")) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert len(warnings) == 1, err
    assert f"{out / 'checkpoints' / '9'}: 1 of " in warnings[0] and "do not match the fingerprints" in warnings[0]
    assert f"resuming from {out / 'checkpoints' / '6'} instead" in warnings[0]
    assert (out / "checkpoints-rejected" / "9" / "state").is_dir()  # set aside, not deleted
    assert same_arrays(final_arrays(out), final_arrays(clean_run))


def test_nonfinite_checkpoint_falls_back_to_the_previous(data, clean_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "nan"
    assert train.main(tiny_args(data, out, "--save-every", "3", "--stop-at-step", "6")) == 0
    # Rewrite step 6 with a NaN in it and fingerprints that match (as a faulty writer would).
    state = restore(out, 6)
    state.params["ln_out"]["scale"][3] = np.nan
    folder = ck.TrainingCheckpoints(out / "checkpoints")
    record = folder.read_record(6)
    shutil.rmtree(out / "checkpoints" / "6")
    folder.manager.reload()
    real_inspect = ck.inspect_state
    monkeypatch.setattr(ck, "inspect_state", lambda st: (True, real_inspect(st)[1]))
    folder.save(6, jax.tree.map(jnp.asarray, state), record)
    folder.close()
    monkeypatch.undo()
    capsys.readouterr()
    assert train.main(tiny_args(data, out, "--save-every", "3")) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and f"checkpoint {out / 'checkpoints' / '6'} holds non-finite values" in warnings[0]
    assert f"resuming from {out / 'checkpoints' / '3'} instead" in warnings[0]
    assert same_arrays(final_arrays(out), final_arrays(clean_run))


def test_no_checkpoint_restorable_is_one_line_and_moves_nothing(data, tmp_path, capsys):
    out = tmp_path / "garbage"
    assert train.main(tiny_args(data, out, "--save-every", "3", "--stop-at-step", "6")) == 0
    for p in (out / "checkpoints").rglob("*"):
        if p.is_file() and "ocdbt" in str(p):
            p.write_bytes(b"\x00garbage" * 3)
    before = tree_digest(out / "checkpoints")
    capsys.readouterr()
    one_line_error(capsys, train.main(tiny_args(data, out)), 1,
                   f"no checkpoint in {out / 'checkpoints'} can be resumed (steps 6, 3)")
    assert tree_digest(out / "checkpoints") == before
    assert not (out / "checkpoints-rejected").exists()


def test_resuming_on_other_data_is_refused(data, tmp_path, capsys):
    root, _ = data
    out = tmp_path / "d"
    assert train.main(tiny_args(data, out, "--stop-at-step", "4")) == 0
    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(root / "held.npy", other / "train.npy")
    before = tree_digest(out / "checkpoints")
    capsys.readouterr()
    one_line_error(capsys, train.main(tiny_args((other, data[1]), out)), 2,
                   f"--data {other / 'train.npy'} is not the file checkpoint {out / 'checkpoints' / '4'} was "
                   f"trained on ({root / 'train.npy'}): size")
    assert tree_digest(out / "checkpoints") == before
    # The same content under another path is the same data.
    moved = tmp_path / "moved"
    moved.mkdir()
    shutil.copy(root / "train.npy", moved / "train.npy")
    assert train.main(tiny_args((moved, data[1]), out, "--stop-at-step", "6")) == 0
    # Another file, allowed.
    assert train.main(tiny_args((other, data[1]), out, "--allow-data-change")) == 0
    assert "note: --allow-data-change: continuing on" in capsys.readouterr().err


# --- failing writes -------------------------------------------------------------------


def threads_left(before, seconds: float = 30.0):
    """Non-daemon threads started since `before` that are still alive after `seconds` (orbax's
    writers of a failed save finish what they were doing, in well under a second)."""
    deadline = time.monotonic() + seconds
    while True:
        left = {t for t in threading.enumerate() if not t.daemon and t is not threading.main_thread()} - before
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


@pytest.mark.parametrize("mode", ["readonly", "full"])
def test_failing_checkpoint_write_ends_the_run(mode, data, tmp_path, capsys, monkeypatch):
    threads_before = set(threading.enumerate())
    train_fault_runner.install(mode, 6, monkeypatch.setattr)
    out = tmp_path / mode
    code = train.main(tiny_args(data, out, "--save-every", "3", "--keep", "1"))
    one_line_error(capsys, code, 1, f"cannot write checkpoint {out.absolute() / 'checkpoints' / '6'}: ")
    assert not threads_left(threads_before)  # nothing left waiting
    assert checkpoint_steps(out) == [3]  # the last good checkpoint stays (keep=1 rotated nothing)
    assert not (out / "final.safetensors").exists()
    monkeypatch.undo()
    assert int(restore(out, 3).step) == 3


@pytest.mark.slow
def test_failing_checkpoint_write_exits_the_process(data, tmp_path):
    """The process ends (no orbax thread keeps it alive) within seconds, with one line."""
    out = tmp_path / "ro"
    with Procs(tmp_path / "logs") as procs:
        proc = procs.start(["-m", "tests.train_fault_runner", "readonly", "6",
                            *tiny_args(data, out, "--save-every", "3")], cpu_env(), "ro")
        code = procs.wait(proc, timeout=240)
        log = procs.output(proc)
    assert code == 1, log
    lines = error_lines(log)
    assert len(lines) == 1 and f"cannot write checkpoint {out / 'checkpoints' / '6'}: " in lines[0], log
    assert checkpoint_steps(out) == [3]


def test_failing_export_ends_the_run_and_keeps_the_checkpoint(data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "exp"
    (out / "final.safetensors").mkdir(parents=True)  # a folder where the file goes: the rename fails
    (out / "final.safetensors" / "keep").write_text("x")
    code = train.main(tiny_args(data, out))
    one_line_error(capsys, code, 1, f"cannot write the exports to --out-dir {out}: ")
    assert checkpoint_steps(out) == [STEPS]  # the final state is safe
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints", "final.safetensors", "metrics.jsonl"]  # no temp
    monkeypatch.setattr(train.formats, "write_native", lambda *a, **k: (_ for _ in ()).throw(
        OSError(30, "Read-only file system", str(out / "final.safetensors"))))
    code = train.main(tiny_args(data, out))
    one_line_error(capsys, code, 1, "Read-only file system")
    monkeypatch.undo()
    shutil.rmtree(out / "final.safetensors")
    assert train.main(tiny_args(data, out)) == 0  # resumes at the last step and exports
    assert (out / "final.safetensors").is_file()


def test_out_dir_that_cannot_be_a_folder(data, tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    one_line_error(capsys, train.main(tiny_args(data, tmp_path / "file" / "run")), 2,
                   f"cannot create --out-dir {tmp_path / 'file' / 'run'}")
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "checkpoints").write_text("x")
    one_line_error(capsys, train.main(tiny_args(data, tmp_path / "o")), 1,
                   f"checkpoint path {tmp_path / 'o' / 'checkpoints'} exists and is not a folder")


# --- SIGTERM and SIGINT ---------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_writes_a_checkpoint_at_the_current_step(sig, data, clean_run, tmp_path):
    """Resumed at step 5 (checkpoints every 100 steps), signalled while it compiles: one
    checkpoint at the step it is in, exit 75; the same command then finishes bit-exactly."""
    out = tmp_path / sig.name
    args = tiny_args(data, out, "--save-every", "100")
    assert train.main([*args, "--stop-at-step", "5"]) == 0
    with Procs(tmp_path / "logs") as procs:
        proc = procs.start(["train.py", *args], cpu_env(), sig.name)
        procs.wait_for(lambda: "steps 5..12" in procs.output(proc), proc, 240, "start of training")
        proc.send_signal(sig)
        code = procs.wait(proc, timeout=240)
        log = procs.output(proc)
    assert code == 75, log
    last = metrics(out)[-1]["step"]
    assert 6 <= last < STEPS
    assert checkpoint_steps(out) == [5, last]
    assert f"stopped by {sig.name} at step {last}; checkpoint {out / 'checkpoints' / str(last)}" in log
    assert "Traceback" not in log
    assert train.main([*args, "--export", "both"]) == 0
    assert same_arrays(final_arrays(out), final_arrays(clean_run))
    pth = {k: v.numpy() for k, v in torch.load(out / "final.pth", weights_only=True).items()}
    assert same_arrays(pth, final_arrays(clean_run))  # final.pth too, bit for bit
