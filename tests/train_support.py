"""Helpers of the training tests: a character-level token file, train.py arguments for a tiny
run, its outputs, and subprocesses that are always bounded and killed with SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from rwkv2_jax.cli.demo import DEMO_TEXT, char_tokenizer
from tests.conftest import REPO


def write_char_data(root: Path):
    """train.npy and held.npy of the demo text, character-level; returns (root, vocab size)."""
    tok = char_tokenizer(DEMO_TEXT)
    ids = np.asarray(tok.encode(DEMO_TEXT * 4).ids, np.uint16)
    np.save(root / "train.npy", ids[: len(ids) * 3 // 4])
    np.save(root / "held.npy", ids[len(ids) * 3 // 4:])
    return root, tok.get_vocab_size()


def tiny_args(data, out_dir, *extra, steps: int = 12, vocab_size=None):
    """train.py arguments of a tiny run (L1-D16, 4 rows of 16 tokens, `steps` steps)."""
    root, vocab = data
    return ["--scratch", "--n-layer", "1", "--n-embd", "16", "--vocab-size", str(vocab_size or vocab),
            "--data", str(root / "train.npy"), "--ctx-len", "16", "--batch-size", "4", "--epochs", "1",
            "--epoch-steps", str(steps), "--lr-init", "3e-3", "--lr-final", "1e-3", "--dtype", "float32",
            "--out-dir", str(out_dir), "--no-progress", "--log-every", "1", "--export", "safetensors", *extra]


def metrics(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


def final_arrays(out_dir):
    return load_file(str(Path(out_dir) / "final.safetensors"))


def same_arrays(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


def checkpoint_steps(out_dir):
    folder = Path(out_dir) / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.exists() else []


def error_lines(text: str):
    return [line for line in text.splitlines() if ": error: " in line]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env(devices: int = 1, cache=None, **extra) -> dict:
    """Environment of a train.py subprocess on `devices` CPU devices, sharing a compilation cache."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
           "PYTHONUNBUFFERED": "1", **extra}
    if cache is not None:
        env.update(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                   JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


class Procs:
    """train.py subprocesses with stderr in files; leaving the block SIGKILLs any still alive."""

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.procs = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.kill_all()

    def start(self, argv, env, name: str) -> subprocess.Popen:
        """`python *argv` in the repository root (e.g. ["train.py", ...] or ["-m", "tests.x", ...])."""
        log = open(self.log_dir / f"{name}.log", "wb")
        proc = subprocess.Popen([sys.executable, *argv], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        proc.log_path = log.name
        log.close()
        self.procs.append(proc)
        return proc

    def wait(self, proc, timeout: float) -> int:
        """The exit status, or SIGKILL and an AssertionError after `timeout` seconds."""
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            raise AssertionError(f"{proc.args[1:3]} did not exit within {timeout} s:\n{self.output(proc)[-3000:]}")

    def wait_for(self, predicate, proc, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if proc.poll() is not None:
                raise AssertionError(f"exited ({proc.returncode}) before {what}:\n{self.output(proc)[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {what} within {timeout} s:\n{self.output(proc)[-3000:]}")
            time.sleep(0.02)

    @staticmethod
    def output(proc) -> str:
        return Path(proc.log_path).read_text(errors="replace")

    def kill_all(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
