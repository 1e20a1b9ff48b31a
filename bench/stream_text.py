"""Text streaming speed: tokens/s of turning generated ids into text, early and late in a long output.

    python bench/stream_text.py [--tokenizer PATH/20B_tokenizer.json --tokens 32768 --window 1024]

Pure detokenization (no model): the ids are the first 1,024 tokens of the real tokenizer's
encoding of this repository's Markdown files, repeated up to --tokens (so the early and the late
window decode the same text). Rows: sample.py's incremental decoder (tokenizers'
DecodeStream, O(1) per token) and, for comparison, decoding every id so far at each token
(O(n) per token). A rate is --window tokens over their time, ending at 1k and at --tokens ids;
the incremental rate must not fall with the length. Median of --repeats runs after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

from tokenizers import Tokenizer

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rwkv2_jax.tokenizer import as_tokenizer  # noqa: E402

DEFAULT_TOKENIZER = REPO.parent / "shared" / "data" / "20B_tokenizer.json"
EARLY = 1024  # the "1k" column: the rate over the window ending at this many tokens


def corpus_ids(tokenizer: Tokenizer, n: int) -> list:
    """n ids of real text: the first EARLY tokens of the repository's Markdown files, repeated."""
    text = "\n".join(p.read_text(encoding="utf-8") for p in sorted(REPO.glob("*.md")) + sorted(REPO.glob("docs/*.md")))
    ids = tokenizer.encode(text).ids[:EARLY]
    return (ids * (n // len(ids) + 1))[:n]


def incremental_rates(tokenizer, ids, window: int, ends) -> dict:
    """{end: tokens/s over the window ids[end - window:end]} for one incremental pass, and its text."""
    detok, marks, parts = as_tokenizer(tokenizer).decode_stream(), {0: time.perf_counter()}, []
    for i, token in enumerate(ids, 1):
        parts.append(detok.push(token))
        if i % window == 0:
            marks[i] = time.perf_counter()
    return {end: window / (marks[end] - marks[end - window]) for end in ends}, "".join(parts)


def full_redecode_rate(tokenizer, ids, end: int, window: int) -> float:
    """tokens/s of decoding ids[:i] for every i in (end - window, end]: the quadratic way."""
    t0 = time.perf_counter()
    for i in range(end - window + 1, end + 1):
        tokenizer.decode(ids[:i])
    return window / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER), help="tokenizer JSON (default: ../shared's 20B)")
    p.add_argument("--tokens", type=int, default=32768, help="generated tokens (the late column)")
    p.add_argument("--window", type=int, default=1024, help="tokens per timed window (divides 1k and --tokens)")
    p.add_argument("--redecode-window", type=int, default=128, help="tokens timed for the full re-decode row")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    if not Path(args.tokenizer).is_file():
        p.error(f"tokenizer not found: {args.tokenizer} (pass --tokenizer PATH/20B_tokenizer.json)")
    if args.window < 1 or EARLY % args.window or args.tokens % args.window or args.tokens <= EARLY:
        p.error(f"--window must divide {EARLY} and --tokens, and --tokens must exceed {EARLY}")
    tokenizer = Tokenizer.from_file(args.tokenizer)
    ids = corpus_ids(tokenizer, args.tokens)
    ends = (EARLY, args.tokens)

    incremental_rates(tokenizer, ids[:EARLY], args.window, (EARLY,))  # warm-up
    runs = [incremental_rates(tokenizer, ids, args.window, ends) for _ in range(args.repeats)]
    ok = all(text == tokenizer.decode(ids) for _, text in runs)
    print(f"CORRECTNESS: {'PASS' if ok else 'FAIL'} (the streamed text equals decoding all {len(ids)} ids at once)")
    inc = {end: statistics.median(r[end] for r, _ in runs) for end in ends}
    w = min(args.redecode_window, EARLY)
    full = {end: statistics.median(full_redecode_rate(tokenizer, ids, end, w) for _ in range(args.repeats))
            for end in ends}
    late = f"{args.tokens // 1024}k" if args.tokens % 1024 == 0 else str(args.tokens)
    print(f"\n| detokenization | tok/s at 1k | tok/s at {late} | {late} / 1k |")
    print("|---|---|---|---|")
    print(f"| incremental (DecodeStream; sample.py) | {inc[EARLY]:,.0f} | {inc[args.tokens]:,.0f} | "
          f"{inc[args.tokens] / inc[EARLY]:.2f} |")
    print(f"| full re-decode every token | {full[EARLY]:,.0f} | {full[args.tokens]:,.0f} | "
          f"{full[args.tokens] / full[EARLY]:.2f} |")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
