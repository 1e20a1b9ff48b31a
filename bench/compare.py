"""Training step of several checkouts side by side on one GPU: before/after in one lease.

    git worktree add /tmp/before <commit>
    python3 bench/compare.py /tmp/before .            # bf16, L24-D1024, B=8, T=768
    python3 bench/compare.py --smoke . .              # a tiny model on CPU (checks the script)

Each checkout runs in its own process, with its own code first on sys.path: the jitted step of
its `rwkv2_jax.training.trainer.setup` (what `rwkv2-train` runs) from the original
initialisation, on random tokens, XLA's deterministic ops on as `rwkv2-train` runs them. The
processes compile and warm up at the same time (`--parallel` of them at once; each holds its
step's memory, about 14 GiB at the default size), then take turns on the GPU: in each of
`--rounds` rounds every checkout times `--steps` steps, ended by one block, while the others
wait. Interleaving puts the card's drift (clocks, temperature) into every checkout alike, so
the ratio between checkouts holds to about 1% where absolute numbers move ~3% between leases.
tokens/s = steps x B x T / seconds; the table gives the median and range over rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkouts", nargs="+", help="folders of the checkouts to compare, the first is the reference")
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=50277)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--ctx", type=int, default=768)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--steps", type=int, default=10, help="steps per turn (default 10)")
    p.add_argument("--rounds", type=int, default=5, help="turns per checkout (default 5)")
    p.add_argument("--parallel", type=int, default=3, help="processes compiling at once (default 3; GPU memory)")
    p.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=True,
                   help="XLA's deterministic ops, rwkv2-train's default (default on)")
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU")
    p.add_argument("--worker", nargs=2, metavar=("INDEX", "FOLDER"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke:
        args.layers, args.width, args.vocab, args.batch, args.ctx, args.steps, args.rounds = 2, 64, 97, 2, 32, 2, 2
    for c in args.checkouts:
        if not (Path(c) / "rwkv2_jax" / "training" / "trainer.py").is_file():
            p.error(f"{c}: not a checkout of this project (no rwkv2_jax/training/trainer.py)")
    if args.steps < 1 or args.rounds < 1 or args.parallel < 1:
        p.error("--steps, --rounds and --parallel must be >= 1")
    return args


def wait_for(path: Path, alive, timeout: float = 3600.0) -> bool:
    """Until `path` exists: True; False if alive() turns False first (the other process ended)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if path.exists():
            return True
        if not alive():
            return path.exists()
        time.sleep(0.02)
    raise TimeoutError(f"waited {timeout:.0f} s for {path}")


def worker(args) -> None:
    """One checkout's process: compile and warm up, say "ready", then time a turn each time the
    parent says "go" (files in the shared folder)."""
    index, folder = int(args.worker[0]), Path(args.worker[1])
    parent = os.getppid()
    checkout = Path(args.checkouts[index])
    sys.path.insert(0, str(checkout))  # this checkout's code, not the one running the script
    import jax
    import numpy as np

    result = {}
    try:
        from rwkv2_jax.config import RWKVConfig
        from rwkv2_jax.training import trainer as tr
        from rwkv2_jax.training.sharding import make_mesh

        config = RWKVConfig(n_layer=args.layers, n_embd=args.width, vocab_size=args.vocab, ctx_len=args.ctx)
        cfg = tr.TrainConfig(ctx_len=args.ctx, batch_size=args.batch, epochs=1, epoch_steps=10**6,
                             lr_init=1e-4, lr_final=1e-5, dtype=args.dtype)
        s = tr.setup(config, cfg, make_mesh(1, 1))
        t0 = time.perf_counter()
        state = s.init_state(tr.initial_params(config, seed=0))  # the original initialisation
        rng = np.random.default_rng(0)
        batches = [s.put_batch(rng.integers(0, args.vocab, (1, args.batch, args.ctx + 1)).astype(np.int32))
                   for _ in range(3)]
        for i in range(2):
            state, m = s.train_step(state, batches[i % 3])
        jax.block_until_ready(m)
        result["warmup_s"] = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - reported in the table; the other checkouts go on
        result["error"] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"
        print(json.dumps(result), flush=True)
        return
    (folder / f"ready{index}").write_text("1")
    speeds = []
    for r in range(args.rounds):
        if not wait_for(folder / f"go{index}.{r}", lambda: os.getppid() == parent):
            return  # the parent is gone
        t0 = time.perf_counter()
        for i in range(args.steps):
            state, m = s.train_step(state, batches[i % 3])
        float(m["loss"])  # blocks on the last step
        speeds.append(args.steps * args.batch * args.ctx / (time.perf_counter() - t0))
        (folder / f"done{index}.{r}").write_text("1")
    stats = jax.devices()[0].memory_stats() or {}
    result.update(tokens_per_s=speeds, peak_gib=stats.get("peak_bytes_in_use", float("nan")) / 2**30,
                  card=jax.devices()[0].device_kind)
    print(json.dumps(result), flush=True)


def commit_of(folder: str) -> str:
    r = subprocess.run(["git", "-C", folder, "log", "-1", "--format=%h"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", folder, "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return (r.stdout.strip() or "?") + ("+changes" if dirty else "")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.deterministic and "xla_gpu_deterministic_ops" not in env.get("XLA_FLAGS", ""):
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_gpu_deterministic_ops=true".strip()
    env.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # several processes share the GPU
    n = len(args.checkouts)
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S')}  L{args.layers}-D{args.width} V={args.vocab} B={args.batch} "
          f"T={args.ctx} {args.dtype}, deterministic ops={args.deterministic}, {args.rounds} rounds of "
          f"{args.steps} steps", flush=True)
    checkouts = [str(Path(c).resolve()) for c in args.checkouts]
    argv0 = [sys.executable, str(Path(__file__).resolve()), *checkouts, "--layers", str(args.layers),
             "--width", str(args.width), "--vocab", str(args.vocab), "--batch", str(args.batch),
             "--ctx", str(args.ctx), "--dtype", args.dtype, "--steps", str(args.steps), "--rounds", str(args.rounds)]
    with TemporaryDirectory() as folder:
        procs = []
        for i in range(n):
            if i >= args.parallel:  # the next start waits until an earlier checkout is warm (or failed)
                earlier = procs[i - args.parallel]
                wait_for(Path(folder, f"ready{i - args.parallel}"), lambda: earlier.poll() is None)
            # Output to files, not pipes: a full pipe would stall a worker that nobody reads yet.
            with open(Path(folder, f"out{i}"), "w") as out, open(Path(folder, f"err{i}"), "w") as err:
                procs.append(subprocess.Popen(argv0 + ["--worker", str(i), folder], stdout=out, stderr=err, env=env))

        def running(p):
            return lambda: p.poll() is None

        ready = [wait_for(Path(folder, f"ready{i}"), running(p)) for i, p in enumerate(procs)]
        for r in range(args.rounds):  # turns: one checkout on the GPU at a time
            for i, p in enumerate(procs):
                if ready[i]:
                    Path(folder, f"go{i}.{r}").write_text("1")
                    ready[i] = wait_for(Path(folder, f"done{i}.{r}"), running(p))
        results = []
        for i, p in enumerate(procs):
            p.wait()
            out, err = (Path(folder, f"{name}{i}").read_text() for name in ("out", "err"))
            lines = [line for line in out.splitlines() if line.startswith("{")]
            results.append(json.loads(lines[-1]) if lines else
                           {"error": " | ".join((err or out).strip().splitlines()[-3:])[:300]})
    first = statistics.median(results[0]["tokens_per_s"]) if "tokens_per_s" in results[0] else None
    print(f"# card: {next((r['card'] for r in results if 'card' in r), '?')}")
    print("\n| checkout | commit | tokens/s (median) | range over rounds | vs first | peak GiB | warm-up s |")
    print("|---|---|---|---|---|---|---|")
    for c, r in zip(args.checkouts, results):
        if "tokens_per_s" not in r:
            print(f"| {c} | {commit_of(c)} | failed: {r.get('error', '?')} | | | | |")
            continue
        med = statistics.median(r["tokens_per_s"])
        vs = f"{med / first:.3f}" if first else "–"
        print(f"| {c} | {commit_of(c)} | {med:,.0f} | {min(r['tokens_per_s']):,.0f}–{max(r['tokens_per_s']):,.0f} "
              f"| {vs} | {r['peak_gib']:.2f} | {r['warmup_s']:.0f} |")
    return 0 if all("tokens_per_s" in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
