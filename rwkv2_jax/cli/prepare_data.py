"""Tokenize text into a token file for train.py (a .npy of uint16 ids, uint32 when V > 65,536).

    rwkv2-prepare-data enwik8.txt --tokenizer 20B_tokenizer.json --out train.npy --verify
    rwkv2-prepare-data books/ --tokenizer 20B_tokenizer.json --out books.npy
    rwkv2-prepare-data corpus.jsonl --text-field text --tokenizer 20B_tokenizer.json --out c.npy

(or python -m rwkv2_jax.cli.prepare_data ...)

Inputs stream through the tokenizer in chunks, so multi-GB files need no RAM; the ids
equal those of tokenizing each document whole. Each .txt file and each .jsonl line is a
document; documents are separated by <|endoftext|> (--separator none: nothing). A single
.txt gives exactly the ids of the original recipe.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rwkv2_jax.tokenizer import TokenizerError, load_tokenizer
from rwkv2_jax.training.data import CHUNK_CHARS, END_OF_TEXT, DataError, tokenize_to_npy, verify_token_file

PROG = "rwkv2-prepare-data"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help=".txt files, .jsonl files, or folders of them (recursive, sorted)")
    p.add_argument("--tokenizer", required=True, help="tokenizer JSON (20B_tokenizer.json for the releases)")
    p.add_argument("--out", required=True, help="output .npy token file")
    p.add_argument("--text-field", default="text", help="field of each .jsonl object holding its text (default text)")
    p.add_argument("--separator", default=END_OF_TEXT,
                   help=f"token between documents (default {END_OF_TEXT}); 'none' for nothing")
    p.add_argument("--chunk-chars", type=int, default=CHUNK_CHARS,
                   help=f"characters tokenized at a time (default {CHUNK_CHARS})")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    p.add_argument("--verify", action="store_true",
                   help="read the file back: count, dtype, largest id, decoded head and tail")
    p.add_argument("--verify-tokens", type=int, default=48, help="tokens decoded at each end by --verify (default 48)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.chunk_chars < 16:
        p.error(f"--chunk-chars must be >= 16, got {args.chunk_chars}")
    return args


def run(args) -> int:
    tokenizer = load_tokenizer(args.tokenizer).backend  # the training-data code takes a tokenizers.Tokenizer
    out = Path(args.out)
    if out.exists() and not args.force:
        raise DataError(f"{out} exists; pass --force to overwrite it")
    separator = None if args.separator.lower() == "none" else args.separator
    res = tokenize_to_npy(args.inputs, out, tokenizer, text_field=args.text_field, separator=separator,
                          chunk_chars=args.chunk_chars, progress=not args.no_progress)
    print(f"wrote {res.path}: {res.n_tokens:,} tokens ({res.dtype.name}) from {res.n_documents} document(s)")
    if args.verify:
        info = verify_token_file(out, tokenizer, n=args.verify_tokens)
        print(f"verify: {info['n_tokens']:,} tokens, dtype {info['dtype']}, largest id {info['max_id']} "
              f"(vocab {tokenizer.get_vocab_size()})")
        print(f"verify: head: {info['head']!r}")
        print(f"verify: tail: {info['tail']!r}")
        if info["first_out_of_range"] is not None:
            pos, tid = info["first_out_of_range"]
            raise DataError(f"{out}: token id {tid} at position {pos} is outside the tokenizer's vocabulary")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except (DataError, TokenizerError, OSError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
