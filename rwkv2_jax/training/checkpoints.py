"""Training checkpoints: the orbax folder a run resumes from.

A training checkpoint holds a whole `TrainState` (parameters, optimizer state, step counters)
plus a JSON record: the model and train configs, the data file's identity and a fingerprint
of every array. Release weights (`.pth`, `.safetensors`) are another thing: rwkv2_jax.formats.

A step is written only when every array is finite, and read back only when every array
matches its fingerprint and is finite; `TrainingCheckpoints.restore_newest` falls back to
the previous step otherwise, and sets the bad one aside (never deletes it). A failed save
raises at once with the folder's name and leaves no orbax thread waiting.
"""

from __future__ import annotations

import logging
import shutil
import sys
from pathlib import Path
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from rwkv2_jax.config import RWKVConfig
from rwkv2_jax.training.trainer import RESUME_FIELDS, TrainConfig, TrainState

# Version of the JSON record; a record of another version is not resumed.
RECORD_FORMAT = 1


class TrainingCheckpointError(RuntimeError):
    """A training checkpoint that cannot be written or read; the message names the folder."""


def one_line(err: BaseException) -> str:
    """The first line of an exception's message (orbax and tensorstore errors run long)."""
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


# --- fingerprints ----------------------------------------------------------------------


def _mix32(x: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: a bijection of uint32 in which every input bit moves
    about half of the output bits."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def _fingerprint(x: jax.Array) -> jax.Array:
    """uint32 fingerprint of an array's bits and positions.

    A sum modulo 2**32 of one mixed word per element: the same whatever the mesh or the
    number of hosts (integer addition is exact in any order), computed where the shards
    live (no gather), and any change to one element changes it.
    """
    if x.dtype.itemsize != 4:
        x = x.astype(jnp.float32) if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.int32)
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    position = jnp.arange(x.size, dtype=jnp.uint32).reshape(x.shape)
    return jnp.sum(_mix32(bits ^ _mix32(position + jnp.uint32(0x9E3779B9))), dtype=jnp.uint32)


@jax.jit
def _digest(state) -> Tuple[jax.Array, list]:
    finite = jnp.array(True)
    for x in jax.tree.leaves(state):
        if jnp.issubdtype(x.dtype, jnp.floating):
            finite = finite & jnp.all(jnp.isfinite(x))
    return finite, [_fingerprint(x) for x in jax.tree.leaves(state)]


def inspect_state(state: TrainState) -> Tuple[bool, Dict[str, str]]:
    """(every float array finite?, {leaf path: fingerprint hex}) of a state on any mesh."""
    finite, prints = jax.device_get(_digest(state))
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    return bool(finite), {p: f"{int(v):08x}" for p, v in zip(paths, prints)}


# --- the JSON record -----------------------------------------------------------------


def make_record(model_config: RWKVConfig, cfg: TrainConfig, *, data: dict, init: Optional[str]) -> dict:
    """The record of a run (its fingerprints are added per checkpoint by `save`)."""
    return {"format": RECORD_FORMAT, "model_config": model_config.to_dict(), "train_config": cfg.to_dict(),
            "data": data, "init": init}


def settings_mismatch(record: dict, cfg: TrainConfig) -> Optional[str]:
    """The first trajectory field where a checkpoint's TrainConfig differs from `cfg`."""
    saved = record.get("train_config", {})
    for name in RESUME_FIELDS:
        if name in saved and saved[name] != getattr(cfg, name):
            return f"{name}={saved[name]!r} in the checkpoint, {getattr(cfg, name)!r} now"
    return None


class Restored(NamedTuple):
    """What `restore_newest` found: the step, its state and record, and the newer steps that
    failed, as (step, reason) from the newest down."""

    step: int
    state: TrainState
    record: dict
    rejected: List[Tuple[int, str]]


# --- the folder ----------------------------------------------------------------------


class TrainingCheckpoints:
    """An orbax CheckpointManager over `directory`: async saves, the last `keep` kept.

    Each step folder holds the TrainState ("state") and the JSON record ("meta"). Steps are
    deleted only by orbax's keep-last-k rotation, after a newer step was written whole.
    Every method is called by every process of a multi-process run.
    """

    def __init__(self, directory, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        self.rejected_directory = self.directory.with_name(self.directory.name + "-rejected")
        self._pending: Optional[int] = None  # the step whose async save may still be running
        if self.directory.exists() and not self.directory.is_dir():
            raise TrainingCheckpointError(f"checkpoint path {self.directory} exists and is not a folder")
        try:
            self.manager = _CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
                    cleanup_tmp_directories=True,  # a save cut short (SIGKILL, full disk) leaves one
                    # Step folders are created in save() itself: created on a background thread,
                    # a failure there leaves the other writer threads waiting 20 minutes for it.
                    async_options=ocp.AsyncOptions(create_directories_asynchronously=False),
                ),
            )
        except Exception as err:
            raise TrainingCheckpointError(f"cannot open checkpoint folder {self.directory}: {one_line(err)}") from None
        # orbax logs each failed write with a traceback per thread; the error raised names it in one line.
        logging.getLogger("absl").addFilter(_DropErrorsAbout(self.directory))

    def steps(self) -> List[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def step_directory(self, step: int) -> Path:
        return self.directory / str(step)

    # --- writing ---

    def save(self, step: int, state: TrainState, record: dict) -> None:
        """Start writing `state` as `step` (async); raise if it or the previous save fails.

        Refuses a state with a non-finite array: nothing is written, nothing rotated away.
        """
        self.wait()
        finite, prints = inspect_state(state)
        if not finite:
            raise TrainingCheckpointError(
                f"step {step}: the training state holds non-finite values; not written to "
                f"{self.step_directory(step)} (the checkpoints there are kept)")
        try:
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                meta=ocp.args.JsonSave({**record, "step": step, "fingerprints": prints})), force=True)
        except Exception as err:
            self._abandon()
            raise TrainingCheckpointError(
                f"cannot write checkpoint {self.step_directory(step)}: {one_line(err)}") from None
        self._pending = step

    def wait(self) -> None:
        """Block until the async save in flight is on disk; raise if it failed."""
        if self._pending is None:
            return
        step, self._pending = self._pending, None
        try:
            self.manager.wait_until_finished()
        except Exception as err:
            self._abandon()
            raise TrainingCheckpointError(
                f"cannot write checkpoint {self.step_directory(step)}: {one_line(err)}") from None

    def _abandon(self) -> None:
        """After a failed save: collect orbax's errors so that close() does not raise them again."""
        try:
            self.manager.check_for_errors()
        except Exception:
            pass

    def close(self) -> None:
        """Finish or fail the save in flight, then stop orbax's threads. Never raises."""
        try:
            self.manager.wait_until_finished()
        except Exception:
            pass
        try:
            self.manager.close()
        except Exception:
            pass

    # --- reading ---

    def read_record(self, step: int) -> dict:
        try:
            record = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta
        except Exception as err:
            _silence_failed_restore(self.step_directory(step))
            raise TrainingCheckpointError(
                f"cannot read checkpoint {self.step_directory(step)}: {one_line(err)}") from None
        if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
            raise TrainingCheckpointError(f"checkpoint {self.step_directory(step)}: its record is not of format "
                                          f"{RECORD_FORMAT} (written by another version)")
        return dict(record)

    def restore(self, step: int, record: dict, target: TrainState, shardings) -> TrainState:
        """The state of `step`, placed with `shardings`, checked against the record's
        fingerprints and for finiteness; `target` gives structure, shapes and dtypes."""
        where = self.step_directory(step)
        abstract = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), target, shardings)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract))).state
            leaves = jax.tree.leaves(restored)
            treedef = jax.tree.structure(abstract)
            if len(leaves) != treedef.num_leaves:
                raise ValueError(f"{len(leaves)} arrays stored, {treedef.num_leaves} expected")
            for got, want in zip(leaves, jax.tree.leaves(abstract)):
                if got.shape != want.shape or got.dtype != want.dtype:
                    raise ValueError(f"array {got.shape} {got.dtype} stored where {want.shape} "
                                     f"{want.dtype} is expected")
        except Exception as err:
            _silence_failed_restore(where)
            raise TrainingCheckpointError(f"cannot restore checkpoint {where}: {one_line(err)}") from None
        state = jax.tree.unflatten(treedef, leaves)  # optax NamedTuples come back as tuples
        finite, prints = inspect_state(state)
        saved = record.get("fingerprints", {})
        bad = [path for path, value in prints.items() if saved.get(path) != value]
        if bad:
            raise TrainingCheckpointError(
                f"checkpoint {where}: {len(bad)} of {len(prints)} arrays do not match the fingerprints "
                f"written with them (first: {bad[0]})")
        if not finite:
            raise TrainingCheckpointError(f"checkpoint {where} holds non-finite values")
        return state

    def restore_newest(self, target: TrainState, shardings,
                       accept: Callable[[int, dict], None] = lambda step, record: None) -> Optional[Restored]:
        """The newest step whose record and arrays read back whole; None if there are no steps.

        `accept(step, record)` sees each readable record before its arrays are read; what it
        raises propagates (a run with other settings, say), and nothing is moved. Raises
        TrainingCheckpointError when no step can be restored (nothing is moved then either).
        """
        rejected: List[Tuple[int, str]] = []
        for step in reversed(self.steps()):
            try:
                record = self.read_record(step)
                accept(step, record)
                state = self.restore(step, record, target, shardings)
            except TrainingCheckpointError as err:
                rejected.append((step, str(err)))
                continue
            return Restored(step, state, record, rejected)
        if rejected:
            raise TrainingCheckpointError(
                f"no checkpoint in {self.directory} can be resumed (steps {', '.join(str(s) for s, _ in rejected)}); "
                f"newest: {rejected[0][1]}")
        return None

    def set_aside(self, steps) -> List[Path]:
        """Move step folders out of the way (to `<directory>-rejected/`) so that training can
        write those steps again; returns where each went. Process 0 moves, all wait."""
        moved = []
        for step in steps:
            target = self.rejected_directory / str(step)
            n = 1
            while target.exists():
                target = self.rejected_directory / f"{step}.{n}"
                n += 1
            moved.append(target)
            if jax.process_index() == 0:
                self.rejected_directory.mkdir(parents=True, exist_ok=True)
                shutil.move(str(self.step_directory(step)), str(target))
        if jax.process_count() > 1:
            multihost_utils.sync_global_devices(f"rwkv2_jax set aside {sorted(steps)}")
        self.manager.reload()
        return moved


class _CheckpointManager(ocp.CheckpointManager):
    """orbax's manager, leaving JAX's preemption sync points to the training loop.

    orbax asks JAX's preemption service about the step it saves, from its save threads too;
    each call moves the per-process step counter from which the service picks the step
    every process stops at, which the loop's own once-per-step calls rely on.
    """

    def reached_preemption(self, step: int) -> bool:
        return False


class _DropErrorsAbout(logging.Filter):
    """Drop error records that mention `folder` (and keep everything else)."""

    def __init__(self, folder: Path):
        super().__init__()
        self.folder = str(folder)

    def filter(self, record):
        return record.levelno < logging.ERROR or self.folder not in record.getMessage()


def _silence_failed_restore(folder: Path) -> None:
    """Drop the noise a failed orbax restore leaves behind, and only that noise.

    Its pending tensorstore reads complete later, on other threads, into an event loop
    orbax has closed ("Event loop is closed", reported through sys.unraisablehook) and as
    asyncio futures nobody awaits ("Future exception was never retrieved", logged with the
    checkpoint's path). The one-line error we raise already says what failed.
    """

    class _Filter(logging.Filter):
        def filter(self, record):
            return str(folder) not in record.getMessage()

    logging.getLogger("asyncio").addFilter(_Filter())
    previous = sys.unraisablehook
    if getattr(previous, "_rwkv2_jax_quiet", False):
        return

    def hook(unraisable):
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        previous(unraisable)

    hook._rwkv2_jax_quiet = True
    sys.unraisablehook = hook
