"""train.py --distributed with real processes: two processes of two CPU devices each (gloo
collectives, a coordinator on 127.0.0.1 at a free port), as two hosts would run.

They train to the parameters of one 4-device process (fsdp 4: parameters and optimizer state
sharded across the processes, the batch split over all four devices); after a SIGKILLed
process and after a SIGTERM to both, the same command resumes bit-exactly; a missing peer,
per-process out-dirs and per-process data files end in one line. Every process is bounded and killed with SIGKILL;
they share one compilation cache (process 0 writes it).
"""

import base64
import json
import signal

import numpy as np
import pytest

from tests.train_support import (
    Procs,
    checkpoint_steps,
    cpu_env,
    error_lines,
    final_arrays,
    free_port,
    same_arrays,
    tiny_args,
    write_char_data,
)

pytestmark = pytest.mark.slow

STEPS = 16
FSDP = ("--fsdp", "4")
TIMEOUT = 300  # seconds: the most any process may take (a busy 2-core box included)


@pytest.fixture(scope="module")
def box(tmp_path_factory):
    """(data, compilation cache) shared by every process of this file."""
    root = tmp_path_factory.mktemp("multiprocess")
    return write_char_data(root), root / "jax-cache"


def run_args(box, out_dir, *extra):
    # L1-D64: ffn.key [64, 256] is big enough to be split over fsdp (sharding.MIN_FSDP_SIZE).
    args = tiny_args(box[0], out_dir, "--log-every", "4", *extra, steps=STEPS)
    args[args.index("--n-embd") + 1] = "64"
    return args


def start_pair(procs, box, args_of, name, *, init_timeout=60, ids=(0, 1)):
    """Processes `ids` of a 2-process run; args_of(i) gives process i's train.py arguments."""
    port = free_port()
    return [procs.start(["train.py", *args_of(i), "--distributed", "--coordinator-address", f"127.0.0.1:{port}",
                         "--num-processes", "2", "--process-id", str(i), "--init-timeout", str(init_timeout)],
                        cpu_env(2, box[1]), f"{name}-{i}") for i in ids]


def finish(procs, pair, codes=(0, 0)):
    logs = []
    for proc, want in zip(pair, codes):
        code = procs.wait(proc, TIMEOUT)
        logs.append(procs.output(proc))
        assert code == want, logs[-1][-3000:]
    return logs


@pytest.fixture(scope="module")
def references(box, tmp_path_factory):
    """(two, one): out-dirs of uninterrupted runs, at once: 2 processes, and 1 process of 4 devices."""
    root = tmp_path_factory.mktemp("references")
    two, one = root / "two", root / "one"
    with Procs(root / "logs") as procs:
        pair = start_pair(procs, box, lambda i: run_args(box, two, *FSDP), "two")
        single = procs.start(["train.py", *run_args(box, one, *FSDP)], cpu_env(4, box[1]), "one")
        finish(procs, pair)
        finish(procs, [single], codes=(0,))
    return two, one


def sharding_of(out_dir, step: int, name: str) -> dict:
    """How checkpoint `step` stored the array `name` ("params.blocks_0.ffn.key.kernel")."""
    table = json.loads((out_dir / "checkpoints" / str(step) / "state" / "_sharding").read_text())
    found = next(v for k, v in table.items() if base64.b64decode(k).decode() == name)
    return json.loads(found) if isinstance(found, str) else found


def test_two_processes_equal_one_process_of_four_devices(references):
    two, one = references
    a, b = final_arrays(two), final_arrays(one)
    assert sorted(a) == sorted(b)
    worst = max(float(np.abs(a[k] - b[k]).max()) for k in a)
    assert worst <= 1e-6, worst
    stored = sharding_of(two, STEPS, "params.blocks_0.ffn.key.kernel")
    devices = {d["id"] for row in stored["device_mesh"]["mesh"] for d in row}
    assert len(devices) == 4 and len({d // 2048 for d in devices}) == 2  # both processes' devices
    assert "fsdp" in json.dumps(stored["partition_spec"]) and stored["shape"] == [1, 4]


def test_sigkill_one_then_sigterm_both_resume_bit_exactly(box, references, tmp_path):
    """SIGKILL process 1 mid-run (then its peer, which waits on it), restart both; SIGTERM both
    as they start: one checkpoint at one step, exit 75; restart both: the uninterrupted bits."""
    out = tmp_path / "run"
    args = run_args(box, out, *FSDP, "--save-every", "2")
    with Procs(tmp_path / "logs") as procs:
        pair = start_pair(procs, box, lambda i: args, "killed")
        procs.wait_for(lambda: max(checkpoint_steps(out), default=0) >= 4, pair[0], TIMEOUT, "checkpoint 4")
        pair[1].send_signal(signal.SIGKILL)
        assert procs.wait(pair[1], TIMEOUT) == -signal.SIGKILL
        pair[0].send_signal(signal.SIGKILL)
        procs.wait(pair[0], TIMEOUT)
        killed_at = max(checkpoint_steps(out))
        assert 4 <= killed_at < STEPS

        pair = start_pair(procs, box, lambda i: args, "terminated")
        procs.wait_for(lambda: f"steps {killed_at}..{STEPS}" in procs.output(pair[0]), pair[0], TIMEOUT,
                       "resumed training")
        for proc in pair:
            proc.send_signal(signal.SIGTERM)
        logs = finish(procs, pair, codes=(75, 75))
        stopped = max(checkpoint_steps(out))
        assert killed_at < stopped < STEPS, (killed_at, stopped)
        assert f"stopped by SIGTERM at step {stopped}" in logs[0]

        logs = finish(procs, start_pair(procs, box, lambda i: args, "rerun"))
        assert f"resuming from {out.absolute() / 'checkpoints' / str(stopped)}" in logs[0]
    assert same_arrays(final_arrays(out), final_arrays(references[0]))


def test_missing_peer_is_one_line_within_the_init_timeout(box, tmp_path):
    with Procs(tmp_path / "logs") as procs:
        alone0 = start_pair(procs, box, lambda i: run_args(box, tmp_path / "a"), "alone0", init_timeout=3, ids=(0,))
        alone1 = start_pair(procs, box, lambda i: run_args(box, tmp_path / "b"), "alone1", init_timeout=3, ids=(1,))
        (log0,), (log1,) = finish(procs, alone0, (1,)), finish(procs, alone1, (1,))
    for log, want in ((log0, "process(es) 1 of 2 did not connect to 127.0.0.1:"),
                      (log1, "no answer from process 0 at 127.0.0.1:")):
        lines = error_lines(log)
        assert len(lines) == 1 and want in lines[0] and "within --init-timeout 3 s" in lines[0], log[-3000:]
        assert "Traceback" not in log and "Check failure" not in log


def test_per_process_out_dirs_or_data_are_one_line_on_every_process(box, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    np.save(other / "train.npy", np.load(box[0][0] / "train.npy")[:-1])  # one token short
    with Procs(tmp_path / "logs") as procs:
        split = start_pair(procs, box, lambda i: run_args(box, tmp_path / f"host{i}"), "split")
        logs = finish(procs, split, codes=(2, 2))
        data_of = lambda i: (box[0][0] if i == 0 else other, box[0][1])  # noqa: E731
        mixed = start_pair(procs, box, lambda i: run_args((data_of(i), box[1]), tmp_path / "shared"), "data")
        logs += finish(procs, mixed, codes=(2, 2))
    wants = (f"--out-dir {tmp_path / 'host0'} is not the same folder on every process: process(es) 1 do not see",
             f"--out-dir {tmp_path / 'host1'} on process 1 is not the folder process 0 writes to",
             "is not the same file on every process (process(es) 1 differ from process 0)",
             "is not the same file on every process (process(es) 1 differ from process 0)")
    for log, want in zip(logs, wants):
        lines = error_lines(log)
        assert len(lines) == 1 and want in lines[0], log[-3000:]
    for folder in ("host0", "host1", "shared"):
        assert not (tmp_path / folder / "checkpoints").exists()
