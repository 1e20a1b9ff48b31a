"""Text in, text out: a model and its tokenizer in one object, as ChatRWKV's PIPELINE.

    import rwkv2_jax as rw
    pipe = rw.Pipeline(rw.load_torch("20220615-10803.pth"), "20B_tokenizer.json")
    pipe.generate("In a shocking finding,", 100, top_p=0.7)           # -> str
    for piece in pipe.stream("In a shocking finding,", 100):          # str pieces as they come
        print(piece, end="")
    pipe.loglikelihood("The capital of France is", " Paris")          # -> (logprob, is_greedy)

Each method encodes, calls the token-level API (`rw.generate`, `rw.stream_batch`,
`rw.loglikelihood`: the same tokens and numbers) and decodes. A list of strings
instead of one string runs them as one batch.
"""

from __future__ import annotations

from typing import Iterator, List, Optional, Sequence, Tuple, Union

from rwkv2_jax.evaluation.scoring import loglikelihood
from rwkv2_jax.generation.generator import generate, stream_batch
from rwkv2_jax.handle import Model
from rwkv2_jax.model import State
from rwkv2_jax.tokenizer import Tokenizer, as_tokenizer

Text = Union[str, Sequence[str]]


class Pipeline:
    """A Model with its tokenizer: `generate`, `stream`, `stream_batch` and `loglikelihood` on text.

    Args:
      model: an `rw.Model`.
      tokenizer: an `rw.Tokenizer`, a `tokenizers.Tokenizer`, or the path of a tokenizer
        JSON (or of the folder holding it). It must not have more ids than the model.

    Sampling keyword arguments are those of `rw.generate` (temperature, top_p, top_k,
    presence_penalty, frequency_penalty, penalty_decay, ban_tokens, stop_tokens, seed,
    chunk_size) with its defaults.
    """

    def __init__(self, model: Model, tokenizer):
        if not isinstance(model, Model):
            raise TypeError(f"model must be an rw.Model, got {type(model).__name__}")
        self.model = model
        self.tokenizer: Tokenizer = as_tokenizer(tokenizer).check_fits(model.config.vocab_size)

    def encode(self, text: str) -> List[int]:
        return self.tokenizer.encode(text)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids)

    def _prompts(self, text: Text) -> Tuple[List[List[int]], bool]:
        """-> (token ids of each prompt, whether one str was given)."""
        single = isinstance(text, str)
        texts = [text] if single else list(text)
        if not texts:
            raise ValueError("no prompts: pass a str or a non-empty list of str")
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"prompts must be str, got {type(t).__name__} at index {i}")
        prompts = self.tokenizer.encode_batch(texts)
        for i, ids in enumerate(prompts):
            if not ids:
                where = "the prompt" if single else f"prompt {i}"
                raise ValueError(f"{where} is empty after tokenization ({texts[i]!r}); a prompt needs a token")
        return prompts, single

    def generate(self, prompt: Text, max_new_tokens: int = 100, *, state: Optional[State] = None,
                 return_state: bool = False, **sampling):
        """The text generated after `prompt` (a str, or a list of str decoded as one batch -> list of str).

        state: the RNN state before the prompt (from `return_state=True` or `rw.load_state`),
        to continue a conversation. return_state: also return the state after the prompt and
        the generated tokens, as (text, state).
        """
        prompts, single = self._prompts(prompt)
        out = generate(self.model, prompts, max_new_tokens, state=state, return_state=return_state, **sampling)
        tokens, new_state = out if return_state else (out, None)
        texts = [self.tokenizer.decode(ids) for ids in tokens]
        result = texts[0] if single else texts
        return (result, new_state) if return_state else result

    def stream_batch(self, prompts: Sequence[str], max_new_tokens: int = 100, *,
                     state: Optional[State] = None, **sampling) -> Iterator[List[str]]:
        """Per decoding step, the new text of each prompt ('' for a row that has stopped or
        whose character is not complete yet). Same tokens as `generate`."""
        if isinstance(prompts, str):
            raise TypeError("stream_batch takes a list of str; for one prompt use stream()")
        rows, _ = self._prompts(prompts)
        decoders = [self.tokenizer.decode_stream() for _ in rows]
        for ids in stream_batch(self.model, rows, max_new_tokens, state=state, **sampling):
            yield [d.push(t) if t >= 0 else "" for d, t in zip(decoders, ids.tolist())]
        tails = [d.flush() for d in decoders]
        if any(tails):
            yield tails

    def stream(self, prompt: str, max_new_tokens: int = 100, *, state: Optional[State] = None,
               **sampling) -> Iterator[str]:
        """The text generated after `prompt`, piece by piece as it is decoded.

        Pieces never split a character: one whose bytes span several tokens comes out once
        complete. The pieces joined equal `generate`'s text.
        """
        if not isinstance(prompt, str):
            raise TypeError(f"stream takes one str, got {type(prompt).__name__}; for a batch use stream_batch()")
        for pieces in self.stream_batch([prompt], max_new_tokens, state=state, **sampling):
            if pieces[0]:
                yield pieces[0]

    def loglikelihood(self, context: Text, continuation: Text, *, batch_size: int = 8):
        """log p(continuation | context) and whether it is the greedy continuation.

        One (context, continuation) pair of str -> (logprob, is_greedy); two lists of equal
        length -> a list of pairs. Context and continuation are tokenized apart, as
        lm-evaluation-harness does; an empty context means the start of a text (token 0).
        """
        single = isinstance(context, str)
        if single != isinstance(continuation, str):
            raise TypeError("context and continuation must both be str, or both lists of str")
        contexts = [context] if single else list(context)
        continuations = [continuation] if single else list(continuation)
        if len(contexts) != len(continuations):
            raise ValueError(f"{len(contexts)} contexts but {len(continuations)} continuations")
        requests = list(zip(self.tokenizer.encode_batch(contexts), self.tokenizer.encode_batch(continuations)))
        results = loglikelihood(self.model, requests, batch_size=batch_size)
        return results[0] if single else results

    def __repr__(self) -> str:
        return f"Pipeline({self.model!r}, {self.tokenizer!r})"
