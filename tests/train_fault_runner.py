"""train.py with checkpoint writes that fail from a given step on, as a read-only or a full disk
makes them fail (tests run as root, for whom chmod stops no write):

    python -m tests.train_fault_runner {readonly,full} STEP TRAIN_ARGS...

readonly: creating the step's folder fails with EROFS, in the save call.
full: writing the step's JSON record fails with ENOSPC, on orbax's background commit thread,
after its arrays were written (a disk that fills up mid-save).
"""

from __future__ import annotations

import errno
import re
import sys

from orbax.checkpoint._src.handlers import json_checkpoint_handler
from orbax.checkpoint._src.path import async_path

from rwkv2_jax.cli import train

_STEP = re.compile(r"/(\d+)\.orbax-checkpoint-tmp")


def _step_of(path) -> int:
    match = _STEP.search(str(path))
    return int(match.group(1)) if match else -1


def install(mode: str, from_step: int, patch=None) -> None:
    """Make checkpoint writes of steps >= from_step fail; `patch(obj, name, value)` (pytest's
    monkeypatch.setattr in-process, plain setattr here)."""
    patch = patch or setattr
    if mode == "readonly":
        real_mkdir = async_path.mkdir

        async def mkdir(path, *args, **kwargs):
            if _step_of(path) >= from_step:
                raise OSError(errno.EROFS, "Read-only file system", str(path))
            return await real_mkdir(path, *args, **kwargs)

        patch(async_path, "mkdir", mkdir)
    elif mode == "full":
        handler = json_checkpoint_handler.JsonCheckpointHandler
        real_save = handler._save_fn

        async def save_fn(self, x, directory):
            if _step_of(directory) >= from_step:
                raise OSError(errno.ENOSPC, "No space left on device", str(directory))
            return await real_save(self, x, directory)

        patch(handler, "_save_fn", save_fn)
    else:
        raise ValueError(f"mode must be readonly or full, got {mode!r}")


if __name__ == "__main__":
    install(sys.argv[1], int(sys.argv[2]))
    sys.exit(train.main(sys.argv[3:]))
