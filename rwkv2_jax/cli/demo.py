"""A demo that needs no downloads: train a tiny character-level RWKV-v2, then sample from it.

    python -m rwkv2_jax.cli.demo [--steps 300] [--out demo_out]

It writes the model as a release-format `.pth` and a character tokenizer as a
`tokenizers` JSON, then runs `sample.py` on them: the same path a user takes
with a real checkpoint and `20B_tokenizer.json`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

DEMO_TEXT = """\
RWKV is a recurrent network that trains like a transformer. In GPT mode it reads a \
whole sequence at once; in RNN mode it reads one token at a time and keeps a small \
state. Both modes give the same answer, so a prompt can be read in parallel and the \
reply written one token at a time.
The time mix keeps two running sums for every channel. Each new token adds its key \
and its value, and every old token fades by a fixed decay. The output is the ratio \
of the two sums, gated by the receptance.
The channel mix is a small feed forward layer. It squares a rectified key and gates \
the result, and it too looks at the previous token through the token shift.
A model with a state of fixed size can read a long text without a cache that grows. \
That is why the network is cheap to run, and why its memory does not depend on the \
length of the text.
"""


def char_tokenizer(text: str):
    """A `tokenizers.Tokenizer` with one token per character; id 0 is <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {"<|endoftext|>": 0}
    for ch in sorted(set(text)):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<|endoftext|>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["<|endoftext|>"])
    return tok


def train_tiny(ids: np.ndarray, vocab_size: int, *, steps: int, seed: int = 0, log=print):
    """Adam on random windows of the text; returns the trained rwkv2_jax.Model."""
    import jax
    import optax

    import rwkv2_jax as rw

    config = rw.RWKVConfig(n_layer=2, n_embd=64, vocab_size=vocab_size, ctx_len=64)
    model = rw.init(config, seed=seed)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0),
                            optax.adam(optax.cosine_decay_schedule(3e-3, steps, 0.1), b2=0.99))
    opt_state = optimizer.init(model.params)

    def loss_fn(params, x, y):
        logits, _ = model.module.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def train_step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    T, B = config.ctx_len, 16
    params = model.params
    t0 = time.perf_counter()
    for step in range(steps):
        starts = rng.integers(0, len(ids) - T - 1, B)
        window = np.stack([ids[s : s + T + 1] for s in starts])
        params, opt_state, loss = train_step(params, opt_state, window[:, :-1], window[:, 1:])
        if step % 50 == 0 or step == steps - 1:
            log(f"step {step:4d}  loss {float(loss):.3f}  ({time.perf_counter() - t0:.0f} s)")
    return rw.Model(config, params)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    p.add_argument("--out", default="demo_out", help="folder for demo.pth and tokenizer.json")
    p.add_argument("--tokens", type=int, default=200, help="characters to generate")
    args = p.parse_args(argv)

    import rwkv2_jax as rw
    from rwkv2_jax.cli import sample

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = char_tokenizer(DEMO_TEXT)
    tok.save(str(out / "tokenizer.json"))
    ids = np.asarray(tok.encode(DEMO_TEXT).ids, np.int32)
    print(f"# training a tiny RWKV-v2 (L2-D64) on {len(ids)} characters of text", flush=True)
    model = train_tiny(ids, tok.get_vocab_size(), steps=args.steps, log=lambda s: print(s, flush=True))
    rw.save_torch(model, out / "demo.pth")
    print(f"# wrote {out / 'demo.pth'} (release format) and {out / 'tokenizer.json'}\n", flush=True)
    return sample.main(["--checkpoint", str(out / "demo.pth"), "--tokenizer", str(out / "tokenizer.json"),
                        "--prompt", "The time mix", "--tokens", str(args.tokens),
                        "--temperature", "0.8", "--top-p", "0.9"])


if __name__ == "__main__":
    sys.exit(main())
