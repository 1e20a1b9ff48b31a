"""A demo that needs no downloads: train a tiny character-level RWKV-v2, then sample from it.

    rwkv2-demo [--steps 300] [--out demo_out]          (or python -m rwkv2_jax.cli.demo)

It trains with the training code (the optimizer and step of rwkv2-train), then writes
OUT/demo.pth (the release format), OUT/tokenizer.json (a character tokenizer in the
`tokenizers` format) and OUT/text.npy (the training text as a token file), and runs
rwkv2-sample on them: the path a user takes with a real checkpoint and 20B_tokenizer.json.
A .pth does not store the context length, so the tools that use it take --ctx-len 64.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np
from tokenizers import Tokenizer, decoders, models

from rwkv2_jax.cli import sample
from rwkv2_jax.config import RWKVConfig
from rwkv2_jax.handle import Model, init, save_torch
from rwkv2_jax.tokenizer import END_OF_TEXT
from rwkv2_jax.training.data import WindowSampler, token_dtype
from rwkv2_jax.training.sharding import make_mesh
from rwkv2_jax.training.trainer import TrainConfig, setup

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
CTX_LEN = 64  # the demo text is ~1,000 characters: 64-character windows give many distinct ones
# A 2-layer, 64-wide model learns the text in a few hundred steps of batch 16 (~15 s on 2 CPU cores).
DEMO_CONFIG = dict(n_layer=2, n_embd=64, ctx_len=CTX_LEN)
DEMO_TRAINING = dict(ctx_len=CTX_LEN, batch_size=16, lr_init=3e-3, lr_final=3e-4, lr_schedule="cosine",
                     dtype="float32")


class DemoFiles(NamedTuple):
    checkpoint: Path  # demo.pth, release format
    tokenizer: Path  # tokenizer.json
    tokens: Path  # text.npy: the training text as token ids


def char_tokenizer(text: str) -> Tokenizer:
    """A `tokenizers.Tokenizer` with one token per character; id 0 is <|endoftext|>."""
    vocab = {END_OF_TEXT: 0}
    for ch in sorted(set(text)):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=END_OF_TEXT))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([END_OF_TEXT])
    return tok


def train_tiny(ids: np.ndarray, vocab_size: int, *, steps: int, seed: int = 0, log=print) -> Model:
    """Train an L2-D64 model on random windows of `ids` with rwkv2_jax.training; -> the Model."""
    config = RWKVConfig(vocab_size=vocab_size, **DEMO_CONFIG)
    cfg = TrainConfig(epochs=1, epoch_steps=steps, seed=seed, **DEMO_TRAINING)
    run = setup(config, cfg, make_mesh())
    state = run.init_state(init(config, seed=seed).params)
    sampler = WindowSampler(ids, cfg.ctx_len, cfg.seed)
    t0 = time.perf_counter()
    for step in range(steps):
        state, metrics = run.train_step(state, run.put_batch(sampler.batch(step, cfg.grad_accum, cfg.batch_size)))
        if step % 50 == 0 or step == steps - 1:
            log(f"step {step:4d}  loss {float(metrics['loss']):.3f}  ({time.perf_counter() - t0:.0f} s)")
    return Model(config, jax.device_get(state.params))


def build(out, *, steps: int = 300, seed: int = 0, log=print) -> DemoFiles:
    """Train the demo model and write demo.pth, tokenizer.json and text.npy into `out`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = char_tokenizer(DEMO_TEXT)
    files = DemoFiles(out / "demo.pth", out / "tokenizer.json", out / "text.npy")
    tok.save(str(files.tokenizer))
    ids = np.asarray(tok.encode(DEMO_TEXT).ids, np.int32)
    np.save(files.tokens, ids.astype(token_dtype(tok.get_vocab_size())))
    log(f"# training a tiny RWKV-v2 (L2-D64, ctx_len {CTX_LEN}) on {len(ids)} characters of text")
    model = train_tiny(ids, tok.get_vocab_size(), steps=steps, seed=seed, log=log)
    save_torch(model, files.checkpoint)
    log(f"# wrote {files.checkpoint} (release format), {files.tokenizer} and {files.tokens}")
    return files


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="rwkv2-demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300, help="training steps (default 300)")
    p.add_argument("--out", default="demo_out", help="folder for demo.pth, tokenizer.json and text.npy")
    p.add_argument("--tokens", type=int, default=200, help="characters to generate")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")

    files = build(args.out, steps=args.steps, log=lambda s: print(s, flush=True))
    print(flush=True)
    code = sample.main(["--checkpoint", str(files.checkpoint), "--prompt", "The time mix",
                        "--tokens", str(args.tokens), "--temperature", "0.8", "--top-p", "0.9", "--seed", "0"])
    print(f"\n# next: rwkv2-sample --checkpoint {files.checkpoint} --prompt 'A model'\n"
          f"#       rwkv2-eval verify --checkpoint {files.checkpoint} --prompt 'The channel mix'\n"
          f"#       rwkv2-eval loss {files.tokens} --checkpoint {files.checkpoint} --ctx-len {CTX_LEN}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
