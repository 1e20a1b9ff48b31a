"""Text <-> token ids: a thin layer over a `tokenizers.Tokenizer` JSON file.

    import rwkv2_jax as rw
    tokenizer = rw.load_tokenizer("20B_tokenizer.json")     # or its folder, or a checkpoint beside it
    ids = tokenizer.encode("In a shocking finding,")        # -> list of ints
    text = tokenizer.decode(ids)

The releases use GPT-NeoX's "20B" BPE tokenizer (`20B_tokenizer.json`, 50,277 tokens);
`find_tokenizer` looks for it, or for a `tokenizer.json` (the demo's), next to a checkpoint.
`decode_stream` turns ids into text one id at a time with `tokenizers`' own DecodeStream,
so a character whose UTF-8 bytes span several tokens comes out whole, once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, List, Optional, Union

import tokenizers
from tokenizers.decoders import DecodeStream

# Looked for, in this order, in a folder or next to a checkpoint.
TOKENIZER_NAMES = ("20B_tokenizer.json", "tokenizer.json")
END_OF_TEXT = "<|endoftext|>"


class TokenizerError(ValueError):
    """A tokenizer that cannot be found, read, or used with a model; the message names the path."""


class Tokenizer:
    """A `tokenizers.Tokenizer` with plain-list methods: `encode(text) -> [ids]`, `decode(ids) -> text`.

    `backend` is the wrapped `tokenizers.Tokenizer`, for anything else it offers.
    """

    def __init__(self, backend: tokenizers.Tokenizer, path: Optional[Path] = None):
        if not isinstance(backend, tokenizers.Tokenizer):
            raise TypeError(f"expected a tokenizers.Tokenizer, got {type(backend).__name__}")
        self.backend = backend
        self.path = None if path is None else Path(path)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""
        return self.backend.get_vocab_size()

    def encode(self, text: str) -> List[int]:
        """The ids of `text` (no special tokens added)."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__}")
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Iterable[str]) -> List[List[int]]:
        """encode() of each text, tokenized in parallel."""
        texts = list(texts)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"encode_batch takes strs, got {type(text).__name__} at index {i}")
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], *, skip_special_tokens: bool = True) -> str:
        """The text of `ids` (special tokens such as <|endoftext|> left out unless asked for)."""
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def decode_stream(self, *, skip_special_tokens: bool = True) -> "TextStream":
        """An incremental decoder: `push(id)` returns the text that id completes ('' if none yet)."""
        return TextStream(self, skip_special_tokens)

    def token_to_id(self, token: str) -> Optional[int]:
        return self.backend.token_to_id(token)

    def check_fits(self, vocab_size: int) -> "Tokenizer":
        """Raise TokenizerError when this tokenizer has ids a model of `vocab_size` lacks."""
        if self.vocab_size > vocab_size:
            name = f"tokenizer {self.path}" if self.path else "the tokenizer"
            raise TokenizerError(f"{name} has {self.vocab_size} tokens but the model only {vocab_size}: "
                                 "wrong tokenizer for this model?")
        return self

    def __repr__(self) -> str:
        where = f", path={str(self.path)!r}" if self.path else ""
        return f"Tokenizer(vocab_size={self.vocab_size}{where})"


class TextStream:
    """Text of a growing id sequence, piece by piece (`tokenizers.decoders.DecodeStream`).

    A piece never ends inside a character. The pieces of `push`, then `flush`, joined
    equal `tokenizer.decode(ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self._tokenizer, self._skip = tokenizer, skip_special_tokens
        self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._ids: List[int] = []
        self._text_len = 0  # characters returned so far

    def push(self, token: int) -> str:
        """The text that `token` completes ('' while a character still waits for its last bytes)."""
        self._ids.append(int(token))
        piece = self._stream.step(self._tokenizer.backend, int(token)) or ""
        self._text_len += len(piece)
        return piece

    def flush(self) -> str:
        """At the end: what is still held back (an unfinished character, as decode shows it: U+FFFD)."""
        text = self._tokenizer.decode(self._ids, skip_special_tokens=self._skip)
        tail, self._text_len = text[self._text_len:], len(text)
        return tail


def find_tokenizer(checkpoint) -> Path:
    """The tokenizer next to a checkpoint (or in a folder): the first of TOKENIZER_NAMES there."""
    checkpoint = Path(checkpoint)
    folder = checkpoint if checkpoint.is_dir() else checkpoint.parent
    for name in TOKENIZER_NAMES:
        if (folder / name).is_file():
            return folder / name
    raise TokenizerError(f"tokenizer not found next to {checkpoint}: looked for {' and '.join(TOKENIZER_NAMES)} "
                         f"in {folder}")


CHECKPOINT_SUFFIXES = (".pth", ".safetensors")


def tokenizer_file(path) -> Path:
    """The file `load_tokenizer(path)` reads, found without reading it."""
    path = Path(path)
    if path.is_dir() or path.suffix in CHECKPOINT_SUFFIXES:
        path = find_tokenizer(path)
    if not path.is_file():
        raise TokenizerError(f"tokenizer not found: {path}")
    return path


def load_tokenizer(path) -> Tokenizer:
    """A tokenizer JSON file; or, given a folder or a checkpoint (.pth, .safetensors), the
    tokenizer in that folder or next to that checkpoint (see `find_tokenizer`)."""
    path = tokenizer_file(path)
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as err:  # the Rust loader raises plain Exceptions with a serde message
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise TokenizerError(f"cannot read tokenizer {path}: {msg}") from None
    return Tokenizer(backend, path)


def as_tokenizer(tokenizer: Union[Tokenizer, tokenizers.Tokenizer, str, Path]) -> Tokenizer:
    """A Tokenizer from a Tokenizer, a `tokenizers.Tokenizer`, or a path (see `load_tokenizer`)."""
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    if isinstance(tokenizer, tokenizers.Tokenizer):
        return Tokenizer(tokenizer)
    if isinstance(tokenizer, (str, Path)):
        return load_tokenizer(tokenizer)
    raise TypeError(f"expected a Tokenizer, a tokenizers.Tokenizer or a path, got {type(tokenizer).__name__}")
