"""Text generation: batched, chunked prefill in GPT mode, then jitted RNN-mode decoding.

    import rwkv2_jax as rw
    out = rw.generate(model, [ids_a, ids_b], 100, temperature=0.8, top_p=0.7)  # -> [[...], [...]]

1. `prefill`: every prompt but its last token goes through GPT mode in chunks of at most
   `chunk_size` tokens, carrying the state from chunk to chunk, so memory stays bounded for
   any prompt length. Prompts of different lengths are right-padded in a chunk and the
   model is given their `lengths`, so each row's state is taken at its own last token.
   One RNN step on the last tokens then gives the next-token logits [B, V] (so the
   vocabulary head never runs over the whole prompt).
2. decoding: one jitted step for the whole batch draws a token per row on the device
   (bans, penalties, top-p/top-k/temperature: `rwkv2_jax.generation.sampling`) and feeds it back
   through `rwkv2_jax.generation.step` (the model at T = 1 on transposed, merged matrices).
   On accelerators `generate` runs the whole loop on the device in `lax.while_loop`s
   (`DEVICE_STEPS_PER_ITER` steps per iteration, then the rest), until
   `max_new_tokens` or until every row has drawn a stop token (on CPU, a Python loop of
   the jitted step: `DECODE_LOOP`); `stream` calls the step once per token and yields ids
   as they come. The state is donated to each call on accelerators.

Randomness: row b draws with the key `fold_in(key(seed_b), step)`, where seed_b = seed + b
(or seeds[b] for a list), so a row's tokens do not depend on the other rows of its batch:
`generate(m, [p0, p1], n, seed=s)[1] == generate(m, [p1], n, seed=s + 1)[0]`.

Stop tokens: a row ends when it draws one of `stop_tokens`; the stop token is not returned
and not fed to the model (as in ChatRWKV's pipeline), so the returned state (with
`return_state=True`) is the state after the prompt and the returned tokens.
"""

from __future__ import annotations

import functools
from typing import Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from rwkv2_jax.handle import Model, check_tokens
from rwkv2_jax.generation.step import DecodeOptions, StepSpec, decode_params, rnn_step, spec_of
from rwkv2_jax.model import State, init_state
from rwkv2_jax.generation.sampling import (NONFINITE, SamplerKnobs, SamplerStatic, SamplingParams, count_token, draw,
                                           penalize)
from rwkv2_jax.xla import DECODE_COMPILER_OPTIONS, jit

# Prompts longer than this go through GPT mode in pieces of this many tokens: bounded memory
# (the [B, chunk, 4C] channel-mix activations) at nearly the one-shot speed.
DEFAULT_CHUNK_SIZE = 1024
# Shorter pieces are padded up to a power of two >= this, so few shapes are ever compiled.
MIN_CHUNK = 16
# Output buffers of the decode loop are padded up to a power of two >= this.
MIN_OUT_LEN = 16
# Where the decode loop runs, by backend: "device" = one lax.while_loop (no host work per
# token), "host" = a Python loop of jitted steps. On a CPU the device loop gains nothing
# (docs/PERF.md, tried and not adopted) and the host loop can stop early at no cost.
DECODE_LOOP = {"cpu": "host"}
DECODE_LOOP_DEFAULT = "device"
# The host loop checks whether every row has stopped once per this many steps (a sync).
HOST_CHECK_EVERY = 32
# Decoding steps per iteration of the device loop. Each iteration of an XLA while loop on a
# GPU sends its condition to the host; running several steps per iteration (an inner loop
# of known length, which needs no such round trip) pays that once per this many tokens.
# The remaining n % DEVICE_STEPS_PER_ITER steps run 4, then 1 per iteration.
DEVICE_STEPS_PER_ITER = 32


# --- jitted pieces ----------------------------------------------------------------------


def _jit(fn, static_argnames=(), donate_argnames=(), decode=False):
    """rwkv2_jax.xla.jit, donating buffers only where the backend reuses them (CPU would only
    warn); decode: a program of decode steps (compiled with xla.DECODE_COMPILER_OPTIONS)."""
    return _jit_for_backend(fn, tuple(static_argnames), tuple(donate_argnames), decode, jax.default_backend())


@functools.lru_cache(maxsize=None)
def _jit_for_backend(fn, static_argnames, donate_argnames, decode, backend):
    donate = donate_argnames if backend != "cpu" else ()
    return jit(fn, static_argnames=static_argnames, donate_argnames=donate,
               options=DECODE_COMPILER_OPTIONS if decode else None)


def _keep_rows(keep: jax.Array, old: State, new: State) -> State:
    """Per row b: the old state where keep[b], else the new one."""
    mask = keep[None, :, None]  # [1, B, 1] against [L, B, C]
    return State(*(jnp.where(mask, o, n) for o, n in zip(old, new)))


def _prefill_chunk(module, params, state: Optional[State], tokens: jax.Array, lengths: Optional[jax.Array]) -> State:
    """GPT mode over one chunk tokens [B, S] -> the state after each row's lengths[b] tokens.

    state None: the start of a sequence. lengths None: every row is full. A row with
    lengths[b] == 0 keeps its state. The logits are not returned, so XLA drops the
    vocabulary head.
    """
    if state is None:  # built here, not on the host: no transfer, no eager ops per call
        state = init_state(module.config, tokens.shape[0])
    if lengths is None:
        _, new = module.apply({"params": params}, tokens, state)
        return new
    _, new = module.apply({"params": params}, tokens, state, jnp.maximum(lengths, 1))
    return _keep_rows(lengths == 0, state, new)


def _feed(spec: StepSpec, dparams, state: Optional[State], token: jax.Array) -> Tuple[jax.Array, State]:
    """One RNN step on token [B] -> (logits [B, V] float32, state) (rwkv2_jax.generation.step).
    state None: the start of a sequence."""
    if state is None:
        state = init_state(spec.config, token.shape[0])
    return rnn_step(spec, dparams, token, state)


class Decoding(NamedTuple):
    """The device-side loop state of a batch being decoded."""

    state: State  # RNN state after everything fed so far
    logits: jax.Array  # [B, V] float32: logits of the next token
    seen: Optional[jax.Array]  # [B, V] bool: generated before (None when penalties are off)
    counts: Optional[jax.Array]  # [B, V] float32: decayed occurrence counts (idem)
    done: jax.Array  # [B] bool: the row drew a stop token
    step: jax.Array  # [] int32: tokens drawn so far


class _Consts(NamedTuple):
    """Per-call constants of the decode loop; host (numpy) values until a jitted call takes them."""

    knobs: SamplerKnobs
    banned: np.ndarray  # [V] bool
    stop: np.ndarray  # [V] bool
    seeds: np.ndarray  # [B] uint32: row b draws with fold_in(key(seeds[b]), step)


def _decode_step(spec: StepSpec, dparams, dec: Decoding, consts: _Consts, static: SamplerStatic,
                 keep_state: bool = True):
    """Draw a token per row from dec.logits, feed it -> (next Decoding, token [B], -1 where done).

    keep_state: a finished row keeps the state after its last returned token (needed only
    where the state is returned and rows can stop; otherwise its state runs on unused,
    which spares a select over the whole state per step).
    """
    logits = jnp.where(consts.banned, -jnp.inf, dec.logits)
    if static.penalized:
        logits = penalize(logits, dec.seen, dec.counts, consts.knobs.presence_penalty,
                          consts.knobs.frequency_penalty)
    keys = jax.vmap(lambda seed: jax.random.fold_in(jax.random.key(seed), dec.step))(consts.seeds)
    token = draw(logits, keys, consts.knobs, static)  # [B]
    # A row with non-finite logits ends here, reported by NONFINITE in its output (_check_finite).
    broken = token == NONFINITE
    token = jnp.where(broken, 0, token)
    done = dec.done | consts.stop[token] if static.stops else dec.done
    done = done | broken
    # Finished rows feed their drawn token too (a valid id): their logits are not used again,
    # and their state is kept from before (keep_state) or not returned.
    new_logits, new_state = _feed(spec, dparams, dec.state, token)
    seen, counts = dec.seen, dec.counts
    if static.penalized:
        seen, counts = count_token(seen, counts, token, consts.knobs.penalty_decay, ~done)
    if keep_state:
        new_state = _keep_rows(done, dec.state, new_state)
    out = jnp.where(done, jnp.where(broken & ~dec.done, NONFINITE, -1), token)
    dec = Decoding(new_state, new_logits, seen, counts, done, dec.step + 1)
    return dec, out


def _decode_loop(spec: StepSpec, dparams, logits: jax.Array, state: State, consts: _Consts, n: jax.Array, *,
                 static, out_len: int, per_iter: int = 1, keep_state: bool = True):
    """n steps from (logits, state) in lax.while_loops, stopping early once every row is done:
    `per_iter` steps per iteration (an inner loop of known length) while that many remain,
    then 4, then 1 (so no step runs past n). out_len >= n.

    -> (Decoding, tokens [B, out_len] int32, -1 after a row's end and past step n).
    """
    dec = _start(logits, state, static.penalized)
    B = dec.done.shape[0]

    def one(carry):
        dec, out = carry
        step = dec.step
        dec, token = _decode_step(spec, dparams, dec, consts, static, keep_state)
        return dec, jax.lax.dynamic_update_slice(out, token[:, None], (0, step))

    def loop(carry, per):
        def cond(carry):
            dec, _ = carry
            return (dec.step + per <= n) & ~jnp.all(dec.done)

        body = one if per == 1 else lambda carry: jax.lax.fori_loop(0, per, lambda _, c: one(c), carry)
        return jax.lax.while_loop(cond, body, carry)

    carry = (dec, jnp.full((B, out_len), -1, jnp.int32))
    for per in sorted({per_iter, min(per_iter, 4), 1}, reverse=True):
        carry = loop(carry, per)
    return carry


# --- host side: validation and setup -------------------------------------------------------


def _check_prompts(prompts, vocab_size: int) -> List[np.ndarray]:
    """A list of non-empty 1-D int32 arrays, or a one-line ValueError naming the prompt."""
    if isinstance(prompts, np.ndarray) and prompts.ndim == 2:
        prompts = list(prompts)
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts must be a list of token-id lists, got {type(prompts).__name__}")
    if not prompts:
        raise ValueError("prompts is empty: pass at least one prompt")
    out = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, (int, np.integer)):
            raise ValueError("prompts must be a list of token-id lists (for one prompt pass [prompt]), "
                             f"got an int at index {i}")
        arr = np.asarray(prompt)
        if arr.ndim != 1:
            raise ValueError(f"prompt {i} must be a flat list of token ids, got shape {list(arr.shape)}")
        if arr.size == 0:
            raise ValueError(f"prompt {i} is empty: each prompt needs at least one token")
        try:
            arr, _ = check_tokens(arr, vocab_size)
        except ValueError as err:
            raise ValueError(f"prompt {i}: {err}") from None
        out.append(arr[0])
    return out


def _check_state(model: Model, state: Optional[State], batch_size: int) -> Optional[State]:
    if state is None:
        return None
    state = model.check_state(state, batch_size)
    return jax.tree.map(jnp.array, state)  # a copy: the caller's state is never donated


def _pow2_at_least(n: int, low: int) -> int:
    return max(low, 1 << max(int(n) - 1, 0).bit_length())


def _row_seeds(seed, batch_size: int) -> np.ndarray:
    """Row b's seed (seed + b, or seed[b]) modulo 2**32, in Python integers so any size works."""
    def is_int(x):
        return isinstance(x, (int, np.integer)) and not isinstance(x, bool)

    if is_int(seed):
        seeds = [int(seed) + b for b in range(batch_size)]
    else:
        seeds = list(seed) if isinstance(seed, (list, tuple, np.ndarray)) else None
        if seeds is None or len(seeds) != batch_size or not all(is_int(s) for s in seeds):
            raise ValueError(f"seed must be an int or {batch_size} ints (one per prompt), got {seed!r}")
    return np.array([int(s) % (1 << 32) for s in seeds], np.uint32)


def _consts(model: Model, params: SamplingParams, seed, batch_size: int) -> _Consts:
    """Validated host values (no device work: generate's set-up is paid on every call)."""
    banned, stop = params.masks(model.config.vocab_size)
    return _Consts(params.knobs(), banned, stop, _row_seeds(seed, batch_size))


def _start(logits: jax.Array, state: State, penalized: bool) -> Decoding:
    B, V = logits.shape
    seen = counts = None
    if penalized:
        seen, counts = jnp.zeros((B, V), bool), jnp.zeros((B, V), jnp.float32)
    return Decoding(state, logits, seen, counts, jnp.zeros((B,), bool), jnp.zeros((), jnp.int32))


# --- public API ---------------------------------------------------------------------------


def prompt_logits(
    model: Model,
    prompts: Sequence[Sequence[int]],
    *,
    state: Optional[State] = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    decode_options: Optional[DecodeOptions] = None,
) -> Tuple[jax.Array, State]:
    """GPT mode over each prompt (batched, chunked) -> (next-token logits [B, V], state after it).

    prompts: B token-id lists, of any lengths >= 1. state: the state before the prompts
    ([L, B, C] fields; None: the start of a sequence), e.g. to continue a conversation.
    Equal, up to float rounding, to `model.prefill` on each prompt alone (its last logits
    and state); memory is bounded by the chunk, not the prompt length. decode_options: how
    the RNN step on the last tokens runs (`DecodeOptions`; None: the defaults).
    """
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    spec = spec_of(model, decode_options)
    rows = _check_prompts(prompts, model.config.vocab_size)
    B = len(rows)
    state = _check_state(model, state, B)
    body = np.array([len(r) - 1 for r in rows])  # tokens per row that go through GPT mode
    chunk = _jit(_prefill_chunk, ("module",), ("state",))
    start, longest = 0, int(body.max())
    while start < longest:
        size = min(int(chunk_size), _pow2_at_least(longest - start, MIN_CHUNK))
        lengths = np.clip(body - start, 0, size)
        tokens = np.zeros((B, size), np.int32)  # padding id 0 (any valid id): masked by lengths
        for b, r in enumerate(rows):
            tokens[b, : lengths[b]] = r[start : start + lengths[b]]
        full = bool((lengths == size).all())  # no padding: no masking needed
        state = chunk(model.module, model.params, state, tokens, None if full else lengths.astype(np.int32))
        start += size
    last = np.array([r[-1] for r in rows], np.int32)
    return _jit(_feed, ("spec",), ("state",), decode=True)(spec, decode_params(model), state, last)


def generate(
    model: Model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    penalty_decay: float = 1.0,
    ban_tokens: Sequence[int] = (0,),
    stop_tokens: Sequence[int] = (),
    seed: Union[int, Sequence[int]] = 0,
    state: Optional[State] = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    return_state: bool = False,
    decode_loop: Optional[str] = None,
    decode_options: Optional[DecodeOptions] = None,
):
    """Continue each prompt by up to `max_new_tokens` tokens -> list (per prompt) of new ids.

    prompts: B token-id lists of any lengths (>= 1 token each), decoded as one batch.
    Returns the generated ids without the prompt; a row ends early at a stop token, which
    is not included. Sampling semantics and defaults: `rwkv2_jax.generation.sampling` (temperature 0
    is greedy; token 0 is banned by default). seed: an int (row b uses seed + b) or one int
    per prompt. state: the state before the prompts (e.g. from a saved conversation).
    return_state: also return the state after each prompt and its returned tokens, as
    (tokens, state). decode_loop: "device" (one lax.while_loop) or "host" (a Python loop of
    jitted steps); None picks by backend (DECODE_LOOP). Both give the same tokens.
    decode_options: how the decode step runs on a GPU (`DecodeOptions`; None: the defaults).
    Logits that are not finite (NaN weights or state) raise a ValueError naming the row and step.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    params = SamplingParams(temperature, top_p, top_k, presence_penalty, frequency_penalty, penalty_decay,
                            ban_tokens, stop_tokens)
    rows = _check_prompts(prompts, model.config.vocab_size)
    consts = _consts(model, params, seed, len(rows))  # validates ids and seeds before any compute
    spec = spec_of(model, decode_options)
    if decode_loop is None:
        decode_loop = DECODE_LOOP.get(jax.default_backend(), DECODE_LOOP_DEFAULT)
    if decode_loop not in ("device", "host"):
        raise ValueError(f"decode_loop must be 'device', 'host' or None, got {decode_loop!r}")
    if max_new_tokens == 0 and not return_state:
        return [[] for _ in rows]
    logits, prompt_state = prompt_logits(model, rows, state=state, chunk_size=chunk_size, decode_options=decode_options)
    if max_new_tokens == 0:
        return [[] for _ in rows], prompt_state
    keep_state = return_state and bool(params.stop_tokens)  # else no row's state is kept or read
    if decode_loop == "device":
        loop = _jit(_decode_loop, ("spec", "static", "out_len", "per_iter", "keep_state"), ("logits", "state"),
                    decode=True)
        dec, out = loop(spec, decode_params(model), logits, prompt_state, consts, np.int32(max_new_tokens),
                        static=params.static(), out_len=_pow2_at_least(max_new_tokens, MIN_OUT_LEN),
                        per_iter=DEVICE_STEPS_PER_ITER, keep_state=keep_state)
        out = np.asarray(out)[:, :max_new_tokens]
    else:
        step = _jit(_decode_step, ("spec", "static", "keep_state"), ("dec",), decode=True)
        dparams = decode_params(model)
        dec, consts = _start(logits, prompt_state, params.penalized), jax.device_put(consts)
        out = []
        for i in range(max_new_tokens):
            dec, token = step(spec, dparams, dec, consts, params.static(), keep_state)
            out.append(token)
            if (i + 1) % HOST_CHECK_EVERY == 0 and bool(jnp.all(dec.done)):
                break
        out = np.stack(jax.device_get(out), axis=1)
    tokens = _trim(out)
    return (tokens, dec.state) if return_state else tokens


def _check_finite(out: np.ndarray, first_step: int = 0) -> None:
    """A one-line error for the first row whose logits were not finite (out: ids [B, N] of the steps
    from first_step on, NONFINITE where that happened)."""
    rows, steps = np.nonzero(out == NONFINITE)
    if rows.size:
        raise ValueError(f"row {rows[0]}: the model's logits are not finite (NaN or inf) at step "
                         f"{first_step + steps[0]} (check the weights and the state); no token drawn from them")


def _trim(out: np.ndarray) -> List[List[int]]:
    """[B, N] with -1 after each row's end -> B lists."""
    _check_finite(out)
    result = []
    for row in out:
        end = np.flatnonzero(row < 0)
        result.append(row[: end[0] if end.size else len(row)].tolist())
    return result


def stream_batch(
    model: Model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    *,
    seed: Union[int, Sequence[int]] = 0,
    state: Optional[State] = None,
    context: Optional[Tuple[jax.Array, State]] = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    decode_options: Optional[DecodeOptions] = None,
    **sampling,
) -> Iterator[np.ndarray]:
    """Like `generate`, but yield each step's ids [B] (int32, -1 for rows already stopped).

    Ends after max_new_tokens steps or once every row has stopped. The tokens are the same
    as `generate`'s for the same arguments. context: the (logits, state) that `prefill`
    returned for these prompts, to draw several continuations from one prefill (it is
    copied, not consumed).
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    params = SamplingParams(**sampling)
    rows = _check_prompts(prompts, model.config.vocab_size)
    consts = _consts(model, params, seed, len(rows))
    spec = spec_of(model, decode_options)
    if max_new_tokens == 0:
        return
    if context is None:
        logits, prompt_state = prompt_logits(model, rows, state=state, chunk_size=chunk_size, decode_options=decode_options)
    else:
        logits, prompt_state = context
        if tuple(logits.shape) != (len(rows), model.config.vocab_size):
            raise ValueError(f"context logits have shape {list(logits.shape)}, expected "
                             f"[{len(rows)}, {model.config.vocab_size}] (B, V)")
        logits, prompt_state = jnp.array(logits), _check_state(model, prompt_state, len(rows))
    step = _jit(_decode_step, ("spec", "static", "keep_state"), ("dec",), decode=True)
    dparams = decode_params(model)
    dec, static = _start(logits, prompt_state, params.penalized), params.static()
    consts = jax.device_put(consts)  # once, not with every step
    pending = None
    for i in range(max_new_tokens):
        # Dispatch the next step before reading the previous token, so the device never waits on the host.
        dec, token = step(spec, dparams, dec, consts, static, False)  # no state returned
        if pending is not None:
            ids = np.asarray(pending)
            _check_finite(ids[:, None], i - 1)
            if (ids < 0).all():
                return
            yield ids
        pending = token
    ids = np.asarray(pending)
    _check_finite(ids[:, None], max_new_tokens - 1)
    if not (ids < 0).all():
        yield ids


def stream(
    model: Model,
    prompt: Sequence[int],
    max_new_tokens: int,
    *,
    context: Optional[Tuple[jax.Array, State]] = None,
    **kwargs,
) -> Iterator[int]:
    """Yield up to `max_new_tokens` ids continuing one `prompt` (a token-id list), as they come.

    Same tokens as `generate(model, [prompt], ...)`. context: the (logits [1, V], state)
    from `prompt_logits(model, [prompt])`, to draw several samples from one pass over the prompt.
    Other keyword arguments: those of `generate`.
    """
    for ids in stream_batch(model, [prompt], max_new_tokens, context=context, **kwargs):
        yield int(ids[0])


# --- weights ------------------------------------------------------------------------------


def with_weight_dtype(model: Model, dtype=jnp.bfloat16) -> Model:
    """The model with its matrices (embedding, linear layers, head) stored and multiplied in
    `dtype`; vectors (time_decay, time_first, time_mix, LayerNorm) stay float32, and so do
    the RNN state and the WKV. Decoding reads every weight once per step, so bfloat16
    halves its memory traffic."""
    dtype = jnp.dtype(dtype)
    params = jax.tree.map(lambda x: x.astype(dtype) if x.ndim == 2 else x.astype(jnp.float32), model.params)
    return Model(model.config, params, dtype=dtype, wkv_impl=model.wkv_impl,
                 precision=None if dtype != jnp.float32 else model.precision)
