"""Evaluation: log-likelihood of continuations (the lm-evaluation-harness contract),
per-token loss over windows of a token file, and loss by position in the context.

    import rwkv2_jax as rw
    from rwkv2_jax.evaluation.scoring import loglikelihood, token_losses
    results = loglikelihood(model, [(context_ids, continuation_ids), ...])   # [(logprob, is_greedy)]
    results = loglikelihood(model, [lambada_request(text, tokenizer) for text in docs])  # LAMBADA
    losses = token_losses(model, windows)                                    # [N, T] nats per token

Everything runs in GPT mode (parallel over time) under `jax.jit`, with the
log-softmax in float32 whatever the matmul dtype. Shapes: N windows, B batch,
T time, V vocab_size.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Iterable, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm  # plain text bars: tqdm.auto warns in a notebook without ipywidgets

from rwkv2_jax.handle import Model
from rwkv2_jax.model import State, token_nll
from rwkv2_jax.xla import jit

# <|endoftext|> in the 20B tokenizer. An empty context is replaced by this one token,
# as lm-evaluation-harness does (its `prefix_token_id`): the first continuation token
# then has something to be predicted from.
EOT_ID = 0

# Padded lengths are rounded up to 16, 24, 32, 48, 64, 96, ... (powers of two and 1.5x
# powers of two): at most ~2 log2(T) compiled shapes, at most a third of the work wasted.
MIN_BUCKET = 16


def bucket_length(n: int) -> int:
    """The padded length for a row of n tokens: the smallest of 16, 24, 32, 48, 64, 96, ... >= n."""
    if n <= MIN_BUCKET:
        return MIN_BUCKET
    p = 1 << (n - 1).bit_length()  # smallest power of two >= n
    return p * 3 // 4 if p * 3 // 4 >= n else p


# --- log-likelihood of continuations -------------------------------------------------


@partial(jit, static_argnames=("module",))
def _score_tokens(module, params, tokens, targets):
    """tokens, targets [B, T] -> (log p(target) [B, T] float32, target is the argmax [B, T] bool)."""
    logits, _ = module.apply({"params": params}, tokens)  # [B, T, V] float32
    target_logp = -token_nll(logits, targets)  # [B, T]
    greedy = jnp.argmax(logits, axis=-1) == targets  # [B, T]
    return target_logp, greedy


def _check_ids(ids, vocab_size: int, what: str) -> List[int]:
    arr = np.asarray(ids)
    if arr.size == 0:
        return []
    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{what} must be a flat sequence of integer token ids, got {arr.dtype} "
                         f"of shape {list(arr.shape)}")
    bad = np.flatnonzero((arr < 0) | (arr >= vocab_size))
    if bad.size:
        raise ValueError(f"{what}: token id {int(arr[bad[0]])} at position {int(bad[0])} is "
                         f"outside [0, {vocab_size})")
    return arr.tolist()


def loglikelihood(
    model: Model,
    requests: Sequence[Tuple[Sequence[int], Sequence[int]]],
    *,
    batch_size: int = 8,
    progress: bool = False,
) -> List[Tuple[float, bool]]:
    """Score continuations: for each (context_ids, continuation_ids), -> (logprob, is_greedy).

    logprob is the summed log-probability of the continuation tokens given the
    context (natural log, float32 log-softmax, summed in float64); is_greedy says
    whether every continuation token is the argmax of the model's prediction for it
    — the lm-evaluation-harness `loglikelihood` contract.

    * An empty context is replaced by [EOT_ID] (token 0, <|endoftext|>), as the harness
      does. The release's LAMBADA convention (a "\\n" prefix) is the caller's to add
      (`lambada_request` builds such requests).
    * An empty continuation scores (0.0, True) without running the model.
    * No truncation: GPT mode has no length cap, so a request of any length is scored
      in one pass with its full context.

    Requests are sorted by length, batched `batch_size` at a time and right-padded
    (to the bucket lengths of `bucket_length`); the model is causal, so padding after
    a row's last token changes nothing before it. Results are in the input order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    V = model.config.vocab_size
    rows = []  # (request index, input ids, target ids, index of the first continuation target)
    results: List[Optional[Tuple[float, bool]]] = [None] * len(requests)
    for i, request in enumerate(requests):
        try:
            context, continuation = request
        except (TypeError, ValueError):
            raise ValueError(f"request {i} must be a pair (context_ids, continuation_ids), "
                             f"got {type(request).__name__}") from None
        context = _check_ids(context, V, f"request {i} context")
        continuation = _check_ids(continuation, V, f"request {i} continuation")
        if not continuation:
            results[i] = (0.0, True)
            continue
        if not context:
            context = [EOT_ID]
        full = context + continuation
        rows.append((i, full[:-1], full[1:], len(context) - 1))

    rows.sort(key=lambda r: -len(r[1]))  # longest first: an out-of-memory shows at once
    B = min(batch_size, len(rows)) or 1  # one batch shape for every batch (fewer compiles)
    batches = [rows[s:s + B] for s in range(0, len(rows), B)]
    for batch in tqdm(batches, desc="loglikelihood", unit="batch", disable=not progress):
        T = bucket_length(len(batch[0][1]))
        tokens = np.full((B, T), EOT_ID, np.int32)  # [B, T] right-padded inputs
        targets = np.full((B, T), EOT_ID, np.int32)  # [B, T]
        for b, (_, inputs, target, _) in enumerate(batch):
            tokens[b, :len(inputs)] = inputs
            targets[b, :len(target)] = target
        logp, greedy = jax.device_get(_score_tokens(model.logits_module, model.params, tokens, targets))
        for b, (i, inputs, _, start) in enumerate(batch):
            span = slice(start, len(inputs))  # the continuation's targets
            results[i] = (float(np.sum(logp[b, span], dtype=np.float64)), bool(greedy[b, span].all()))
    return results


def lambada_request(text: str, tokenizer, *, newline_prefix: bool = True) -> Tuple[List[int], List[int]]:
    """One LAMBADA document -> (context ids, continuation ids), as the release scored it.

    The text is split at its last space; context and continuation are tokenized apart (as
    the 2022 harness did): context = ids("\\n") + ids(text before the last space) (without
    the "\\n" when newline_prefix is False), continuation = ids(" " + last word).
    `tokenizer`: an `rw.Tokenizer`. ValueError when the text has no last word.
    """
    context, space, word = text.rpartition(" ")
    if not space or not word:
        raise ValueError(f"the text has no last word after a space: {text[:60]!r}")
    continuation = tokenizer.encode(" " + word)
    if not continuation:
        raise ValueError(f"the last word {word!r} tokenizes to nothing")
    prefix = tokenizer.encode("\n") if newline_prefix else []
    return prefix + tokenizer.encode(context), continuation


# --- per-token loss over windows of a token stream -------------------------------------


@partial(jit, static_argnames=("module",))
def _chunk_losses(module, params, tokens, targets, state: State):
    """GPT mode from `state` over tokens [B, T] -> (-log p(targets) [B, T] float32, state after)."""
    logits, state = module.apply({"params": params}, tokens, state)  # [B, T, V]
    return token_nll(logits, targets), state


def token_losses(
    model: Model,
    windows,
    *,
    batch_size: int = 8,
    chunk_len: Optional[int] = None,
    progress: bool = False,
    desc: str = "windows",
) -> np.ndarray:
    """Per-token loss of windows of T + 1 tokens: int [N, T + 1] -> float32 [N, T] (nats).

    loss[n, t] = -log p(windows[n, t + 1] | windows[n, :t + 1]); each window starts from
    the zero state (the start of a sequence), as in training.

    A window is run in chunks of `chunk_len` tokens (default: config.ctx_len) with the
    RNN state carried from chunk to chunk, which is GPT mode over the whole window
    (the WKV is a recurrence) in O(B * chunk_len * V) memory, so T may be many
    times ctx_len.
    """
    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.shape[1] < 2 or not np.issubdtype(windows.dtype, np.integer):
        raise ValueError(f"windows must be integer [N, T + 1] with T >= 1, got {windows.dtype} "
                         f"of shape {list(windows.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    V = model.config.vocab_size
    bad = np.argwhere((windows < 0) | (windows >= V))
    if bad.size:
        n, t = (int(x) for x in bad[0])
        raise ValueError(f"token id {int(windows[n, t])} at window {n}, position {t} is outside [0, {V})")
    chunk_len = int(chunk_len or model.config.ctx_len)
    if chunk_len < 1:
        raise ValueError(f"chunk_len must be >= 1, got {chunk_len}")
    N, T = windows.shape[0], windows.shape[1] - 1
    B = min(batch_size, N)
    out = np.empty((N, T), np.float32)
    for s in tqdm(range(0, N, B), desc=desc, unit="batch", disable=not progress):
        rows = windows[s:s + B].astype(np.int32)  # [b, T + 1]
        n_real = rows.shape[0]
        if n_real < B:  # pad the last batch with copies of its first row (discarded)
            rows = np.concatenate([rows, np.repeat(rows[:1], B - n_real, axis=0)])
        state = model.init_state(B)
        for c in range(0, T, chunk_len):
            n = min(chunk_len, T - c)
            loss, state = _chunk_losses(model.module, model.params, rows[:, c:c + n],
                                        rows[:, c + 1:c + 1 + n], state)
            out[s:s + n_real, c:c + n] = np.asarray(loss)[:n_real]
    return out


def window_starts(n_tokens: int, length: int, *, mode: str = "sequential",
                  count: Optional[int] = None, seed: int = 0) -> np.ndarray:
    """Start offsets of windows of length + 1 tokens in a stream of n_tokens.

    "sequential": back to back with stride `length`, so every token after the first is
    predicted exactly once (the first `count` windows if count is given);
    "random": `count` uniform random starts (seeded), as the original trainer samples.
    """
    if length < 1:
        raise ValueError(f"window length must be >= 1, got {length}")
    n_max = n_tokens - length - 1  # largest start
    if n_max < 0:
        raise ValueError(f"the token file has {n_tokens} tokens; a window needs {length + 1}")
    if count is not None and count < 1:
        raise ValueError(f"window count must be >= 1, got {count}")
    if mode == "sequential":
        starts = np.arange(0, n_max + 1, length)
        return starts if count is None else starts[:count]
    if mode == "random":
        if count is None:
            raise ValueError("random windows need a count")
        return np.random.default_rng(seed).integers(0, n_max + 1, size=count)
    raise ValueError(f"unknown window mode {mode!r}; choose 'sequential' or 'random'")


def gather_windows(tokens: np.ndarray, starts: Iterable[int], length: int) -> np.ndarray:
    """tokens [n] (e.g. a memory-mapped .npy), starts [N] -> int32 windows [N, length + 1]."""
    return np.stack([np.asarray(tokens[s:s + length + 1], np.int32) for s in starts])


def mean_with_ci(values, z: float = 1.96) -> Tuple[float, float]:
    """(mean, half-width of the normal-approximation 95% confidence interval) of values [N].

    Use one value per window (its mean loss): tokens within a window are correlated,
    windows far apart nearly independent. The half-width is nan for N < 2.
    """
    values = np.asarray(values, np.float64)
    if values.size < 2:
        return float(values.mean()), math.nan
    return float(values.mean()), float(z * values.std(ddof=1) / math.sqrt(values.size))


def positional_loss(
    model: Model,
    tokens: np.ndarray,
    max_len: int,
    *,
    count: int = 64,
    mode: str = "random",
    seed: int = 0,
    batch_size: int = 8,
    chunk_len: Optional[int] = None,
    progress: bool = False,
) -> Tuple[np.ndarray, np.ndarray]:
    """Mean loss by position: -> (mean [max_len], standard error [max_len]) over windows.

    Position t is the loss of predicting token t + 1 from tokens 0..t of a window that
    starts a sequence (zero state); windows are drawn from `tokens` as in `window_starts`.
    """
    starts = window_starts(len(tokens), max_len, mode=mode, count=count, seed=seed)
    losses = token_losses(model, gather_windows(tokens, starts, max_len), batch_size=batch_size,
                          chunk_len=chunk_len, progress=progress, desc="positional")  # [N, max_len]
    n = losses.shape[0]
    stderr = losses.std(axis=0, ddof=1) / math.sqrt(n) if n > 1 else np.full(max_len, np.nan)
    return losses.mean(axis=0, dtype=np.float64), stderr
