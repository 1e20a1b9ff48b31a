"""Training throughput and peak GPU memory: the train step of train.py on random tokens.

    python3 bench/train.py                       # L24-D1024, V=50277, B=8, T=768: bf16 and fp32, one GPU
    python3 bench/train.py --scaling             # bf16 on 1 GPU, then data-parallel on every GPU (B=8 per GPU)
    python3 bench/train.py --long-context        # bf16 at T = 768, 4,096, 8,192 and 16,384, ~6-8k tokens a step
    python3 bench/train.py --agreement           # also: the bf16 gradient against the float32 one
    python3 bench/train.py --smoke               # a tiny model on CPU (checks the script)

Each configuration runs in its own subprocess, so its peak memory (the device's
`peak_bytes_in_use`) is its own and compiles do not add up. A configuration: the jitted
step of `rwkv2_jax.training.trainer.setup` (Adam, clipping, float32 parameters and optimizer
state, the given compute dtype, the chosen WKV), `--warmup` steps (compile), then
`--steps` timed steps ended by one block; tokens/s = steps x B x T / seconds. XLA's
deterministic ops are on, as `rwkv2-train` runs by default (`--no-deterministic`: off).
Before timing, a check on a small model: the step with the chosen WKV against the step
with the plain-JAX WKV (loss and gradient norm, float32 with exact matmuls).

`--agreement` compares the bf16 step's loss and gradient with the float32 step's (exact float32
matmuls) at the benchmarked size, on random weights at the scales of a trained model, and
checks them against the tolerances in `AGREEMENT` (docs/training.md, "Precision").
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: this checkout first
# jax and the package are imported inside the functions that run in the per-configuration
# subprocesses (--one): the parent process only spawns them and prints their results.


# bf16 against float32 (exact matmuls), bench/train.py --agreement: the loss's relative
# difference, and the gradient's relative L2 difference ||g16 - g32|| / ||g32||, whole and for
# the worst parameter. An H100 at L24-D1024 measures 1.9e-5, 4.3e-2 and 6.4e-2 (docs/PERF.md).
AGREEMENT = {"loss": 1e-3, "gradient": 6e-2, "per parameter": 1e-1}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=24)
    p.add_argument("--width", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=50277)
    p.add_argument("--batch", type=int, default=8, help="rows per GPU (default 8)")
    p.add_argument("--ctx", type=int, default=768)
    p.add_argument("--dtypes", default="bfloat16,float32", help="compute dtypes to time (default both)")
    p.add_argument("--wkv-impl", default="auto", help="auto (Pallas on GPU) | pallas | reference")
    p.add_argument("--precision", default="default", help="matmul precision (default: JAX's, TF32 for float32)")
    p.add_argument("--remat", action="store_true")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--scaling", action="store_true", help="bf16 on 1 GPU and on all GPUs (data parallel)")
    p.add_argument("--no-check", action="store_true")
    p.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=True,
                   help="XLA's deterministic ops, rwkv2-train's default (default on)")
    p.add_argument("--long-context", action="store_true",
                   help="bf16 rows (T, B): (768, 8), (4096, 2), (8192, 1), (16384, 1), each against T = 768")
    p.add_argument("--agreement", action="store_true",
                   help="also compare the bf16 step's loss and gradient with the float32 step's (exact matmuls)")
    p.add_argument("--determinism", action="store_true",
                   help="also repeat a small step from one state, without and with --xla_gpu_deterministic_ops")
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # internal: run one config, print JSON
    args = p.parse_args(argv)
    if args.smoke:
        args.layers, args.width, args.vocab, args.batch, args.ctx = 2, 64, 97, 2, 32
        args.warmup, args.steps = 1, 2
    return args


def long_context_rows(args):
    """(T, B) of --long-context: T = 768 at the batch given, then about as many tokens a step
    at longer T (--smoke: the same pattern at tiny T)."""
    if args.smoke:
        return [(args.ctx, args.batch), (2 * args.ctx, 1)]
    return [(args.ctx, args.batch), (4096, 2), (8192, 1), (16384, 1)]


def check(args) -> str:  # runs in a subprocess (--one check)
    """The training step with args.wkv_impl vs with the plain-JAX WKV, on a small model."""
    import jax
    import numpy as np

    import rwkv2_jax as rw
    from rwkv2_jax.training import trainer as tr
    from rwkv2_jax.training.sharding import make_mesh

    C, T = min(128, args.width), min(128, args.ctx)  # L2-D128, T = 128; smaller for --smoke
    config = rw.RWKVConfig(n_layer=2, n_embd=C, vocab_size=97)
    model = rw.init(config, seed=0, wkv_impl="reference")
    # Random weights everywhere (the original init zeroes several), so every path is exercised.
    leaves, treedef = jax.tree.flatten(jax.device_get(model.params))
    r = np.random.default_rng(0)
    params = jax.tree.unflatten(treedef, [x + 0.1 * r.standard_normal(x.shape).astype(np.float32) for x in leaves])
    windows = r.integers(0, 97, (1, 8, T + 1)).astype(np.int32)
    out = {}
    for impl in ("reference", args.wkv_impl):
        cfg = tr.TrainConfig(ctx_len=T, batch_size=8, epochs=1, epoch_steps=2, dtype="float32",
                             precision="highest", wkv_impl=impl)
        s = tr.setup(config, cfg, make_mesh(1, 1))
        _, m = s.train_step(s.init_state(params), s.put_batch(windows))
        out[impl] = (float(m["loss"]), float(m["grad_norm"]))
    (l0, g0), (l1, g1) = out["reference"], out[args.wkv_impl]
    dl, dg = abs(l1 - l0) / abs(l0), abs(g1 - g0) / abs(g0)
    ok = dl < 1e-5 and dg < 1e-4
    return (f"check {args.wkv_impl} vs reference (L2-D{C}, B=8, T={T}, float32): loss {l1:.6f} vs {l0:.6f} "
            f"(rel {dl:.1e}), grad norm rel {dg:.1e}: {'OK' if ok else 'MISMATCH'}")


def agreement(args) -> str:  # runs in a subprocess (--one agreement)
    """The bf16 loss and gradient against float32 with exact matmuls, at the benchmarked size,
    one batch of random tokens, random weights at a trained model's scales."""
    import jax
    import numpy as np

    from bench.decode import random_params
    from rwkv2_jax.config import RWKVConfig
    from rwkv2_jax.training import trainer as tr

    config = RWKVConfig(n_layer=args.layers, n_embd=args.width, vocab_size=args.vocab, ctx_len=args.ctx)
    params = random_params(config, seed=0)
    tokens = np.random.default_rng(0).integers(0, args.vocab, (args.batch, args.ctx + 1)).astype(np.int32)
    out = {}
    for dtype, precision in (("bfloat16", None), ("float32", "highest")):
        cfg = tr.TrainConfig(ctx_len=args.ctx, batch_size=args.batch, dtype=dtype, precision=precision,
                             wkv_impl=args.wkv_impl, remat=args.remat)
        module = tr.make_module(config, cfg)
        grad_fn = jax.jit(jax.value_and_grad(lambda p, x, y: tr.loss_fn(module, p, x, y)))
        loss, grads = grad_fn(params, tokens[:, :-1], tokens[:, 1:])
        out[dtype] = float(loss), jax.tree_util.tree_flatten_with_path(jax.device_get(grads))[0]
    (l16, g16), (l32, g32) = out["bfloat16"], out["float32"]
    diff = {}  # parameter -> (squared L2 of bf16 - float32, squared L2 of float32)
    for (path, a), (_, b) in zip(g16, g32):
        b = b.astype(np.float64)
        diff["/".join(str(getattr(k, "key", k)) for k in path)] = (float(np.sum((a - b) ** 2)), float(np.sum(b * b)))
    whole = math.sqrt(sum(d for d, _ in diff.values()) / sum(n for _, n in diff.values()))
    worst, (d, n) = max(diff.items(), key=lambda kv: kv[1][0] / max(kv[1][1], 1e-300))
    leaf = math.sqrt(d / max(n, 1e-300))
    dl = abs(l16 - l32) / abs(l32)
    ok = dl <= AGREEMENT["loss"] and whole <= AGREEMENT["gradient"] and leaf <= AGREEMENT["per parameter"]
    return (f"agreement bf16 vs float32 (L{args.layers}-D{args.width}, B={args.batch}, T={args.ctx}): loss {l16:.5f} "
            f"vs {l32:.5f} (rel {dl:.1e}), gradient rel L2 {whole:.2e}, worst parameter {worst} {leaf:.2e}: "
            f"{'OK' if ok else 'OUTSIDE'} (tolerances {AGREEMENT})")


def determinism(args) -> str:  # runs in a subprocess (--one determinism)
    """Repeat one train step from the same state: bit-identical parameters every time?
    (A resumed run is bit-exact only if every step is.)"""
    import jax
    import numpy as np

    import rwkv2_jax as rw
    from rwkv2_jax.training import trainer as tr
    from rwkv2_jax.training.sharding import make_mesh

    config = rw.RWKVConfig(n_layer=2, n_embd=128, vocab_size=97)
    params = jax.device_get(rw.init(config, seed=0, wkv_impl="reference").params)
    cfg = tr.TrainConfig(ctx_len=128, batch_size=8, epochs=1, epoch_steps=2, wkv_impl=args.wkv_impl)
    s = tr.setup(config, cfg, make_mesh(1, 1))
    windows = s.put_batch(np.random.default_rng(0).integers(0, 97, (1, 8, 129)).astype(np.int32))
    runs = [jax.tree.leaves(jax.device_get(s.train_step(s.init_state(params), windows)[0].params))
            for _ in range(4)]
    differ = sum(any(not np.array_equal(a, b) for a, b in zip(runs[0], r)) for r in runs[1:])
    flags = os.environ.get("XLA_FLAGS", "") or "none"
    return f"determinism (XLA_FLAGS={flags}): {3 - differ}/3 repeats of a step bit-identical to the first"


def one(args, dtype: str, n_devices: int) -> dict:
    """Time one configuration in this process."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from rwkv2_jax.training import trainer as tr
    from rwkv2_jax.config import RWKVConfig
    from rwkv2_jax.model import RWKV
    from rwkv2_jax.training.sharding import make_mesh

    config = RWKVConfig(n_layer=args.layers, n_embd=args.width, vocab_size=args.vocab, ctx_len=args.ctx)
    B = args.batch * n_devices
    cfg = tr.TrainConfig(ctx_len=args.ctx, batch_size=B, epochs=1, epoch_steps=args.warmup + args.steps + 1,
                         lr_init=1e-4, lr_final=1e-5, dtype=dtype,
                         precision=None if args.precision == "default" else args.precision,
                         wkv_impl=args.wkv_impl, remat=args.remat)
    mesh = make_mesh(n_devices, 1, jax.devices()[:n_devices])
    s = tr.setup(config, cfg, mesh)
    t0 = time.perf_counter()
    init = jax.jit(lambda key: tr.init_train_state(
        RWKV(config).init(key, jnp.zeros((1, 1), jnp.int32))["params"], s.optimizer),
        out_shardings=s.state_shardings)
    state = init(jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    batches = [s.put_batch(rng.integers(0, args.vocab, (1, B, args.ctx + 1)).astype(np.int32)) for _ in range(3)]
    for i in range(args.warmup):
        state, m = s.train_step(state, batches[i % 3])
    jax.block_until_ready(m)
    t_compile = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(args.steps):
        state, m = s.train_step(state, batches[i % 3])
    loss = float(m["loss"])  # blocks on the last step
    dt = time.perf_counter() - t0
    stats = jax.devices()[0].memory_stats() or {}
    return {
        "dtype": dtype, "devices": n_devices, "batch": B, "ctx": args.ctx, "remat": args.remat,
        "deterministic": "xla_gpu_deterministic_ops=true" in os.environ.get("XLA_FLAGS", ""),
        "wkv_impl": tr.resolve_wkv_impl(args.wkv_impl), "precision": args.precision,
        "tokens_per_s": args.steps * B * args.ctx / dt, "step_ms": 1000 * dt / args.steps,
        "peak_gib": stats.get("peak_bytes_in_use", float("nan")) / 2**30, "warmup_s": t_compile,
        "loss": loss, "card": jax.devices()[0].device_kind,
    }


def spawn(args, what: str, ctx=None, batch=None, remat=None, deterministic=None) -> dict:
    """Run `--one what` in a fresh process (the parent never touches the GPU)."""
    remat = args.remat if remat is None else remat
    deterministic = args.deterministic if deterministic is None else deterministic
    argv = [sys.executable, __file__, "--one", what, "--layers", str(args.layers),
            "--width", str(args.width), "--vocab", str(args.vocab), "--batch", str(batch or args.batch),
            "--ctx", str(ctx or args.ctx), "--wkv-impl", args.wkv_impl, "--precision", args.precision,
            "--warmup", str(args.warmup), "--steps", str(args.steps)] + (["--remat"] if remat else [])
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if deterministic and "xla_gpu_deterministic_ops" not in env.get("XLA_FLAGS", ""):
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_gpu_deterministic_ops=true".strip()
    r = subprocess.run(argv, capture_output=True, text=True, env=env)
    lines = [line for line in r.stdout.splitlines() if line.startswith("{")]
    if r.returncode != 0 or not lines:
        tail = (r.stderr or r.stdout).strip().splitlines()[-8:]
        return {"what": what, "error": " | ".join(tail)}
    return json.loads(lines[-1])


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one == "check":
        import jax

        print(json.dumps({"check": check(args), "n_devices": len(jax.devices()), "jax": jax.__version__,
                          "card": jax.devices()[0].device_kind}), flush=True)
        return 0
    if args.one == "agreement":
        print(json.dumps({"agreement": agreement(args)}), flush=True)
        return 0
    if args.one == "determinism":
        print(json.dumps({"determinism": determinism(args)}), flush=True)
        return 0
    if args.one:
        dtype, n = args.one.split(":")
        print(json.dumps(one(args, dtype, int(n))), flush=True)
        return 0

    info = spawn(args, "check")
    if "error" in info:
        print(f"# check failed: {info['error']}")
        return 1
    n_gpu = info["n_devices"]
    print(f"# {time.strftime('%Y-%m-%d %H:%M:%S')}  jax {info['jax']}  {n_gpu} x {info['card']}")
    print(f"# model L{args.layers}-D{args.width} V={args.vocab}, B={args.batch} per device, T={args.ctx}, "
          f"wkv_impl={args.wkv_impl}, precision={args.precision}, remat={args.remat}, "
          f"deterministic ops={args.deterministic}")
    if not args.no_check:
        print("# " + info["check"], flush=True)
    if args.agreement:
        r = spawn(args, "agreement")
        print("# " + r.get("agreement", f"agreement check failed: {r.get('error')}"), flush=True)
    if args.determinism:
        saved = os.environ.get("XLA_FLAGS", "")
        for flags in (saved, f"{saved} --xla_gpu_deterministic_ops=true".strip()):
            os.environ["XLA_FLAGS"] = flags
            r = spawn(args, "determinism", deterministic=False)  # the flags as set here
            print("# " + r.get("determinism", f"determinism check failed: {r.get('error')}"), flush=True)
        os.environ["XLA_FLAGS"] = saved
    # (dtype, GPUs, T, rows per GPU, remat) per configuration
    if args.scaling:
        runs = [("bfloat16", 1, args.ctx, args.batch, args.remat), ("bfloat16", n_gpu, args.ctx, args.batch, args.remat)]
    elif args.long_context:
        runs = [("bfloat16", 1, T, B, args.remat) for T, B in long_context_rows(args)]
    else:
        runs = [(d, 1, args.ctx, args.batch, args.remat) for d in args.dtypes.split(",")]
    results = []
    for d, n, ctx, batch, remat in runs:
        results.append(spawn(args, f"{d}:{n}", ctx=ctx, batch=batch, remat=remat))
        print(f"# {json.dumps(results[-1])}", flush=True)
    first = results[0].get("tokens_per_s")
    print("\n| compute dtype | GPUs | global batch | T | remat | WKV | tokens/s | vs first row | ms/step "
          "| peak GiB (GPU 0) | warm-up s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for (d, n, ctx, batch, remat), r in zip(runs, results):
        if "error" in r:
            print(f"| {d} | {n} | {batch * n} | {ctx} | {remat} | – | failed: {r['error'][:300]} | | | | |")
            continue
        vs = f"{r['tokens_per_s'] / first:.0%}" if first else "–"
        print(f"| {r['dtype']} | {r['devices']} | {r['batch']} | {r['ctx']} | {r['remat']} | {r['wkv_impl']} | "
              f"{r['tokens_per_s']:,.0f} | {vs} | {r['step_ms']:.1f} | {r['peak_gib']:.1f} | {r['warmup_s']:.0f} |")
    ok = [r for r in results if "error" not in r]
    if args.scaling and len(ok) == 2 and ok[1]["devices"] > 1:
        eff = ok[1]["tokens_per_s"] / (ok[1]["devices"] * ok[0]["tokens_per_s"])
        print(f"\nscaling 1 -> {ok[1]['devices']} GPUs (B={args.batch} per GPU): {eff:.1%} efficiency")
    return 0 if len(ok) == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
