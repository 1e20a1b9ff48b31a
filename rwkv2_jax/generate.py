"""Text generation: the prompt through prefill (GPT mode), then jitted RNN-mode steps.

`stream` yields token ids one by one (for printing as they come); each step is one
jitted call that runs the model on the previous token and samples the next on
the device, so only the new id crosses to the host.
"""

from __future__ import annotations

from functools import partial
from typing import Iterator, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rwkv2_jax.api import Model, check_tokens
from rwkv2_jax.sampling import ban_mask, sample_logits


@partial(jax.jit, static_argnames=("module", "temperature", "top_p", "top_k"))
def _sample_step(module, params, state, logits, key, banned, *, temperature, top_p, top_k):
    """Sample from `logits` [B, V], then run one RNN step on the sampled token."""
    key, sub = jax.random.split(key)
    token = sample_logits(logits, sub, banned, temperature=temperature, top_p=top_p, top_k=top_k)
    new_logits, state = module.apply({"params": params}, token[:, None], state)
    return token, new_logits[:, 0], state, key


def stream(
    model: Model,
    prompt: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    ban_tokens: Sequence[int] = (0,),
    seed: int = 0,
    prefill: Optional[tuple] = None,
) -> Iterator[int]:
    """Yield up to `max_new_tokens` sampled ids continuing `prompt` (one sequence).

    `prefill`: an already computed (last logits [1, V], state) for this prompt, to
    draw several samples from one prefill.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0:
        raise ValueError(f"top_k must be >= 0, got {top_k}")
    banned = jnp.asarray(ban_mask(model.config.vocab_size, ban_tokens))
    if prefill is None:
        prefill = prefill_last(model, prompt)
    logits, state = prefill
    key = jax.random.PRNGKey(seed)
    for _ in range(max_new_tokens):
        token, logits, state, key = _sample_step(
            model.module, model.params, state, logits, key, banned,
            temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
        )
        yield int(token[0])


def prefill_last(model: Model, prompt: Sequence[int]) -> tuple:
    """GPT mode over the prompt -> (logits of its last token [1, V], state)."""
    arr, _ = check_tokens(np.asarray(prompt).reshape(1, -1), model.config.vocab_size)
    logits, state = model.prefill(arr)
    return logits[:, -1], state

