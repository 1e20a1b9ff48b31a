"""Train or fine-tune RWKV-v2 on a token file, on one device, many, or many hosts.

    # fine-tune a release (k_eps from the release name) at its context length
    python train.py --init 20220615-10803.pth --data train.npy --out-dir runs/ft \\
        --lr-init 1e-5 --lr-final 1e-5 --epochs 4 --epoch-steps 500
    # extend the context: train the 768 model at 1536
    python train.py --init 20220615-10803.pth --data train.npy --ctx-len 1536 --out-dir runs/ctx1536
    # from scratch with the original initialisation
    python train.py --scratch --n-layer 12 --n-embd 768 --data train.npy --out-dir runs/l12

Data: a .npy of token ids (rwkv2-prepare-data makes one); every step reads
batch_size x grad_accum random windows of ctx_len + 1 tokens, drawn from (--seed, step)
alone. Checkpoints (orbax, async, the last --keep kept) go to OUT_DIR/checkpoints; running
the same command again resumes from the latest one and reaches exactly the parameters of an
uninterrupted run. At the end: OUT_DIR/final.pth (release format), OUT_DIR/final.safetensors
(native), OUT_DIR/metrics.jsonl and OUT_DIR/loss.png. Several GPUs: data parallel over all
of them by default; --fsdp N also shards parameters and optimizer state over groups of N
devices.

Faults (docs/reliability.md): a step with a non-finite loss or gradient is skipped (its
parameters and optimizer state are kept) and logged; --max-bad-steps in a row stop the run.
A checkpoint that does not read back whole (fingerprints, finiteness) is set aside for the
previous one. SIGTERM or SIGINT writes a checkpoint at the current step, then exits 75.

Exit status: 0 done (or stopped at --stop-at-step); 1 the run failed (non-finite steps in a
row, a checkpoint or export that cannot be written, nothing resumable, a missing peer);
2 bad input; 75 stopped by SIGTERM/SIGINT with a checkpoint at the current step (rerun the
same command to continue).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import math
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import NamedTuple, Optional

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from rwkv2_jax import formats
from rwkv2_jax.cli.common import UsageError
from rwkv2_jax.config import K_CLAMP, K_EPS, PRESETS, RWKVConfig
from rwkv2_jax.handle import load_any
from rwkv2_jax.training import sharding as shd
from rwkv2_jax.training import trainer as tr
from rwkv2_jax.training.checkpoints import (
    TrainingCheckpointError,
    TrainingCheckpoints,
    inspect_state,
    make_record,
    one_line,
    settings_mismatch,
)
from rwkv2_jax.training.data import DataError, TokenFile, WindowSampler, eval_windows, file_identity, identity_mismatch
from rwkv2_jax.wkv import WKV_IMPLS

PROG = "train.py"
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PREEMPTED = 75  # EX_TEMPFAIL of sysexits.h: "try again later", which is what resumes the run


class TrainingFailed(Exception):
    """The run cannot go on (divergence, an export that cannot be written, a missing peer):
    printed as one line, exit status 1."""


# --- command line ------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    d = tr.TrainConfig()
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--init", default=None, help="start from this checkpoint: a release .pth or a native .safetensors")
    src.add_argument("--scratch", action="store_true", help="start from the original initialisation (spec)")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None, help="--scratch: a released size")
    g.add_argument("--n-layer", type=int, default=None, help="--scratch: layers L")
    g.add_argument("--n-embd", type=int, default=None, help="--scratch: width C")
    g.add_argument("--vocab-size", type=int, default=50277, help="--scratch: vocabulary V (default 50277, the 20B tokenizer)")
    g.add_argument("--ffn-pre", action="store_true", help="--scratch: the RWKV-ffnPre variant")
    g.add_argument("--k-eps", type=float, default=None,
                   help="WKV epsilon (default: --init's release name or file, else 1e-9)")
    g.add_argument("--k-clamp", default=None,
                   help="clamp of K before exp: a number or 'none' (default: the checkpoint's, 60 for --scratch)")

    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="training token file (.npy of ids)")
    g.add_argument("--allow-data-change", action="store_true",
                   help="resume on a --data file other than the one the checkpoint was trained on "
                        "(default: refused; the file is told by its size and hashed ends)")
    g.add_argument("--eval-data", default=None, help="held-out token file, evaluated every --eval-every steps")
    g.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default: --epoch-steps)")
    g.add_argument("--eval-windows", type=int, default=64,
                   help="consecutive windows from the start of --eval-data per evaluation (default 64)")
    g.add_argument("--ctx-len", type=int, default=d.ctx_len,
                   help=f"tokens per row T (default {d.ctx_len}); above the checkpoint's trains a longer context")
    g.add_argument("--seed", type=int, default=d.seed, help=f"data-order seed (default {d.seed})")

    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help=f"rows per micro-batch, all devices together (default {d.batch_size})")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, help=f"micro-batches per optimizer step (default {d.grad_accum})")
    g.add_argument("--epochs", type=int, default=d.epochs, help=f"mini-epochs (default {d.epochs})")
    g.add_argument("--epoch-steps", type=int, default=d.epoch_steps, help=f"optimizer steps per mini-epoch (default {d.epoch_steps})")
    g.add_argument("--lr-init", type=float, default=d.lr_init, help=f"learning rate after warm-up (default {d.lr_init:g})")
    g.add_argument("--lr-final", type=float, default=d.lr_final, help=f"learning rate at the last step (default {d.lr_final:g})")
    g.add_argument("--lr-schedule", choices=tr.SCHEDULES, default=d.lr_schedule, help=f"lr_init -> lr_final curve (default {d.lr_schedule})")
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warm-up steps from 0 (default 0)")
    g.add_argument("--beta1", type=float, default=d.beta1, help=f"Adam beta1 (default {d.beta1})")
    g.add_argument("--beta2", type=float, default=d.beta2, help=f"Adam beta2 (default {d.beta2})")
    g.add_argument("--adam-eps", type=float, default=d.adam_eps, help=f"Adam epsilon (default {d.adam_eps:g})")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help=f"global-norm gradient clipping (default {d.grad_clip})")
    g.add_argument("--dtype", choices=tr.DTYPES, default=d.dtype,
                   help="matmul compute dtype (default bfloat16); parameters, optimizer state, LayerNorm and WKV are float32")
    g.add_argument("--precision", choices=tr.PRECISIONS, default="default",
                   help="matmul precision (default: JAX's, TF32 for float32 on recent GPUs; 'highest': exact float32)")
    g.add_argument("--wkv-impl", choices=WKV_IMPLS, default=d.wkv_impl, help="WKV implementation (default auto: Pallas on GPU)")
    g.add_argument("--remat", action="store_true", help="recompute blocks in the backward pass: less memory, more compute "
                        "(the 430M model's bf16 step: half the memory at 0.77x the speed; docs/PERF.md)")
    g.add_argument("--max-bad-steps", type=int, default=10,
                   help="stop (exit 1) after this many steps in a row with a non-finite loss or gradient norm; "
                        "each is skipped, leaving parameters and optimizer state as they were (default 10)")

    g = p.add_argument_group("devices")
    g.add_argument("--data-parallel", type=int, default=None, help="data axis of the mesh (default: devices / fsdp)")
    g.add_argument("--fsdp", type=int, default=1, help="fsdp axis: shard parameters and optimizer state over this many devices (default 1)")
    g.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=True,
                   help="GPU: XLA's deterministic ops (--xla_gpu_deterministic_ops), so a step is a pure function "
                        "of (state, batch) and a resumed run is bit-exact (default on; they cost ~1%% of the bf16 step "
                        "of L24-D1024 on an H100, docs/PERF.md)")
    g.add_argument("--distributed", action="store_true",
                   help="multi-host: call jax.distributed.initialize() first; under Slurm, Open MPI or Kubernetes "
                        "it finds the coordinator itself, elsewhere give the three flags below")
    g.add_argument("--coordinator-address", default=None,
                   help="--distributed: host:port of process 0 (default: $JAX_COORDINATOR_ADDRESS or auto-detected)")
    g.add_argument("--num-processes", type=int, default=None, help="--distributed: number of processes (hosts)")
    g.add_argument("--process-id", type=int, default=None, help="--distributed: this process's index, 0 .. N-1")
    g.add_argument("--init-timeout", type=float, default=120.0,
                   help="--distributed: seconds to wait for every process to start (default 120); "
                        "then exit 1 naming the missing ones")

    g = p.add_argument_group("output")
    g.add_argument("--out-dir", required=True,
                   help="folder for checkpoints/, metrics.jsonl, loss.png and the exports (the same shared folder "
                        "on every host of a --distributed run)")
    g.add_argument("--save-every", type=int, default=None, help="steps between checkpoints (default: --epoch-steps); one is always written at the end")
    g.add_argument("--keep", type=int, default=3, help="checkpoints kept (default 3)")
    g.add_argument("--no-resume", action="store_true", help="refuse to start if OUT_DIR/checkpoints has checkpoints (default: resume from the latest)")
    g.add_argument("--stop-at-step", type=int, default=None,
                   help="stop after this step with a checkpoint, as if interrupted (e.g. a time-limited job); rerun to continue")
    g.add_argument("--export", choices=("both", "pth", "safetensors", "none"), default="both",
                   help="final model files: release .pth and/or native .safetensors (default both)")
    g.add_argument("--log-every", type=int, default=10,
                   help="steps between metric fetches, metrics.jsonl records and progress updates (default 10)")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress bar: a log line (step, loss, lr, tokens/s, ETA) every --log-every steps instead")
    args = p.parse_args(argv)

    for name in ("eval_every", "eval_windows", "save_every", "keep", "log_every", "fsdp", "data_parallel",
                 "stop_at_step", "max_bad_steps"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if not args.init_timeout > 0:
        p.error(f"--init-timeout must be > 0 seconds, got {args.init_timeout}")
    if args.init is None and not args.scratch:
        p.error("give --init CHECKPOINT or --scratch")
    if args.scratch and args.preset is None and (args.n_layer is None or args.n_embd is None):
        p.error("--scratch needs --preset or both --n-layer and --n-embd")
    if not args.scratch and (args.preset or args.n_layer or args.n_embd or args.ffn_pre):
        p.error("--preset/--n-layer/--n-embd/--ffn-pre only apply with --scratch")
    return args


def train_config(args) -> tr.TrainConfig:
    try:
        return tr.TrainConfig(
            ctx_len=args.ctx_len, batch_size=args.batch_size, grad_accum=args.grad_accum, epochs=args.epochs,
            epoch_steps=args.epoch_steps, lr_init=args.lr_init, lr_final=args.lr_final,
            lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps, beta1=args.beta1, beta2=args.beta2,
            adam_eps=args.adam_eps, grad_clip=args.grad_clip, dtype=args.dtype,
            precision=None if args.precision == "default" else args.precision, wkv_impl=args.wkv_impl,
            remat=args.remat, seed=args.seed,
        )
    except ValueError as err:
        raise UsageError(str(err)) from None


def _k_clamp(text):
    if text is None:
        return None
    if text.lower() == "none":
        return "none"
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"--k-clamp must be a number or 'none', got {text!r}") from None


def initial_model(args, cfg):
    """(RWKVConfig, numpy params) of the starting point: a checkpoint or the original initialisation."""
    clamp = _k_clamp(args.k_clamp)
    if args.scratch:
        base = PRESETS[args.preset] if args.preset else RWKVConfig(n_layer=args.n_layer, n_embd=args.n_embd)
        try:
            config = base.replace(
                n_layer=args.n_layer or base.n_layer, n_embd=args.n_embd or base.n_embd,
                vocab_size=args.vocab_size, ffn_pre=args.ffn_pre, ctx_len=cfg.ctx_len,
                k_eps=K_EPS if args.k_eps is None else args.k_eps,
                k_clamp=K_CLAMP if clamp is None else (None if clamp == "none" else clamp),
            )
        except ValueError as err:
            raise UsageError(str(err)) from None
        return config, tr.initial_params(config, seed=cfg.seed)
    path = Path(args.init)
    if not path.is_file():
        raise UsageError(f"--init checkpoint not found: {path}")
    kwargs = {"k_eps": args.k_eps, "ctx_len": cfg.ctx_len, "wkv_impl": "reference"}
    if clamp is not None:
        kwargs["k_clamp"] = None if clamp == "none" else clamp
    model = load_any(path, **kwargs)
    config = model.config.replace(ctx_len=cfg.ctx_len)
    return config, jax.tree.map(lambda x: jax.device_get(x).astype("float32"), model.params)


# --- processes ---------------------------------------------------------------------


def _set_xla_flags(args) -> None:
    flags = os.environ.get("XLA_FLAGS", "")
    if args.deterministic and "xla_gpu_deterministic_ops" not in flags:  # read when the backend starts
        os.environ["XLA_FLAGS"] = f"{flags} --xla_gpu_deterministic_ops=true".strip()


def start_processes(args) -> None:
    """--distributed: every process joins within --init-timeout, or all exit with one line."""
    if not args.distributed:
        if args.coordinator_address or args.num_processes is not None or args.process_id is not None:
            raise UsageError("--coordinator-address/--num-processes/--process-id need --distributed")
        return
    address = args.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if address and args.num_processes and args.num_processes > 1 and args.process_id is not None:
        wait_for_peers(address, args.num_processes, args.process_id, args.init_timeout)
    try:
        jax.distributed.initialize(coordinator_address=args.coordinator_address, num_processes=args.num_processes,
                                   process_id=args.process_id, initialization_timeout=math.ceil(args.init_timeout))
    except (RuntimeError, ValueError, TypeError) as err:
        raise UsageError(f"jax.distributed.initialize failed: {str(err).strip().splitlines()[0]}") from None


def wait_for_peers(address: str, n: int, process_id: int, timeout: float) -> None:
    """Meet every process at the coordinator's port before jax.distributed.initialize.

    JAX's own wait ends in a C++ abort (a page of stack trace) when a peer never starts;
    this meeting ends in one line naming who is missing. Process 0 listens on the port the
    coordinator takes next; the others connect, say who they are, and wait for "go".
    """
    host, _, port_text = address.rpartition(":")
    host = host.strip("[]")
    try:
        port = int(port_text)
    except ValueError:
        raise UsageError(f"--coordinator-address must be host:port, got {address!r}") from None
    if not 0 <= process_id < n:
        raise UsageError(f"--process-id {process_id} must be in [0, --num-processes {n})")
    deadline = time.monotonic() + timeout
    if process_id == 0:
        try:
            server = socket.create_server(("", port))
        except OSError as err:
            raise UsageError(f"cannot listen on the coordinator port {port}: {err.strerror or err}") from None
        peers = {}
        with server:
            while len(peers) < n - 1 and time.monotonic() < deadline:
                server.settimeout(max(deadline - time.monotonic(), 0.01))
                try:
                    conn, _ = server.accept()
                except socket.timeout:
                    break
                try:
                    conn.settimeout(5)
                    who = int(conn.recv(16).decode() or -1)
                except (OSError, ValueError):
                    conn.close()
                    continue
                if 0 < who < n and who not in peers:
                    peers[who] = conn
                else:
                    conn.close()
            ready = len(peers) == n - 1
            for conn in peers.values():
                try:
                    conn.sendall(b"go" if ready else b"no")
                    conn.recv(1)  # the peer closes first, so its side holds the TIME_WAIT, not our port
                except OSError:
                    pass
                conn.close()
        if not ready:
            missing = sorted(set(range(1, n)) - set(peers))
            raise TrainingFailed(f"--distributed: process(es) {', '.join(map(str, missing))} of {n} did not "
                                 f"connect to {address} within --init-timeout {timeout:g} s")
        return
    reply = b""
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=max(deadline - time.monotonic(), 0.01)) as conn:
                conn.sendall(str(process_id).encode())
                conn.settimeout(max(deadline - time.monotonic(), 0.01) + 5)
                reply = conn.recv(2)
            break
        except (ConnectionRefusedError, ConnectionResetError, socket.timeout):
            time.sleep(0.1)
        except OSError as err:
            raise TrainingFailed(f"--distributed: cannot reach the coordinator {address}: {err.strerror or err}") from None
    if reply != b"go":
        why = "process 0 gave up waiting for the other processes" if reply else "no answer from process 0"
        raise TrainingFailed(f"--distributed: {why} at {address} within --init-timeout {timeout:g} s")


def all_processes(ok: bool) -> np.ndarray:
    """Every process's `ok`, indexed by process (a collective: every process calls it)."""
    if jax.process_count() == 1:
        return np.array([ok])
    return np.asarray(multihost_utils.process_allgather(np.array([ok], np.int32))).reshape(-1).astype(bool)


def agree_on_failure(failure: Optional[Exception]) -> None:
    """Raise `failure` here, and a one-line error on every other process, if any process failed
    (so that no process goes on into a collective that the failed one never joins)."""
    ok = all_processes(failure is None)
    if failure is not None:
        raise failure
    if not ok.all():
        bad = ", ".join(str(i) for i in np.flatnonzero(~ok))
        raise UsageError(f"process(es) {bad} could not start; see their error lines")


def make_out_dir(args) -> Path:
    out_dir = Path(args.out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"cannot create --out-dir {out_dir}: {err.strerror or err}") from None
    return out_dir


def check_shared_out_dir(out_dir: Path) -> None:
    """Several processes: --out-dir must be one folder that every process sees."""
    if jax.process_count() == 1:
        return
    mine = np.frombuffer(os.urandom(4), np.uint32) if jax.process_index() == 0 else np.zeros(1, np.uint32)
    token = int(np.asarray(multihost_utils.broadcast_one_to_all(mine))[0])
    marker = out_dir / f".train-marker-{token:08x}"
    if jax.process_index() == 0:
        marker.write_text("written by process 0 to check that every process sees this folder\n")
    multihost_utils.sync_global_devices("rwkv2_jax out-dir marker written")
    seen = marker.exists()
    for _ in range(50):  # a network file system may show a new file a moment later
        if seen:
            break
        time.sleep(0.1)
        seen = marker.exists()
    ok = all_processes(seen)
    if jax.process_index() == 0:
        marker.unlink(missing_ok=True)
    if not ok.all():
        blind = [str(i) for i in np.flatnonzero(~ok)]
        if jax.process_index() == 0:
            raise UsageError(f"--out-dir {out_dir} is not the same folder on every process: process(es) "
                             f"{', '.join(blind)} do not see the file process 0 wrote there; give every "
                             "process one shared folder")
        raise UsageError(f"--out-dir {out_dir} on process {jax.process_index()} is not the folder process 0 "
                         "writes to (the file it wrote there is missing); give every process one shared folder")


def check_same_data(args) -> dict:
    """The --data file's identity, checked to be the same file on every process (each one
    draws every window and keeps its own rows, so they must read the same tokens)."""
    identity = file_identity(args.data)
    if jax.process_count() > 1:
        content = json.dumps({k: v for k, v in identity.items() if k != "path"}, sort_keys=True).encode()
        mine = np.frombuffer(hashlib.sha256(content).digest()[:4], np.uint32)
        every = np.asarray(multihost_utils.process_allgather(mine)).reshape(-1)
        differ = [str(i) for i in np.flatnonzero(every != every[0])]
        if differ:
            raise UsageError(f"--data {args.data} is not the same file on every process (process(es) "
                             f"{', '.join(differ)} differ from process 0); every process must read the same tokens")
    return identity


class StopSignal:
    """SIGTERM and SIGINT ask for a checkpoint at the end of the current step, then exit 75.

    One process: a handler sets a flag, read at each step boundary; a second signal
    interrupts at once. Several processes: JAX's preemption service (started by
    jax.distributed.initialize) catches SIGTERM on any host and picks a step every process
    reaches (multihost_utils.reached_preemption_sync_point); SIGINT is handed to it as SIGTERM.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, is_main: bool, start: int):
        self.multi = jax.process_count() > 1
        self.service = self.multi  # JAX's preemption service answers (off: signals are left alone)
        self.is_main, self.start = is_main, start
        self.received: Optional[int] = None
        self.early = False  # a notice before this run's first step
        self._previous = {}

    def __enter__(self):
        if self.multi:  # call 0 sets this run's counter (steps are counted from the start)
            self.early = self._sync_point(0)
        if threading.current_thread() is not threading.main_thread() or (self.multi and not self.service):
            return self  # Python delivers signals to the main thread only; leave them as they are
        handlers = {signal.SIGINT: self._to_sigterm} if self.multi else {s: self._flag for s in self.SIGNALS}
        for sig, handler in handlers.items():
            self._previous[sig] = signal.signal(sig, handler)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _flag(self, signum, frame):
        if self.received is not None:
            raise KeyboardInterrupt
        self.received = signum
        print(f"\n{PROG}: {signal.Signals(signum).name}: writing a checkpoint at the end of this step, then "
              "exiting (signal again to stop at once)", file=sys.stderr, flush=True)

    def _to_sigterm(self, signum, frame):
        self.received = signum
        os.kill(os.getpid(), signal.SIGTERM)

    def reached(self, step: int) -> bool:
        """Whether to checkpoint and stop after `step` (every process calls it every step)."""
        if not self.multi:
            return self.received is not None
        return self.service and (self._sync_point(step - self.start) or self.early)

    def _sync_point(self, call: int) -> bool:
        try:
            reached = multihost_utils.reached_preemption_sync_point(call)
        except RuntimeError as err:  # the service is off (jax_enable_preemption_service=False)
            if self.is_main:
                print(f"{PROG}: warning: no checkpoint on SIGTERM: {one_line(err)}", file=sys.stderr)
            self.service = False
            return False
        if reached:
            self.received = self.received or signal.SIGTERM
        return reached


# --- the run -----------------------------------------------------------------------


class Start(NamedTuple):
    """Where a run starts: its model, compiled steps, state and step, and its record."""

    model_config: RWKVConfig
    setup: tr.Setup
    state: tr.TrainState
    step: int
    record: dict


def run(args) -> int:
    _set_xla_flags(args)
    start_processes(args)
    failure = None
    try:
        cfg = train_config(args)
        check_inputs(args)
        mesh = make_mesh(args, cfg)
        out_dir = make_out_dir(args)
    except (UsageError, DataError) as err:
        failure = err
    agree_on_failure(failure)
    check_shared_out_dir(out_dir)
    data_identity = check_same_data(args)
    ckpts = TrainingCheckpoints(out_dir / "checkpoints", keep=args.keep)
    try:
        return train(args, cfg, mesh, ckpts, out_dir, data_identity)
    finally:
        ckpts.close()


def check_inputs(args) -> None:
    if not Path(args.data).is_file():
        raise UsageError(f"--data token file not found: {args.data}")
    if args.eval_data and not Path(args.eval_data).is_file():
        raise UsageError(f"--eval-data token file not found: {args.eval_data}")
    if args.export in ("both", "pth") and importlib.util.find_spec("torch") is None:
        raise UsageError("--export pth needs torch (pip install 'rwkv2-jax[torch]'); or pass --export safetensors")


def make_mesh(args, cfg):
    """The device mesh; a batch that cannot be split fails before any file is written."""
    try:
        mesh = shd.make_mesh(args.data_parallel, args.fsdp)
    except shd.ShardingError as err:
        raise UsageError(str(err)) from None
    bad = shd.batch_size_error(cfg.batch_size, mesh)
    if bad:
        raise UsageError(bad)
    return mesh


def train(args, cfg, mesh, ckpts: TrainingCheckpoints, out_dir: Path, data_identity: dict) -> int:
    is_main = jax.process_index() == 0
    start = resume_or_begin(args, cfg, mesh, ckpts, data_identity, is_main)
    data = TokenFile(args.data, start.model_config.vocab_size, cfg.ctx_len + 1, what="--data")
    sampler = WindowSampler(data.tokens, cfg.ctx_len, cfg.seed)
    eval_set = held_out_windows(args, cfg, start.model_config)
    total = cfg.total_steps
    stop = min(total, args.stop_at_step) if args.stop_at_step else total
    log = MetricsLog(out_dir / "metrics.jsonl", args, cfg, start.step, is_main)
    with StopSignal(is_main, start.step) as stop_signal:
        if is_main:  # from here on a signal means a checkpoint
            n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(start.setup.state_shape.params))
            print(f"{PROG}: L{start.model_config.n_layer}-D{start.model_config.n_embd} "
                  f"V={start.model_config.vocab_size} ({n_params / 1e6:.1f}M params), {len(data):,} tokens in "
                  f"{args.data}; mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}; "
                  f"{cfg.tokens_per_step:,} tokens/step, steps {start.step}..{stop} of {total}",
                  file=sys.stderr, flush=True)
        state, step = train_loop(args, cfg, start, sampler, eval_set, stop, ckpts, log, stop_signal)
    if stop_signal.received is not None and step < stop:
        if is_main:
            print(f"{PROG}: stopped by {signal.Signals(stop_signal.received).name} at step {step}; checkpoint "
                  f"{ckpts.step_directory(step)}; rerun the same command to continue (exit {EXIT_PREEMPTED})",
                  file=sys.stderr)
        return EXIT_PREEMPTED
    if step < total:
        if is_main:
            print(f"{PROG}: stopped at step {step} (--stop-at-step); checkpoint in {ckpts.step_directory(step)}; "
                  "rerun without --stop-at-step to continue", file=sys.stderr)
        return 0
    written = export(args, start.model_config, state, out_dir, log.path)
    if is_main:
        print(f"{PROG}: done ({total} steps); wrote {', '.join(str(w) for w in written)}", file=sys.stderr)
    return 0


def resume_or_begin(args, cfg, mesh, ckpts: TrainingCheckpoints, data_identity: dict, is_main: bool) -> Start:
    """The newest checkpoint that reads back whole, or --init / --scratch when there is none."""
    steps = ckpts.steps()
    if steps and args.no_resume:
        raise UsageError(f"{ckpts.directory} already holds checkpoints (latest step {steps[-1]}); "
                         "drop --no-resume to continue that run, or choose another --out-dir")
    if not steps:
        model_config, params = initial_model(args, cfg)
        setup = tr.setup(model_config, cfg, mesh)
        state = setup.init_state(params)
        if not inspect_state(state)[0]:
            raise UsageError(f"the starting weights ({args.init or '--scratch'}) hold non-finite values")
        record = make_record(model_config, cfg, data=data_identity, init=args.init)
        return Start(model_config, setup, state, 0, record)

    model_config = model_config_of(ckpts, steps)
    setup = tr.setup(model_config, cfg, mesh)

    def accept(step: int, record: dict) -> None:
        where = ckpts.step_directory(step)
        if record.get("model_config") != model_config.to_dict():
            raise TrainingCheckpointError(f"checkpoint {where} is of another model than the newer steps")
        diff = settings_mismatch(record, cfg)
        if diff:
            raise UsageError(f"cannot resume {ckpts.directory} (step {step}) with different settings: {diff}; "
                             "use the same flags or another --out-dir")
        changed = identity_mismatch(record.get("data", {}), data_identity)
        if changed and not args.allow_data_change:
            raise UsageError(f"--data {args.data} is not the file checkpoint {where} was trained on "
                             f"({record.get('data', {}).get('path')}): {changed}; pass --allow-data-change "
                             "to continue on this file")

    restored = ckpts.restore_newest(setup.state_shape, setup.state_shardings, accept)
    step = int(jax.device_get(restored.state.step))
    if step != restored.step:
        raise TrainingCheckpointError(f"checkpoint {ckpts.step_directory(restored.step)} holds step {step}")
    moved = ckpts.set_aside([s for s, _ in restored.rejected])
    if is_main:
        for (bad, why), where in zip(restored.rejected, moved):
            print(f"{PROG}: warning: {why}; resuming from {ckpts.step_directory(restored.step)} instead "
                  f"(step {bad} moved to {where})", file=sys.stderr)
        if identity_mismatch(restored.record.get("data", {}), data_identity):
            print(f"{PROG}: note: --allow-data-change: continuing on {args.data}, not on "
                  f"{restored.record['data'].get('path')}", file=sys.stderr)
        print(f"{PROG}: resuming from {ckpts.step_directory(step)} (step {step} of {cfg.total_steps})",
              file=sys.stderr)
    record = {**restored.record, "data": data_identity}
    return Start(model_config, setup, restored.state, step, record)


def model_config_of(ckpts: TrainingCheckpoints, steps) -> RWKVConfig:
    """The model of the newest step with a readable record (restore_newest checks the rest)."""
    for step in reversed(steps):
        try:
            return RWKVConfig.from_dict(ckpts.read_record(step)["model_config"])
        except (TrainingCheckpointError, KeyError, TypeError, ValueError):
            continue
    raise TrainingCheckpointError(f"no checkpoint in {ckpts.directory} has a readable record "
                                  f"(steps {', '.join(map(str, steps))})")


def held_out_windows(args, cfg, model_config) -> Optional[np.ndarray]:
    """--eval-data as [n_batches, B, T + 1] windows, or None."""
    if not args.eval_data:
        return None
    held = TokenFile(args.eval_data, model_config.vocab_size, cfg.ctx_len + 1, what="--eval-data")
    n = min(args.eval_windows, (len(held) - 1) // cfg.ctx_len) // cfg.batch_size * cfg.batch_size
    if n == 0:
        raise UsageError(f"--eval-data {args.eval_data} has {len(held)} tokens; one evaluation batch needs "
                         f"batch_size x ctx_len + 1 = {cfg.batch_size * cfg.ctx_len + 1}")
    return eval_windows(held.tokens, cfg.ctx_len, n).reshape(-1, cfg.batch_size, cfg.ctx_len + 1)


def train_loop(args, cfg, start: Start, sampler, eval_set, stop: int, ckpts: TrainingCheckpoints,
               log: "MetricsLog", stop_signal: StopSignal):
    """Steps start.step+1 .. stop, with checkpoints, evaluations and metrics; ends early on a
    stop signal (after a checkpoint at that step). Returns (state, last step done)."""
    setup, state, step = start.setup, start.state, start.step
    save_every = args.save_every or cfg.epoch_steps
    eval_every = args.eval_every or cfg.epoch_steps

    def save(step):
        if step not in ckpts.steps():  # a resumed run that stops where it started has it already
            ckpts.save(step, state, start.record)

    try:
        while step < stop:
            windows = setup.put_batch(sampler.batch(step, cfg.grad_accum, cfg.batch_size))
            state, metrics = setup.train_step(state, windows)
            step += 1
            log.add(step, metrics)
            if step == start.step + 1:
                jax.block_until_ready(metrics)
                log.compiled()  # rates and the ETA leave out the first step, which compiles
            stopping = stop_signal.reached(step)
            if step % args.log_every == 0 or step == stop or stopping:
                log.flush(step)
            if step % save_every == 0 or step == stop or stopping:
                save(step)
            if stopping:
                break
            if eval_set is not None and (step % eval_every == 0 or step == cfg.total_steps):
                log.flush(step)
                log.evaluation(step, evaluate(setup, state.params, eval_set, cfg))
            if step % cfg.epoch_steps == 0:
                log.note(f"mini-epoch {step // cfg.epoch_steps}/{cfg.epochs} done (step {step})")
        ckpts.wait()
    except KeyboardInterrupt:
        log.close()
        latest = ckpts.latest_step()
        print(f"{PROG}: interrupted at step {step}; rerun the same command to resume from the last "
              f"checkpoint (step {latest})", file=sys.stderr)
        raise
    finally:
        log.close()
    return state, step


def evaluate(setup: tr.Setup, params, eval_set: np.ndarray, cfg) -> float:
    """Mean held-out cross-entropy over every position of eval_set [n, B, T + 1]."""
    total_nll = 0.0
    for windows in eval_set:
        total_nll += float(setup.eval_step(params, shd.host_to_global(windows, setup.eval_sharding)))
    return total_nll / (eval_set.shape[0] * eval_set.shape[1] * cfg.ctx_len)


class MetricsLog:
    """Per-step metrics: fetched every --log-every steps (so steps run ahead of the host),
    written to metrics.jsonl, shown on the progress bar or as a log line (process 0), and
    the steps skipped in a row counted against --max-bad-steps."""

    def __init__(self, path: Path, args, cfg, start: int, is_main: bool):
        self.path, self.cfg, self.is_main = path, cfg, is_main
        self.total, self.start, self.max_bad = cfg.total_steps, start, args.max_bad_steps
        self.quiet_bar = args.no_progress or not is_main
        self.log_lines = args.no_progress and is_main
        self.pending = []  # (step, metrics on device) not yet fetched
        self.bad_run = 0  # steps skipped in a row
        self.bar = None
        self.t_mark, self.step_mark = None, start + 1  # rates count from the end of the first step
        self.t_first, self.seconds = None, 0.0  # training time since the first step, evaluations left out
        if is_main:
            truncate_metrics(path, start)

    def add(self, step: int, metrics) -> None:
        self.pending.append((step, metrics))
        if self.bar is not None:
            self.bar.update(1)

    def compiled(self) -> None:
        self.t_mark = self.t_first = time.perf_counter()
        self.bar = tqdm(total=self.total, initial=self.start + 1, unit="step", dynamic_ncols=True,
                        disable=self.quiet_bar)

    def flush(self, step: int) -> None:
        """Fetch, record and show the pending steps; stop the run after --max-bad-steps skips in a row."""
        if not self.pending:
            return
        fetched = jax.device_get([m for _, m in self.pending])
        steps = [s for s, _ in self.pending]
        self.pending = []
        now = time.perf_counter()
        rate = None
        if self.t_mark is not None and step > self.step_mark:
            self.seconds += now - self.t_mark
            rate = self.cfg.tokens_per_step * (step - self.step_mark) / (now - self.t_mark)
        if self.t_mark is not None:
            self.t_mark, self.step_mark = now, step
        records = []
        for s, m in zip(steps, fetched):
            skipped = bool(m["skipped"])
            self.bad_run = self.bad_run + 1 if skipped else 0
            records.append({"step": s, "loss": _finite_or_none(m["loss"]), "ppl": _ppl(m["loss"]),
                            "lr": float(m["lr"]), "grad_norm": _finite_or_none(m["grad_norm"]),
                            "skipped": skipped, "tokens": s * self.cfg.tokens_per_step, "tokens_per_s": rate})
            if self.bad_run >= self.max_bad:
                self._write(records)
                raise TrainingFailed(
                    f"step {s}: {self.bad_run} steps in a row had a non-finite loss or gradient norm (each skipped); "
                    "stopping (--max-bad-steps). The checkpoints hold finite states; try a lower --lr-init")
        self._write(records)
        last = records[-1]
        if self.is_main:
            shown = {"loss": "nan" if last["loss"] is None else f"{last['loss']:.4f}", "lr": f"{last['lr']:.2e}",
                     "tok_s": "-" if rate is None else f"{rate:,.0f}"}
            if self.bar is not None and not self.quiet_bar:
                self.bar.set_postfix(**shown, refresh=False)
            if self.log_lines:
                skipped = f" ({self.bad_run} skipped in a row)" if self.bad_run else ""
                print(f"step {step}/{self.total}  loss {shown['loss']}  lr {shown['lr']}  {shown['tok_s']} tok/s  "
                      f"ETA {self._eta(step)}{skipped}", file=sys.stderr, flush=True)

    def _eta(self, step: int) -> str:
        done = step - (self.start + 1)
        if done <= 0 or self.seconds <= 0:
            return "-"
        left = (self.total - step) * self.seconds / done
        return time.strftime("%H:%M:%S", time.gmtime(left)) if left < 86400 else f"{left / 86400:.1f} days"

    def _write(self, records) -> None:
        if self.is_main:
            with open(self.path, "a") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)

    def evaluation(self, step: int, loss: float) -> None:
        if self.is_main:
            self._write([{"step": step, "eval_loss": loss, "eval_ppl": _ppl(loss)}])
            self.note(f"step {step}: held-out loss {loss:.4f} (ppl {_ppl(loss):.2f})")
        self.t_mark = time.perf_counter()  # evaluation time stays out of the rates

    def note(self, text: str) -> None:
        if self.is_main:
            if self.bar is not None:
                self.bar.write(text, file=sys.stderr)
            else:
                print(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _finite_or_none(x) -> Optional[float]:
    x = float(x)
    return x if math.isfinite(x) else None


def _ppl(loss) -> Optional[float]:
    loss = float(loss)
    return math.exp(min(loss, 50.0)) if math.isfinite(loss) else None


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records past the resumed step (steps that ran after the last checkpoint)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= last_step]
    path.write_text("".join(line + "\n" for line in keep))


def export(args, model_config: RWKVConfig, state: tr.TrainState, out_dir: Path, metrics_path: Path):
    """The final model files (float32, release layout) and loss.png, written by process 0;
    every process fails together if they cannot be written."""
    if jax.process_count() > 1:
        params = multihost_utils.process_allgather(state.params, tiled=True)
    else:
        params = jax.device_get(state.params)
    written, failure = [], None
    if jax.process_index() == 0:
        arrays = formats.params_to_release(params, model_config)
        bad = next((k for k, v in arrays.items() if not np.isfinite(v).all()), None)
        if bad is not None:
            failure = f"the final parameters hold non-finite values ({bad}); nothing exported"
        try:
            if failure is None and args.export in ("both", "pth"):
                written.append(formats.write_pth(arrays, out_dir / "final.pth"))
            if failure is None and args.export in ("both", "safetensors"):
                written.append(formats.write_native(arrays, model_config, out_dir / "final.safetensors"))
            if failure is None and metrics_path.exists():
                plot_losses(metrics_path, out_dir / "loss.png")
                written.append(out_dir / "loss.png")
        except (formats.CheckpointError, OSError) as err:  # the writers' errors; OSError: loss.png's
            failure = f"cannot write the exports to --out-dir {out_dir}: {one_line(err)}"
    ok = all_processes(failure is None)
    if failure is not None:
        raise TrainingFailed(f"{failure}; the last checkpoint is in {out_dir / 'checkpoints'}")
    if not ok.all():
        raise TrainingFailed(f"process 0 could not write the exports to --out-dir {out_dir}")
    return written


def plot_losses(metrics_path: Path, out_png: Path) -> None:
    """Training loss per step (and held-out loss where present) from metrics.jsonl."""
    from matplotlib.figure import Figure  # imported here: loading matplotlib costs a second; no pyplot state

    steps, losses, eval_steps, eval_losses = [], [], [], []
    for line in metrics_path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("loss") is not None:
            steps.append(rec["step"])
            losses.append(rec["loss"])
        if "eval_loss" in rec:
            eval_steps.append(rec["step"])
            eval_losses.append(rec["eval_loss"])
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    ax.plot(steps, losses, lw=0.8, label="train loss")
    if eval_steps:
        ax.plot(eval_steps, eval_losses, "o-", label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (UsageError, DataError, ValueError) as err:  # ValueError: ShardingError, config checks
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except (TrainingFailed, TrainingCheckpointError, OSError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return EXIT_FAILED
    except jax.errors.JaxRuntimeError as err:  # e.g. a collective whose peer is gone
        print(f"{PROG}: error: {one_line(err)}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
