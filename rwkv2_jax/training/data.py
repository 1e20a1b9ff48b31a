"""Training data: text -> token file (.npy), and seeded random windows read memory-mapped.

The original recipe: tokenize a `.txt` with the 20B tokenizer into a `.npy` of uint16
ids, then train on random windows of `ctx_len + 1` tokens ("mini-epochs" of a fixed
number of samples). Here:

* `tokenize_to_npy` streams `.txt` files, folders of them, or `.jsonl` (one JSON object
  per line with a text field) into a `.npy` without holding the text or the ids in RAM.
  Text is cut into chunks only where the 20B BPE cannot merge across the cut (see
  `safe_split`), so the ids equal those of tokenizing each document in one piece.
* `TokenFile` opens a token file memory-mapped and checks it (ids < V, long enough).
* `WindowSampler` draws the windows of optimizer step `s` from `(seed, s)` alone, so a
  resumed run reads exactly the batches an uninterrupted run reads.
* `file_identity` says whether a resumed run reads the same file (size and hashed ends).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

# Characters of text handed to the tokenizer at a time (the cut lands at the last safe
# boundary before this): each token of an Encoding costs ~100 bytes, so this bounds memory
# (~220 MB with the 20B tokenizer) while keeping each call large enough to be fast.
CHUNK_CHARS = 1 << 16
# Text per encode_batch call, in chunks (the tokenizer spreads a batch over its threads).
CHUNKS_PER_BATCH = 8
# Token ids scanned per step when checking a token file (uint16: 128 MiB).
SCAN_TOKENS = 1 << 26
END_OF_TEXT = "<|endoftext|>"
# Bytes hashed at each end of a token file to tell it from another file of the same size.
IDENTITY_BYTES = 1 << 20
# .npy header of a streamed file: a fixed size, so the final length can be written in place.
_NPY_HEADER_BYTES = 128


class DataError(ValueError):
    """Bad training data; the message names the file (and the line or position)."""


# --- text -> tokens -------------------------------------------------------------------


def safe_split(text: str, limit: int) -> int:
    """The largest cut `i <= limit` where tokenizing text[:i] and text[i:] apart equals tokenizing text.

    The 20B tokenizer (NFC, then GPT-2 byte-level pre-tokenization, then BPE within
    pre-tokens) never joins a non-space character to a following " X" or "\\nX" where X is
    not whitespace: the pre-tokenizer starts a new piece at that single space / newline.
    Runs of whitespace are *not* safe (their split depends on what follows), so we cut only
    between `text[i-1]` (not whitespace) and `text[i]` in (" ", "\\n") followed by a
    non-space. Returns 0 when there is no such cut.
    """
    i = min(limit, len(text) - 2)
    while i > 0:
        j = max(text.rfind(" ", 0, i + 1), text.rfind("\n", 0, i + 1))
        if j <= 0:
            return 0
        if j + 1 < len(text) and not text[j - 1].isspace() and not text[j + 1].isspace():
            return j
        i = j - 1
    return 0


def _chunks(read, chunk_chars: int) -> Iterator[str]:
    """Pieces of one document, cut only at safe boundaries. `read(n)` returns text ('' at the end)."""
    buf = ""
    while True:
        piece = read(chunk_chars)
        buf += piece
        if not piece:
            break
        while len(buf) >= chunk_chars:
            cut = safe_split(buf, chunk_chars)
            if cut == 0:  # no safe cut yet (one very long "word"): read more
                break
            yield buf[:cut]
            buf = buf[cut:]
    if buf:
        yield buf


class _Source(NamedTuple):
    path: Path
    kind: str  # "txt" | "jsonl"


def _sources(path: Path) -> List[_Source]:
    if not path.exists():
        raise DataError(f"input not found: {path}")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".txt", ".jsonl"))
        if not files:
            raise DataError(f"folder {path} holds no .txt or .jsonl files")
        return [_Source(p, p.suffix[1:]) for p in files]
    return [_Source(path, "jsonl" if path.suffix == ".jsonl" else "txt")]


def _documents(src: _Source, text_field: str, chunk_chars: int, progress) -> Iterator[Iterator[str]]:
    """Yield each document of one file as an iterator of its chunks."""
    raw = open(src.path, "rb")
    try:
        f = io.TextIOWrapper(raw, encoding="utf-8")  # universal newlines, as open(...).read()
        last = 0

        def tick():
            nonlocal last
            pos = raw.tell()
            progress.update(pos - last)
            last = pos

        try:
            if src.kind == "txt":
                def read(n):  # runs lazily, as the chunks are consumed
                    try:
                        s = f.read(n)
                    except UnicodeDecodeError as err:
                        raise DataError(f"{src.path}: not UTF-8 text near byte {raw.tell()}: {err.reason}") from None
                    tick()
                    return s

                yield _chunks(read, chunk_chars)
            else:
                for lineno, line in enumerate(f, 1):
                    tick()
                    if not line.strip():
                        continue
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise DataError(f"{src.path}:{lineno}: not JSON ({err.msg})") from None
                    text = obj.get(text_field) if isinstance(obj, dict) else None
                    if not isinstance(text, str):
                        raise DataError(
                            f"{src.path}:{lineno}: no string field {text_field!r} "
                            f"(keys: {sorted(obj) if isinstance(obj, dict) else type(obj).__name__})"
                        )
                    yield _chunks(io.StringIO(text).read, chunk_chars)
        except UnicodeDecodeError as err:
            raise DataError(f"{src.path}: not UTF-8 text near byte {raw.tell()}: {err.reason}") from None
        tick()
    finally:
        raw.close()


def _npy_header(dtype: np.dtype, n: int) -> bytes:
    """A version-1.0 .npy header for a 1-D array of n items, padded to a fixed size."""
    d = f"{{'descr': '{np.dtype(dtype).str}', 'fortran_order': False, 'shape': ({n},), }}"
    body_len = _NPY_HEADER_BYTES - 10  # magic (6) + version (2) + header length (2)
    if len(d) + 1 > body_len:
        raise ValueError(f"token count {n} too large for the .npy header")
    return b"\x93NUMPY\x01\x00" + body_len.to_bytes(2, "little") + (d.ljust(body_len - 1) + "\n").encode()


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 as the original when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class PrepareResult(NamedTuple):
    path: Path
    n_tokens: int
    n_documents: int
    dtype: np.dtype


def tokenize_to_npy(
    inputs: Sequence,
    out_path,
    tokenizer,
    *,
    text_field: str = "text",
    separator: Optional[str] = END_OF_TEXT,
    chunk_chars: int = CHUNK_CHARS,
    progress: bool = True,
) -> PrepareResult:
    """Tokenize .txt files, folders of them and .jsonl files into one `.npy` token file.

    Args:
      inputs: paths; a folder contributes its .txt/.jsonl files (recursively, sorted).
      out_path: the `.npy` to write (written as `<out>.tmp`, renamed when complete).
      tokenizer: a `tokenizers.Tokenizer` (the 20B tokenizer for the releases).
      text_field: the field of each .jsonl object that holds its text.
      separator: a token placed *between* documents (each .txt file and each .jsonl line
        is one document); None for none. A single .txt is one document, as the original.
      chunk_chars: text handed to the tokenizer at a time.
    """
    sources = [s for p in inputs for s in _sources(Path(p))]
    out_path = Path(out_path)
    if not out_path.parent.exists():
        raise DataError(f"output folder does not exist: {out_path.parent}")
    vocab_size = tokenizer.get_vocab_size()
    dtype = token_dtype(vocab_size)
    sep_ids: List[int] = []
    if separator is not None and (len(sources) > 1 or sources[0].kind == "jsonl"):
        sep = tokenizer.token_to_id(separator)
        if sep is None:
            raise DataError(f"the tokenizer has no token {separator!r} to separate documents "
                            "(choose another separator, or none)")
        sep_ids = [sep]
    total = sum(s.path.stat().st_size for s in sources)
    tmp = out_path.with_name(out_path.name + ".tmp")
    n_tokens = n_docs = 0
    with open(tmp, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc="tokenize",
                                      disable=not progress) as bar:
        out.write(_npy_header(dtype, 0))

        pending: List = []  # in file order: text pieces (str) and separators (list of ids)
        pending_chars = 0

        def flush():
            nonlocal n_tokens, pending_chars
            encodings = iter(tokenizer.encode_batch([p for p in pending if isinstance(p, str)],
                                                    add_special_tokens=False))
            for p in pending:
                ids = np.asarray(next(encodings).ids if isinstance(p, str) else p, dtype=np.int64)
                out.write(ids.astype(dtype).tobytes())
                n_tokens += ids.size
            pending.clear()
            pending_chars = 0
            bar.set_postfix(tokens=f"{n_tokens:,}", refresh=False)

        try:
            for src in sources:
                for doc in _documents(src, text_field, chunk_chars, bar):
                    if n_docs and sep_ids:
                        pending.append(sep_ids)
                    n_docs += 1
                    for piece in doc:
                        pending.append(piece)
                        pending_chars += len(piece)
                        if pending_chars >= chunk_chars * CHUNKS_PER_BATCH:
                            flush()
            flush()
            out.seek(0)
            out.write(_npy_header(dtype, n_tokens))
        except BaseException:
            out.close()
            tmp.unlink(missing_ok=True)
            raise
    os.replace(tmp, out_path)
    return PrepareResult(out_path, n_tokens, n_docs, dtype)


def verify_token_file(path, tokenizer, *, n: int = 64) -> dict:
    """Read a token file back: its length, dtype, largest id, and the decoded head and tail."""
    tokens = load_tokens(path)
    max_id = max((int(tokens[i:i + SCAN_TOKENS].max()) for i in range(0, tokens.size, SCAN_TOKENS)), default=-1)
    return {
        "path": str(path),
        "n_tokens": int(tokens.size),
        "dtype": str(tokens.dtype),
        "max_id": max_id,
        "first_out_of_range": _first_out_of_range(tokens, tokenizer.get_vocab_size()),
        "head": tokenizer.decode([int(t) for t in tokens[:n]], skip_special_tokens=False),
        "tail": tokenizer.decode([int(t) for t in tokens[-n:]], skip_special_tokens=False),
    }


# --- reading tokens ------------------------------------------------------------------


def load_tokens(path) -> np.ndarray:
    """A token file as a read-only memory-mapped 1-D integer array."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"token file not found: {path}")
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as err:
        msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise DataError(f"cannot read {path} as a .npy token file: {msg}") from None
    if not isinstance(tokens, np.ndarray) or tokens.ndim != 1:
        raise DataError(f"{path}: expected a 1-D array of token ids, got shape {list(np.shape(tokens))}")
    if not np.issubdtype(tokens.dtype, np.integer):
        raise DataError(f"{path}: token ids must be integers, got dtype {tokens.dtype}")
    return tokens


def _first_out_of_range(tokens: np.ndarray, vocab_size: int) -> Optional[Tuple[int, int]]:
    """(position, id) of the first id outside [0, vocab_size), scanning in bounded pieces."""
    for start in range(0, tokens.size, SCAN_TOKENS):
        part = np.asarray(tokens[start:start + SCAN_TOKENS])
        bad = (part >= vocab_size) | (part < 0)
        if bad.any():
            i = int(np.argmax(bad))
            return start + i, int(part[i])
    return None


class TokenFile:
    """A checked token file: `tokens` memory-mapped [N], every id in [0, vocab_size)."""

    def __init__(self, path, vocab_size: int, min_tokens: int, *, what: str = "data"):
        self.path = Path(path)
        self.tokens = load_tokens(self.path)
        n = int(self.tokens.size)
        if n < min_tokens:
            raise DataError(f"{what} file {self.path} has {n} tokens, fewer than the {min_tokens} needed "
                            f"(one window of ctx_len + 1 tokens)")
        bad = _first_out_of_range(self.tokens, vocab_size)
        if bad is not None:
            raise DataError(f"{what} file {self.path}: token id {bad[1]} at position {bad[0]} is outside "
                            f"[0, vocab_size={vocab_size})")

    def __len__(self) -> int:
        return int(self.tokens.size)


class WindowSampler:
    """Random windows of ctx_len + 1 tokens, a pure function of (seed, step).

    Step `s` reads `n_windows` windows starting at uniform random offsets drawn from
    `np.random.default_rng([seed, s])` (a SeedSequence of the pair: independent streams,
    identical on every machine and numpy version with PCG64). A mini-epoch is a fixed
    number of steps; windows are drawn with replacement as the original trainer did.
    """

    def __init__(self, tokens: np.ndarray, ctx_len: int, seed: int):
        if tokens.size < ctx_len + 1:
            raise DataError(f"{tokens.size} tokens are fewer than one window of ctx_len + 1 = {ctx_len + 1}")
        self.tokens, self.ctx_len, self.seed = tokens, ctx_len, seed

    def starts(self, step: int, n_windows: int) -> np.ndarray:
        """Window start offsets of one step: [n_windows] int64 in [0, N - ctx_len - 1]."""
        rng = np.random.default_rng([self.seed, step])
        return rng.integers(0, self.tokens.size - self.ctx_len, size=n_windows, dtype=np.int64)

    def windows(self, starts: np.ndarray) -> np.ndarray:
        """tokens[s : s + ctx_len + 1] for each start: [len(starts), ctx_len + 1] int32."""
        idx = starts[:, None] + np.arange(self.ctx_len + 1)[None, :]
        return np.asarray(self.tokens[idx], dtype=np.int32)

    def batch(self, step: int, grad_accum: int, batch_size: int) -> np.ndarray:
        """The windows of one optimizer step: [grad_accum, batch_size, ctx_len + 1] int32."""
        starts = self.starts(step, grad_accum * batch_size)
        return self.windows(starts).reshape(grad_accum, batch_size, self.ctx_len + 1)


def file_identity(path) -> dict:
    """What tells a token file from another: its path, size, and SHA-256 of its first and
    last IDENTITY_BYTES (cheap for any size; a resumed run must read the same file)."""
    path = Path(path).resolve()
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(IDENTITY_BYTES)
        f.seek(max(size - IDENTITY_BYTES, 0))
        tail = f.read(IDENTITY_BYTES)
    return {"path": str(path), "size": size, "head_sha256": hashlib.sha256(head).hexdigest(),
            "tail_sha256": hashlib.sha256(tail).hexdigest()}


def identity_mismatch(saved: dict, now: dict) -> Optional[str]:
    """How `now` differs from `saved` in content (size, head, tail), or None; the path may move."""
    for key, what in (("size", "size"), ("head_sha256", "first bytes"), ("tail_sha256", "last bytes")):
        if saved.get(key) != now.get(key):
            if key == "size":
                return f"size {saved.get('size')} bytes then, {now.get('size')} now"
            return f"its {what} differ"
    return None


def eval_windows(tokens: np.ndarray, ctx_len: int, n_windows: int) -> np.ndarray:
    """Consecutive non-overlapping windows from the start of a held-out file: [n, ctx_len + 1]."""
    n = min(n_windows, (tokens.size - 1) // ctx_len)
    idx = np.arange(n)[:, None] * ctx_len + np.arange(ctx_len + 1)[None, :]
    return np.asarray(tokens[idx], dtype=np.int32)
