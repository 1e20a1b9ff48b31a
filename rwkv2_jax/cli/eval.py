"""Evaluate an RWKV-v2 checkpoint (release .pth or native .safetensors).

    rwkv2-eval lambada lambada_test.jsonl --checkpoint 20220615-10803.pth
    rwkv2-eval loss pile_val.npy --checkpoint 20220615-10803.pth
    rwkv2-eval positional pile_val.npy --max-len 3072 --checkpoint a.pth --checkpoint b.pth
    rwkv2-eval verify --checkpoint 20220615-10803.pth

(or python -m rwkv2_jax.cli.eval ...)

lambada     perplexity and last-word accuracy on {"text": ...} lines (lambada_openai),
            as the release computed them: context prefixed with "\\n", no pad token,
            continuation = " " + the last word (the text split at its last space).
loss        mean per-token loss over windows of a token file (the "Pile loss"), with a
            95% confidence interval over windows.
positional  mean loss by position up to --max-len (any multiple of ctx_len), as a PNG
            plot and a CSV; several --checkpoint give one curve each.
verify      GPT mode vs RNN mode vs prefill-then-RNN on a prompt: the max difference
            of the logits (the release's verify script).

TOKENS.npy is a 1-D array of token ids (uint16 in the original trainer's files:
the 20B tokenizer applied to a .txt), read memory-mapped. A release .pth does not
store the context length it was trained at: --ctx-len says it (768 when not given).
`--help` after a subcommand lists its flags.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from rwkv2_jax.cli.common import TOKENIZER_HELP, UsageError, tokenizer_for
from rwkv2_jax.evaluation.scoring import (
    gather_windows,
    lambada_request,
    loglikelihood,
    mean_with_ci,
    positional_loss,
    token_losses,
    window_starts,
)
from rwkv2_jax.handle import load_any
from rwkv2_jax.tokenizer import Tokenizer
from rwkv2_jax.training.data import TokenFile, load_tokens

PROG = "rwkv2-eval"
# The release's verify prompt.
VERIFY_PROMPT = ("\nIn a shocking finding, scientist discovered a herd of dragons living in a remote, "
                 "previously unexplored valley, in Tibet. Even more surprising to the researchers "
                 "was the fact that the dragons spoke perfect Chinese.")


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


# --- argument parsing ----------------------------------------------------------------


def _model_flags(p: argparse.ArgumentParser, *, several: bool = False, ctx_len: str = "") -> None:
    if several:
        p.add_argument("--checkpoint", action="append", required=True,
                       help="release .pth or native .safetensors; repeat for one curve per checkpoint")
    else:
        p.add_argument("--checkpoint", required=True, help="release .pth or native .safetensors checkpoint")
    p.add_argument("--k-eps", type=float, default=None,
                   help="override the WKV epsilon (default: from the release name, else 1e-9)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                   help="parameter/compute dtype (default: as stored, compute float32); "
                        "the log-softmax is float32 always")
    p.add_argument("--wkv-impl", choices=("auto", "reference", "pallas"), default="auto",
                   help="WKV implementation (default auto: Pallas on GPU, plain JAX elsewhere)")
    if ctx_len:
        p.add_argument("--ctx-len", type=positive_int, default=None,
                       help=f"the context length the model was trained at, {ctx_len} (default: the one a "
                            ".safetensors stores; 768, the releases', for a .pth, which cannot store it)")


def _tokenizer_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", default=None, help=TOKENIZER_HELP)


def _batch_flag(p: argparse.ArgumentParser, default: int) -> None:
    p.add_argument("--batch-size", type=positive_int, default=default,
                   help=f"sequences per forward pass (default {default})")


def _window_flags(p: argparse.ArgumentParser, *, mode: str, windows) -> None:
    p.add_argument("--mode", choices=("sequential", "random"), default=mode,
                   help="windows back to back from the start of the file, or at random "
                        f"starts (default {mode})")
    p.add_argument("--windows", type=positive_int, default=windows,
                   help="number of windows (sequential: the first N; default "
                        f"{'all' if windows is None else windows})")
    p.add_argument("--seed", type=int, default=0, help="seed of the random window starts (default 0)")
    p.add_argument("--chunk-len", type=positive_int, default=None,
                   help="run each window in chunks of this many tokens, carrying the RNN state "
                        "(bounds memory; default: the model's ctx_len)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")

    s = sub.add_parser("lambada", help="LAMBADA perplexity and last-word accuracy",
                       description="LAMBADA perplexity and accuracy as the release computed them "
                                   "(lm-evaluation-harness lambada_openai with a \"\\n\" prefix, no pad "
                                   "token): ppl = exp(-mean log p(last word)), acc = share of documents "
                                   "whose every last-word token is the argmax.")
    s.add_argument("file", help='JSON lines, one {"text": ...} document per line (blank lines skipped)')
    _model_flags(s)
    _tokenizer_flag(s)
    _batch_flag(s, 8)
    s.add_argument("--limit", type=positive_int, default=None, help="only the first N documents")
    s.add_argument("--no-newline-prefix", action="store_true",
                   help='do not prefix the context with "\\n" (the harness default instead of the release\'s)')
    s.add_argument("--output", default=None, help="also write the numbers to this JSON file")
    s.set_defaults(func=run_lambada)

    s = sub.add_parser("loss", help="mean per-token loss over windows of a token file",
                       description="Mean per-token loss (nats) over windows of ctx_len + 1 tokens, each "
                                   "from the start state, with a 95% confidence interval over windows "
                                   "(normal approximation on per-window means).")
    s.add_argument("tokens", help="1-D .npy of token ids")
    _model_flags(s, ctx_len="the tokens predicted per window")
    _batch_flag(s, 8)
    _window_flags(s, mode="sequential", windows=None)
    s.add_argument("--output", default=None, help="also write the numbers to this JSON file")
    s.set_defaults(func=run_loss)

    s = sub.add_parser("positional", help="mean loss by position, as a PNG plot and a CSV",
                       description="Mean loss at each position 0..max_len-1 of windows that start a "
                                   "sequence (position t: predicting token t+1 from t+1 tokens).")
    s.add_argument("tokens", help="1-D .npy of token ids")
    s.add_argument("--max-len", type=positive_int, required=True, help="positions to measure (any length)")
    _model_flags(s, several=True, ctx_len="marked on the plot")
    _batch_flag(s, 4)
    _window_flags(s, mode="random", windows=64)
    s.add_argument("--out", default="positional_loss",
                   help="output path without suffix: writes OUT.png and OUT.csv (default positional_loss)")
    s.add_argument("--smooth", type=positive_int, default=None,
                   help="moving-average width of the plotted curves (default max_len/64; CSV is raw)")
    s.set_defaults(func=run_positional)

    s = sub.add_parser("verify", help="GPT mode vs RNN mode vs prefill-then-RNN",
                       description="Run a prompt in GPT mode, in RNN mode, and as GPT-mode prefill of its "
                                   "first part then RNN mode; print the max differences of the logits. "
                                   "Exit status 1 when one exceeds --tol.")
    _model_flags(s)
    _tokenizer_flag(s)
    s.add_argument("--prompt", default=VERIFY_PROMPT, help="prompt text (default: the release's verify prompt)")
    s.add_argument("--split", type=positive_int, default=None,
                   help="tokens to prefill before switching to RNN mode (default: half the prompt)")
    s.add_argument("--tol", type=float, default=1e-3,
                   help="largest acceptable max |difference| of logits (default 1e-3)")
    s.set_defaults(func=run_verify)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


# --- inputs --------------------------------------------------------------------------


def _require_file(path, what: str) -> None:
    """Fail before loading a model when an input file is missing."""
    if not Path(path).is_file():
        raise UsageError(f"{what} not found: {path}")


def load_model(args, checkpoint: str):
    """The checkpoint with the flags' k_eps, dtype, WKV implementation and ctx_len."""
    path = Path(checkpoint)
    if not path.is_file():
        raise UsageError(f"checkpoint not found: {path}")
    kwargs = {"k_eps": args.k_eps, "wkv_impl": args.wkv_impl, "ctx_len": getattr(args, "ctx_len", None)}
    if args.dtype:
        kwargs["dtype"] = jnp.dtype(args.dtype)
    return load_any(path, **kwargs)


def read_lambada(path, tokenizer: Tokenizer, *, limit=None, newline_prefix: bool = True):
    """{"text": ...} JSON lines -> [(context ids, continuation ids)], as the release built them
    (`rwkv2_jax.evaluation.scoring.lambada_request`)."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"file not found: {path}")
    requests = []
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if limit is not None and len(requests) >= limit:
                break
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise UsageError(f"{where}: not UTF-8 ({err.reason} at byte {err.start} of the line)") from None
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as err:
                raise UsageError(f"{where}: malformed JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(doc, dict) or not isinstance(doc.get("text"), str):
                raise UsageError(f'{where}: expected an object with a string "text" field, '
                                 f"got {line.strip()[:60]!r}")
            try:
                requests.append(lambada_request(doc["text"], tokenizer, newline_prefix=newline_prefix))
            except ValueError as err:
                raise UsageError(f"{where}: {err}") from None
    if not requests:
        raise UsageError(f"{path}: no documents (the file is empty or has only blank lines)")
    return requests


def checked_tokens(path, vocab_size: int) -> np.ndarray:
    """The token file memory-mapped, every id checked against the model's vocab_size."""
    return TokenFile(path, vocab_size, 2, what="token").tokens


def write_json(path, record: dict) -> None:
    if path:
        Path(path).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        print(f"# wrote {path}", file=sys.stderr)


# --- subcommands ---------------------------------------------------------------------


def run_lambada(args) -> int:
    _require_file(args.file, "file")
    _require_file(args.checkpoint, "checkpoint")
    tokenizer = tokenizer_for(args.tokenizer, args.checkpoint)
    requests = read_lambada(args.file, tokenizer, limit=args.limit,
                            newline_prefix=not args.no_newline_prefix)
    model = load_model(args, args.checkpoint)
    tokenizer.check_fits(model.config.vocab_size)
    print(f"# {model}", file=sys.stderr)
    results = loglikelihood(model, requests, batch_size=args.batch_size, progress=True)
    logprobs = np.array([lp for lp, _ in results], np.float64)
    greedy = np.array([g for _, g in results], np.float64)
    n = len(results)
    ppl = math.exp(-logprobs.mean())
    acc = greedy.mean()
    acc_stderr = greedy.std(ddof=1) / math.sqrt(n) if n > 1 else math.nan  # as the harness reports
    print(f"lambada: n={n}  ppl={ppl:.4f}  acc={100 * acc:.2f}% (stderr {100 * acc_stderr:.2f}%)")
    write_json(args.output, {"task": "lambada", "file": str(args.file), "checkpoint": str(args.checkpoint),
                             "n": n, "ppl": ppl, "acc": acc, "acc_stderr": acc_stderr,
                             "newline_prefix": not args.no_newline_prefix})
    return 0


def run_loss(args) -> int:
    if args.mode == "random" and args.windows is None:
        raise UsageError("--mode random needs --windows N")
    load_tokens(args.tokens)  # the file's format, before the model loads
    _require_file(args.checkpoint, "checkpoint")
    model = load_model(args, args.checkpoint)
    tokens = checked_tokens(args.tokens, model.config.vocab_size)
    T = model.config.ctx_len
    try:
        starts = window_starts(len(tokens), T, mode=args.mode, count=args.windows, seed=args.seed)
    except ValueError as err:
        raise UsageError(f"{args.tokens}: {err}") from None
    print(f"# {model}", file=sys.stderr)
    print(f"# {len(starts)} {args.mode} windows of {T} + 1 tokens from {args.tokens}", file=sys.stderr)
    losses = token_losses(model, gather_windows(tokens, starts, T), batch_size=args.batch_size,
                          chunk_len=args.chunk_len, progress=True, desc="loss")  # [N, T]
    mean, ci = mean_with_ci(losses.mean(axis=1))
    print(f"loss: {mean:.4f} ± {ci:.4f} nats/token (95% CI over {len(starts)} windows of {T} tokens; "
          f"ppl {math.exp(mean):.3f})")
    write_json(args.output, {"task": "loss", "file": str(args.tokens), "checkpoint": str(args.checkpoint),
                             "mode": args.mode, "windows": int(len(starts)), "ctx_len": T,
                             "loss": mean, "ci95": ci})
    return 0


def _labels(paths) -> list:
    """Curve labels: the file names, with as many parent folders as it takes to tell them apart."""
    parts = [Path(p).absolute().parts for p in paths]
    depth = [1] * len(parts)
    while True:
        labels = ["/".join(p[-d:]) for p, d in zip(parts, depth)]
        clashes = [i for i, label in enumerate(labels) if labels.count(label) > 1 and depth[i] < len(parts[i])]
        if not clashes:
            break
        for i in clashes:
            depth[i] += 1
    return [f"{p[-1]}#{i}" if labels.count(label) > 1 else label  # the same file given twice
            for i, (p, label) in enumerate(zip(parts, labels))]


def run_positional(args) -> int:
    load_tokens(args.tokens)  # the file's format, before any model loads
    for checkpoint in args.checkpoint:
        _require_file(checkpoint, "checkpoint")
    N = args.max_len
    curves = []  # (label, ctx_len, mean [N], stderr [N])
    for label, checkpoint in zip(_labels(args.checkpoint), args.checkpoint):
        model = load_model(args, checkpoint)
        tokens = checked_tokens(args.tokens, model.config.vocab_size)
        print(f"# {label}: {model}", file=sys.stderr)
        try:
            mean, stderr = positional_loss(model, tokens, N, count=args.windows, mode=args.mode,
                                           seed=args.seed, batch_size=args.batch_size,
                                           chunk_len=args.chunk_len, progress=True)
        except ValueError as err:
            raise UsageError(f"{args.tokens}: {err}") from None
        curves.append((label, model.config.ctx_len, mean, stderr))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out.with_name(out.name + ".csv"), out.with_name(out.name + ".png")
    with csv_path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["position"] + [f"{label}_{k}" for label, *_ in curves for k in ("loss", "stderr")])
        for t in range(N):
            writer.writerow([t] + [f"{x:.6f}" for _, _, mean, se in curves for x in (mean[t], se[t])])
    plot_positional(png_path, curves, smooth=args.smooth or max(1, N // 64),
                    title=f"loss by position, {args.windows} {args.mode} windows of {Path(args.tokens).name}")
    for label, _, mean, _ in curves:
        print(f"positional: {label}: mean loss {mean.mean():.4f} over positions 0..{N - 1}, "
              f"{mean[-min(N, 64):].mean():.4f} over the last {min(N, 64)}")
    print(f"# wrote {png_path} and {csv_path}", file=sys.stderr)
    return 0


def plot_positional(path, curves, *, smooth: int, title: str) -> None:
    """curves [(label, ctx_len, mean [N], stderr [N])] -> a PNG (matplotlib, no display needed)."""
    from matplotlib.figure import Figure  # matplotlib loads slowly; only this subcommand plots

    fig = Figure(figsize=(8, 4.5), dpi=120)
    ax = fig.add_subplot()
    ctx_lens = set()
    for label, ctx_len, mean, _ in curves:
        width = min(smooth, len(mean))
        y = np.convolve(mean, np.ones(width) / width, mode="valid")  # moving average
        x = np.arange(len(y)) + (width - 1) / 2
        ax.plot(x, y, label=label, linewidth=1.2)
        ctx_lens.add(ctx_len)
    for ctx_len in sorted(ctx_lens):
        if ctx_len < len(curves[0][2]):
            ax.axvline(ctx_len, color="gray", linestyle="--", linewidth=0.8)
            ax.annotate(f"ctx_len {ctx_len}", (ctx_len, 1.0), xycoords=("data", "axes fraction"),
                        xytext=(3, -12), textcoords="offset points", fontsize=8, color="gray")
    ax.set_xlabel("position in the context (tokens)")
    ax.set_ylabel(f"mean loss (nats){'' if smooth <= 1 else f', moving average over {smooth}'}")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def run_verify(args) -> int:
    _require_file(args.checkpoint, "checkpoint")
    tokenizer = tokenizer_for(args.tokenizer, args.checkpoint)
    ids = np.asarray(tokenizer.encode(args.prompt), np.int32)
    T = len(ids)
    if T < 2:
        raise UsageError(f"the prompt has {T} token(s) after tokenization; verify needs at least 2")
    k = args.split if args.split is not None else T // 2
    if not 1 <= k < T:
        raise UsageError(f"--split {k} must be in [1, {T - 1}] for a prompt of {T} tokens")
    model = load_model(args, args.checkpoint)
    tokenizer.check_fits(model.config.vocab_size)
    print(f"# {model}", file=sys.stderr)
    gpt = model(ids)  # [T, V]
    rnn, _ = model.rnn(ids)  # [T, V]
    head, state = model.prefill(ids[:k])  # GPT mode over the first k tokens, keeping the state
    tail, _ = model.rnn(ids[k:], state)
    mixed = jnp.concatenate([head, tail])  # [T, V]
    checks = [
        ("GPT vs RNN", float(jnp.abs(gpt - rnn).max())),
        (f"GPT vs prefill({k})+RNN({T - k})", float(jnp.abs(gpt - mixed).max())),
    ]
    print(f"verify: {T} tokens, logits max |value| {float(jnp.abs(gpt).max()):.3f}")
    for name, diff in checks:
        print(f"  {name:<36s} max |diff| = {diff:.3e}")
    failed = [name for name, diff in checks if not diff <= args.tol]
    if failed:
        print(f"verify: FAILED: {', '.join(failed)} above --tol {args.tol:g}")
        return 1
    print(f"verify: OK (all <= {args.tol:g})")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, ValueError) as err:  # CheckpointError is a ValueError
        print(f"{PROG}: error: {str(err).splitlines()[0] if str(err) else type(err).__name__}",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
