"""Sampling from logits on the device, with the semantics of ChatRWKV's pipeline.

For each row, every step (ChatRWKV's `PIPELINE.generate` + `sample_logits`, batched):
  1. banned tokens get logit -inf (token 0, <|endoftext|>, by default);
  2. penalties: every token already *generated* in this row loses
         presence_penalty + count * frequency_penalty
     from its logit (bounded to +-PENALTY_BOUND), where count is its occurrence count,
     multiplied by penalty_decay after every step (so old occurrences fade); prompt tokens
     are not counted;
  3. greedy (temperature == 0, or below TEMPERATURE_FLOOR): the argmax; otherwise
  4. probs = softmax(logits);
  5. top-p: keep the tokens whose probability is >= the probability at which the
     descending cumulative sum first reaches top_p (ties at the cut are kept; 1 = off);
  6. top-k: keep the k most probable tokens (ties at the k-th are kept; 0 = off);
  7. temperature: draw from probs ** (1 / temperature), renormalised (by inverse CDF in the
     log domain: one uniform number per row, as ChatRWKV's torch.multinomial / numpy choice).
A drawn stop token ends its row (see `rwkv2_jax.generation.generator`).

A banned or cut token is never drawn, whatever the temperature or the penalties. A row whose
logits hold a NaN or +inf, or no finite allowed value, draws NONFINITE (not a token id): the
generator reports it as an error naming the row and the step.

Differences from ChatRWKV, all deliberate: every generated token counts 1 (ChatRWKV counts
whitespace and digit tokens 0, a rule tied to its tokenizer); ties at the top-k cut are
kept (ChatRWKV keeps exactly k by its sort order); temperature 0 is an exact argmax.

Static (Python) choices pick the compiled path (greedy or not, top-p / top-k / penalties on
or off); the values themselves are traced, so changing them does not recompile. The top-p
and top-k cuts need no sort: `largest_threshold` finds the cutoff probability exactly in
8 passes over the row.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

# Below this temperature a draw is the argmax (greedy among the allowed tokens). The draw
# divides float32 log-probabilities by the temperature; XLA may round the same log-probability
# differently in two fused kernels (one ulp, up to ~1e-6 for |log p| < 16), and dividing by T
# multiplies that by 1/T: e^(1e-6 / 1e-4) is a 1% error, while near T = 1e-8 it decides the draw.
# At T = 1e-4 a log-probability gap of 1e-3 already weighs e^-10: the draw is all but greedy.
TEMPERATURE_FLOOR = 1e-4
# A penalty is bounded to +-this: exp(+-1e30) is inf or 0 in any float, so a token is already
# certain or impossible, and logits +- 1e30 (and their softmax) stay finite for any penalty.
PENALTY_BOUND = 1e30
# What `draw` returns for a row whose logits hold a NaN or +inf, or no finite allowed value.
NONFINITE = -2


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How `rw.generate` picks tokens; the defaults are plain sampling with token 0 banned.

    Attributes:
      temperature: 0 is greedy (argmax); else probabilities ** (1 / temperature), and
        greedy below TEMPERATURE_FLOOR.
      top_p: nucleus cut on the probabilities, in (0, 1]; 1 is off.
      top_k: keep the k most probable tokens; 0 is off (as is any k >= the vocabulary).
      presence_penalty: subtracted from the logit of every token generated before in the row.
      frequency_penalty: times the token's (decayed) occurrence count, also subtracted.
      penalty_decay: every step the occurrence counts are multiplied by this, in [0, 1].
      ban_tokens: ids that are never drawn.
      stop_tokens: ids that end their row when drawn (the stop token is not returned).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    penalty_decay: float = 1.0
    ban_tokens: Tuple[int, ...] = (0,)
    stop_tokens: Tuple[int, ...] = ()

    def __post_init__(self):
        def number(name):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
            return float(value)

        if number("temperature") < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0.0 < number("top_p") <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        object.__setattr__(self, "top_k", int(self.top_k))
        number("presence_penalty")
        number("frequency_penalty")
        if not 0.0 <= number("penalty_decay") <= 1.0:
            raise ValueError(f"penalty_decay must be in [0, 1], got {self.penalty_decay}")
        for name in ("ban_tokens", "stop_tokens"):
            ids = getattr(self, name)
            if isinstance(ids, (int, np.integer)):
                ids = (ids,)
            try:
                ids = tuple(int(t) for t in ids)
            except (TypeError, ValueError):
                raise ValueError(f"{name} must be a sequence of token ids, got {getattr(self, name)!r}") from None
            object.__setattr__(self, name, ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def masks(self, vocab_size: int) -> Tuple[np.ndarray, np.ndarray]:
        """(banned [V] bool, stop [V] bool); errors name an out-of-range id or a full ban."""
        banned = ban_mask(vocab_size, self.ban_tokens)
        stop = np.zeros(vocab_size, bool)
        for t in self.stop_tokens:
            if not 0 <= t < vocab_size:
                raise ValueError(f"stop token id {t} is outside [0, {vocab_size})")
            stop[t] = True
        return banned, stop

    def static(self) -> "SamplerStatic":
        """The choices that select a compiled path."""
        return SamplerStatic(self.greedy, self.top_p < 1.0, self.top_k > 0, self.penalized, bool(self.stop_tokens))

    def knobs(self) -> "SamplerKnobs":
        """The values, as numpy scalars: arguments of a jitted function, so traced (changing them
        does not recompile), and host values until then (no transfer per knob and call)."""
        f32 = np.float32
        top_k = np.int32(min(self.top_k, np.iinfo(np.int32).max))  # any k >= V keeps every token
        return SamplerKnobs(f32(self.temperature), f32(self.top_p), top_k,
                            f32(self.presence_penalty), f32(self.frequency_penalty), f32(self.penalty_decay))


class SamplerStatic(NamedTuple):
    greedy: bool
    use_top_p: bool
    use_top_k: bool
    penalized: bool
    stops: bool = False  # any stop tokens (without, a row never ends early: no per-step check)


class SamplerKnobs(NamedTuple):
    temperature: jax.Array  # [] float32 (unused when greedy)
    top_p: jax.Array  # [] float32
    top_k: jax.Array  # [] int32
    presence_penalty: jax.Array
    frequency_penalty: jax.Array
    penalty_decay: jax.Array


def ban_mask(vocab_size: int, ban_tokens: Sequence[int]) -> np.ndarray:
    """Boolean [V] mask of banned ids; errors if an id is out of range or all are banned."""
    mask = np.zeros(vocab_size, bool)
    for t in ban_tokens:
        if not 0 <= int(t) < vocab_size:
            raise ValueError(f"banned token id {t} is outside [0, {vocab_size})")
        mask[int(t)] = True
    if mask.all():
        raise ValueError(f"every token id in [0, {vocab_size}) is banned: nothing can be sampled")
    return mask


# --- penalties -----------------------------------------------------------------------


def penalize(
    logits: jax.Array,  # [B, V] float32
    seen: jax.Array,  # [B, V] bool: generated before in this row
    counts: jax.Array,  # [B, V] float32: decayed occurrence counts
    presence_penalty: jax.Array,
    frequency_penalty: jax.Array,
) -> jax.Array:
    """logits - (presence + count * frequency) on the tokens seen before, the penalty bounded
    to +-PENALTY_BOUND (so -1e38 penalties give finite logits; a banned -inf stays -inf)."""
    penalty = jnp.clip(presence_penalty + counts * frequency_penalty, -PENALTY_BOUND, PENALTY_BOUND)
    return logits - jnp.where(seen, penalty, 0.0)


def count_token(
    seen: jax.Array,  # [B, V] bool
    counts: jax.Array,  # [B, V] float32
    token: jax.Array,  # [B] int32
    penalty_decay: jax.Array,
    active: jax.Array,  # [B] bool: rows whose token counts (not finished)
) -> Tuple[jax.Array, jax.Array]:
    """After a step: counts decay by penalty_decay, then the drawn token counts one more."""
    hit = (jnp.arange(counts.shape[-1]) == token[:, None]) & active[:, None]  # [B, V]
    return seen | hit, counts * penalty_decay + hit.astype(counts.dtype)


# --- drawing --------------------------------------------------------------------------


# Bits of the largest float32 probability (1.0 = 0x3F800000 < 2^30): thresholds are searched
# over the int32 views of non-negative floats, which order the same way as the floats.
_PROB_BITS = 30
# Bits resolved per pass of the threshold search (2^r - 1 candidate thresholds a pass).
# Accelerators: 4 (8 passes: launch-bound, so few passes); CPU: 1 (30 passes of one compare:
# compute-bound). Both far cheaper than sorting the row (on CPU 2 ms vs 35 ms for 4 x 50277).
_RADIX_BITS = {"cpu": 1}
_RADIX_BITS_DEFAULT = 4


def largest_threshold(
    probs: jax.Array,  # [B, V] float32 >= 0
    mass: jax.Array,  # [B, V] float32: what each token adds to F
    target: jax.Array,  # [B] or []: the level F must reach
    *,
    radix_bits: Optional[int] = None,  # bits resolved per pass; None: by backend (_RADIX_BITS)
) -> jax.Array:  # [B, 1] float32
    """Per row, the largest t with F(t) = sum(mass[probs >= t]) >= target (F(0) >= target assumed).

    With mass = probs this is ChatRWKV's top-p cutoff: the probability at which the
    descending cumulative sum first reaches target (keeping probs >= t keeps its ties);
    with mass = 1 and target = k, the k-th largest probability. The answer is always one
    of the probabilities; found exactly, digit by digit of its int32 view.
    """
    bits = jax.lax.bitcast_convert_type(probs, jnp.int32)  # [B, V], monotone in probs
    target = jnp.broadcast_to(target, probs.shape[:1])[:, None]  # [B, 1]
    lo = jnp.zeros(probs.shape[:1], jnp.int32)  # [B]: F(lo) >= target holds throughout
    radix = radix_bits or _RADIX_BITS.get(jax.default_backend(), _RADIX_BITS_DEFAULT)
    remaining = _PROB_BITS
    while remaining > 0:  # a Python loop: a fixed number of passes, unrolled in the graph
        r = min(radix, remaining)
        remaining -= r
        candidates = lo[:, None] + (jnp.arange(1, 1 << r, dtype=jnp.int32) << remaining)  # [B, 2^r - 1]
        above = bits[:, :, None] >= candidates[:, None, :]  # [B, V, 2^r - 1]
        level = jnp.sum(jnp.where(above, mass[:, :, None], 0.0), axis=1)  # [B, 2^r - 1], non-increasing
        lo = lo + (jnp.sum(level >= target, axis=-1, dtype=jnp.int32) << remaining)
    return jax.lax.bitcast_convert_type(lo, jnp.float32)[:, None]


def draw(
    logits: jax.Array,  # [B, V] float32, bans and penalties applied
    keys: jax.Array,  # [B] typed PRNG keys, one per row
    knobs: SamplerKnobs,
    static: SamplerStatic,
) -> jax.Array:  # [B] int32
    """Steps 3-7 of the module docstring, each row with its own key -> a token per row, never
    a -inf (banned) one; NONFINITE for a row whose logits hold a NaN or +inf, or no finite value."""
    ok = jnp.isfinite(jnp.max(logits, axis=-1))  # [B]: max propagates a NaN
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # the cuts below always keep it
    if static.greedy:
        return jnp.where(ok, greedy, NONFINITE)
    logp = jax.nn.log_softmax(logits, axis=-1)  # [B, V]
    if static.use_top_p or static.use_top_k:
        probs = jnp.exp(logp)
        cutoff = jnp.zeros((probs.shape[0], 1), jnp.float32)
        if static.use_top_p:
            cutoff = largest_threshold(probs, probs, knobs.top_p)
        if static.use_top_k:
            k = jnp.minimum(knobs.top_k, probs.shape[-1]).astype(jnp.float32)
            cutoff = jnp.maximum(cutoff, largest_threshold(probs, jnp.ones_like(probs), k))
        logp = jnp.where(probs < cutoff, -jnp.inf, logp)
    # Log of probs ** (1 / T) relative to the most probable token: the subtraction comes before the
    # division, so 1/T scales a difference (<= 0, exactly 0 at the top), never a rounding error of log p.
    delta = logp - jnp.max(logp, axis=-1, keepdims=True)
    sampled = inverse_cdf_draw(keys, delta / jnp.maximum(knobs.temperature, TEMPERATURE_FLOOR))
    token = jnp.where(knobs.temperature < TEMPERATURE_FLOOR, greedy, sampled)
    return jnp.where(ok, token, NONFINITE)


def inverse_cdf_draw(
    keys: jax.Array,  # [B] typed PRNG keys, one per row
    scaled: jax.Array,  # [B, V] float32 log-weights up to a constant per row (-inf: never drawn)
) -> jax.Array:  # [B] int32
    """One token per row from softmax(scaled), as torch.multinomial and numpy's choice draw (and
    so ChatRWKV): one uniform u in [0, 1) per row, the first token whose cumulative weight
    exceeds u times the row's total. One random number per row instead of
    jax.random.categorical's V Gumbel numbers: 0.23 instead of 1.79 ms per draw from 50,277
    tokens on a 2-core CPU (docs/PERF.md).

    A token of weight 0 (scaled -inf, or so far below the row's largest that exp underflows) is
    never drawn: the first crossing is taken among tokens of positive weight, since a parallel
    cumulative sum may round a run of zero weights upwards; should rounding leave none across
    the level, the heaviest token is the draw. A row needs one finite value (`draw` checks)."""
    weights = jnp.exp(scaled - jnp.max(scaled, axis=-1, keepdims=True))  # [B, V], the largest 1
    cdf = jnp.cumsum(weights, axis=-1)  # [B, V]
    u = jax.vmap(lambda key: jax.random.uniform(key, (), jnp.float32))(keys)  # [B]
    crossed = (cdf > u[:, None] * cdf[:, -1:]) & (weights > 0)  # [B, V]
    first = jnp.argmax(crossed, axis=-1)
    return jnp.where(jnp.any(crossed, axis=-1), first, jnp.argmax(weights, axis=-1)).astype(jnp.int32)


def row_keys(key, batch_size: int) -> jax.Array:
    """[B] typed keys from one key (split) or from B keys (typed or raw uint32 [B, 2])."""
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.wrap_key_data(key)
    if key.ndim == 0:
        return jax.random.split(key, batch_size)
    if key.shape != (batch_size,):
        raise ValueError(f"expected one key or {batch_size} keys, got keys of shape {list(key.shape)}")
    return key


def sample_logits(
    logits: jax.Array,  # [B, V]
    key: jax.Array,
    banned: jax.Array = None,  # [V] bool
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
) -> jax.Array:  # [B] int32
    """Draw one token per row (no penalties). `key`: one key (split over rows) or one per row.
    A row whose logits hold a NaN or +inf (or no finite allowed value) gives NONFINITE."""
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, ban_tokens=())
    logits = logits.astype(jnp.float32)
    if banned is not None:
        logits = jnp.where(banned, -jnp.inf, logits)
    return draw(logits, row_keys(key, logits.shape[0]), params.knobs(), params.static())
