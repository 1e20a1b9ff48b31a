"""Generate text from an RWKV-v2 checkpoint (release .pth or native .safetensors).

    python sample.py --checkpoint 20220615-10803.pth --prompt "In a shocking finding," --tokens 100

The prompt goes in through GPT mode (prefill, in chunks), then the model runs in RNN mode,
one jitted step per token (rwkv2_jax.generation.generator.stream, the same tokens as rw.generate);
text streams as it is generated, decoded incrementally (O(1) per token). Sampling follows
ChatRWKV's pipeline: see docs/generation.md.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import jax.numpy as jnp

import rwkv2_jax as rw
from rwkv2_jax.cli.common import TOKENIZER_HELP, UsageError, random_seed, tokenizer_for
from rwkv2_jax.generation.generator import prompt_logits, stream, with_weight_dtype
from rwkv2_jax.generation.sampling import TEMPERATURE_FLOOR

SEED_LIMIT = 1 << 32  # sampling seeds are 32-bit


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="release .pth or native .safetensors checkpoint")
    p.add_argument("--tokenizer", default=None, help=TOKENIZER_HELP)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--prompt", default="\n", help="prompt text (default: a newline)")
    g.add_argument("--prompt-file", default=None, help="read the prompt from this file")
    p.add_argument("--tokens", type=int, default=100, help="tokens to generate per sample (default 100)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    p.add_argument("--top-p", type=float, default=0.7, help="nucleus cut on probabilities (default 0.7, 1 = off)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most probable tokens (default 0 = off)")
    p.add_argument("--presence-penalty", type=float, default=0.0,
                   help="subtracted from the logit of every token already generated (default 0 = off)")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="times a token's occurrence count, also subtracted (default 0 = off)")
    p.add_argument("--penalty-decay", type=float, default=1.0,
                   help="occurrence counts are multiplied by this every token (default 1 = no decay)")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed in [0, 2^32); sample i uses seed + i (default: a fresh one, printed with "
                        "the command-line flag that repeats the run)")
    p.add_argument("--num-samples", type=int, default=1, help="samples drawn from one prefill (default 1)")
    p.add_argument("--allow-end-of-text", action="store_true",
                   help="allow token 0 (<|endoftext|>), banned by default as in the original sampler")
    p.add_argument("--k-eps", type=float, default=None,
                   help="override the WKV epsilon (default: from the release name, else 1e-9)")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="load weights holding NaN or inf (refused by default; generation stops at such logits)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="weight/compute dtype (default: as stored, compute float32); bfloat16 stores and "
                        "multiplies the matrices in bfloat16, keeps vectors, state and WKV float32")
    args = p.parse_args(argv)
    if args.tokens < 0:
        p.error(f"--tokens must be >= 0, got {args.tokens}")
    if args.num_samples < 1:
        p.error(f"--num-samples must be >= 1, got {args.num_samples}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        p.error(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        p.error(f"--top-p must be in (0, 1], got {args.top_p}")
    if args.top_k < 0:
        p.error(f"--top-k must be >= 0, got {args.top_k}")
    if not 0 <= args.penalty_decay <= 1:
        p.error(f"--penalty-decay must be in [0, 1], got {args.penalty_decay}")
    for name in ("presence_penalty", "frequency_penalty"):
        if not math.isfinite(getattr(args, name)):
            p.error(f"--{name.replace('_', '-')} must be a finite number, got {getattr(args, name)}")
    if args.seed is not None and not 0 <= args.seed < SEED_LIMIT:
        p.error(f"--seed must be in [0, 2^32) (seeds are 32-bit), got {args.seed}")
    return args


def notice(message: str) -> None:
    print(f"# {message}", file=sys.stderr)


def run(args) -> int:
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_file():
        raise UsageError(f"checkpoint not found: {checkpoint}")
    tokenizer = tokenizer_for(args.tokenizer, checkpoint)
    if args.prompt_file is not None:
        try:
            prompt = Path(args.prompt_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise UsageError(f"cannot read --prompt-file {args.prompt_file}: {err}") from None
    else:
        prompt = args.prompt
    model = rw.load_any(checkpoint, k_eps=args.k_eps, allow_nonfinite=args.allow_nonfinite)
    if args.dtype:
        model = with_weight_dtype(model, jnp.dtype(args.dtype))
    tokenizer.check_fits(model.config.vocab_size)
    ids = tokenizer.encode(prompt)
    if not ids:
        raise UsageError("the prompt is empty after tokenization")
    notice(f"{model}")
    notice(f"prompt: {len(ids)} tokens")
    if args.seed is None:
        args.seed = random_seed()
        notice(f"seed {args.seed}; rerun with --seed {args.seed}")
    top_k = args.top_k
    if top_k >= model.config.vocab_size:
        notice(f"--top-k {top_k} >= the vocabulary ({model.config.vocab_size} tokens): no top-k cut")
        top_k = 0
    if 0 < args.temperature < TEMPERATURE_FLOOR:
        notice(f"--temperature {args.temperature:g} is below {TEMPERATURE_FLOOR:g}: greedy (the most probable token)")

    t0 = time.perf_counter()
    first = prompt_logits(model, [ids])
    first[0].block_until_ready()
    t_prefill = time.perf_counter() - t0
    ban = () if args.allow_end_of_text else (0,)
    n_tokens, t_decode = 0, 0.0
    for i in range(args.num_samples):
        if args.num_samples > 1:
            print(f"\n----- sample {i + 1}/{args.num_samples} -----", flush=True)
        sys.stdout.write(prompt)
        detok = tokenizer.decode_stream()  # O(1) per token; a split character comes out once complete
        gen = stream(model, ids, args.tokens, temperature=args.temperature, top_p=args.top_p,
                     top_k=top_k, presence_penalty=args.presence_penalty,
                     frequency_penalty=args.frequency_penalty, penalty_decay=args.penalty_decay,
                     ban_tokens=ban, seed=args.seed + i, context=first)
        t0 = time.perf_counter()
        for j, token in enumerate(gen):
            if j == 0 and i == 0:  # the first step compiles; time the rest
                t0 = time.perf_counter()
            else:
                n_tokens += 1
            sys.stdout.write(detok.push(token))
            sys.stdout.flush()
        sys.stdout.write(detok.flush())  # a character cut off by --tokens, as decode shows it
        t_decode += time.perf_counter() - t0
        print(flush=True)
    rate = n_tokens / t_decode if t_decode > 0 else float("nan")
    print(f"# prefill {len(ids)} tokens in {t_prefill:.2f} s (with compile); "
          f"decode {rate:.1f} tokens/s over {n_tokens} tokens (after compile)", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (UsageError, ValueError) as err:  # CheckpointError and bad ids are ValueErrors with one-line messages
        print(f"sample.py: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
