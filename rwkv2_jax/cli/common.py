"""What every command line shares: the one-line usage error, the tokenizer lookup, a fresh seed."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Optional

from rwkv2_jax.tokenizer import TOKENIZER_NAMES, Tokenizer, TokenizerError, find_tokenizer, load_tokenizer

TOKENIZER_HELP = (f"tokenizer JSON (default: {' or '.join(TOKENIZER_NAMES)} next to the checkpoint)")


class UsageError(Exception):
    """Bad input: printed as one line, exit status 2."""


def tokenizer_for(path_arg: Optional[str], checkpoint) -> Tokenizer:
    """The tokenizer of --tokenizer, else the one next to the checkpoint; UsageError when absent or unreadable."""
    try:
        path = Path(path_arg) if path_arg else find_tokenizer(checkpoint)
        if path_arg and not path.is_file():
            raise TokenizerError(f"tokenizer not found: --tokenizer {path}")
        return load_tokenizer(path)
    except TokenizerError as err:
        hint = "" if path_arg else f"; pass --tokenizer PATH/{TOKENIZER_NAMES[0]}"
        raise UsageError(f"{err}{hint}") from None


def random_seed() -> int:
    """A fresh seed in [0, 2**31) for a run the user can replay by passing it back."""
    return secrets.randbelow(1 << 31)
