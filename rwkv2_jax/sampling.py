"""Sampling from logits on the device, with the semantics of the original sampler.

For each row (ChatRWKV's `sample_logits`, extended to batches):
  1. banned tokens get probability 0 (token 0, end of text, by default);
  2. probs = softmax(logits);
  3. top-p: keep the tokens whose probability is >= the probability at which the
     sorted cumulative sum first reaches top_p (ties at the cut are kept);
  4. top-k: keep the k most probable tokens (0 = off);
  5. temperature: probs ** (1 / temperature), then renormalise and draw.
temperature == 0 is greedy (argmax of the logits after bans).
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np


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


def sample_logits(
    logits: jax.Array,  # [B, V]
    key: jax.Array,
    banned: jax.Array,  # [V] bool
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
) -> jax.Array:  # [B] int32
    """Draw one token per row. temperature, top_p, top_k are Python numbers (static)."""
    logits = jnp.where(banned, -jnp.inf, logits.astype(jnp.float32))
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    probs = jax.nn.softmax(logits, axis=-1)  # [B, V]
    if top_p < 1.0:
        sorted_probs = jnp.sort(probs, axis=-1)[:, ::-1]  # descending
        cumulative = jnp.cumsum(sorted_probs, axis=-1)
        cut_index = jnp.argmax(cumulative >= top_p, axis=-1)  # first index reaching top_p
        cutoff = jnp.take_along_axis(sorted_probs, cut_index[:, None], axis=-1)
        probs = jnp.where(probs < cutoff, 0.0, probs)
    if top_k > 0:
        kth = jax.lax.top_k(probs, min(top_k, probs.shape[-1]))[0][:, -1:]
        probs = jnp.where(probs < kth, 0.0, probs)
    if temperature != 1.0:
        probs = probs ** (1.0 / temperature)
    return jax.random.categorical(key, jnp.log(probs), axis=-1).astype(jnp.int32)
