"""Generation throughput: rw.generate's decode loop and its prefill, float32 and bfloat16.

    python bench/decode.py                 # on a GPU: L24-D1024, random weights (V=50277)
    python bench/decode.py --cpu           # CPU: a small model, ours vs the PyTorch reference (decode and GPT mode)
    python bench/decode.py --sweep-fused   # GPU: block sizes of the fused decode kernels, no table
    python bench/decode.py --sweep-batches 2,4,8,16   # GPU: the decode step's variants per batch size
    python bench/decode.py --dtypes bfloat16 --batches 1,8 --rows "greedy, one|top_p"   # some rows only

GPU rows (per weight dtype; bfloat16 = matrices in bf16, vectors, state and WKV float32):
* decode, B=1 and B=64: `generate(model, prompts, N, temperature=0)` with 1-token prompts,
  timed end to end (one RNN step of prefill, N steps in one jitted lax.while_loop, the
  copy of the ids to the host); tokens/s = B * N / seconds; at B=1 also the same greedy
  steps as a jitted loop of 64 RNN steps + argmax from a prefilled state (the step alone:
  what `generate` adds per token is the difference, in the same process);
* decode with the loop on the host (a Python loop of jitted steps) instead of one
  lax.while_loop, and decode with sampling (top_p=0.7, temperature=1, as sample.py's
  defaults), bf16 only;
* prefill: `prompt_logits(model, [prompt])` of T + 1 tokens (T in GPT mode, in chunks of 1024
  carrying the state, then one RNN step for the last token's logits): the state after the
  prompt; tokens/s = (T + 1) / seconds. And, bf16 only, 8 prompts of T/2 .. T tokens in one
  batch (right-padded chunks: the kernel with `lengths`); tokens/s counts real tokens.
First a correctness check on a small model (batched == one by one; chunked prefill ==
one-shot GPT mode), and at full size the decode step as fused Pallas kernels
(pallas_kernels.decode, the default on a GPU) against the per-operation step; the table has
a batch-1 row of the latter (`decode_options=DecodeOptions(fused=False)`). The "ms" column is
per decode step, or per prefill call. Every timing is the median of --repeats runs after a
warm-up (compile) run, each blocked on once at its end.

CPU rows (--cpu), the same random release-format float32 weights in one process: batch-1
greedy decode by `generate` and by the PyTorch reference (rwkv2_jax.testing.torch_reference:
TorchRWKV2.rnn one token at a time + argmax, a user of the original code's RNN loop), and GPT
mode over --cpu-gpt-len tokens by both; then the memory-bandwidth floor of a decode step (its
weight bytes over this machine's copy bandwidth). Run it at a vocabulary-dominated shape (the
default) and a layer-dominated one (e.g. --cpu-layers 12 --cpu-width 768 --cpu-vocab 1000).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: this checkout's packages and bench/ first


import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import rwkv2_jax as rw  # noqa: E402
from bench.timing import median_time  # noqa: E402
from pallas_kernels.decode import MAX_BATCH, DecodeBlockSizes, LayerBlockSizes  # noqa: E402
from rwkv2_jax.generation import generator  # noqa: E402
from rwkv2_jax.generation.generator import generate, prompt_logits, with_weight_dtype  # noqa: E402
from rwkv2_jax.generation.step import DecodeOptions, decode_params, rnn_step, spec_of  # noqa: E402
from rwkv2_jax.model import RWKV  # noqa: E402
from rwkv2_jax.xla import DECODE_COMPILER_OPTIONS, compiler_options  # noqa: E402


def random_params(config, seed: int):
    """Random float32 params of RWKV(config), made on the device, with the scales of a trained
    model (not zeros: zeros can time faster than real data)."""
    shapes = jax.eval_shape(lambda: RWKV(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    base = jax.random.key(seed)
    out = []
    for i, (path, leaf) in enumerate(leaves):
        name = str(getattr(path[-1], "key", path[-1]))
        key = jax.random.fold_in(base, i)
        shape = leaf.shape
        if len(shape) == 2:  # embedding, linear kernels [in, out], head
            x = jax.random.normal(key, shape) * (0.5 if name == "embedding" else 1.0 / math.sqrt(shape[0]))
        elif name == "time_decay":
            x = jax.random.uniform(key, shape, minval=-3.0, maxval=1.5)
        elif name == "time_first":
            x = math.log(0.3) + 0.1 * jax.random.normal(key, shape)
        elif name == "time_mix":
            x = jax.random.uniform(key, shape)
        elif name == "scale":
            x = 1.0 + 0.1 * jax.random.normal(key, shape)
        else:  # LayerNorm bias
            x = 0.1 * jax.random.normal(key, shape)
        out.append(x.astype(jnp.float32))
    return jax.tree_util.tree_unflatten(treedef, out)


WIDTHS = (9, 3, 44, 10, 9)


def row(cols):
    return "| " + " | ".join(f"{c:>{w}}" if i in (1, 3, 4) else f"{c:<{w}}"
                             for i, (c, w) in enumerate(zip(cols, WIDTHS))) + " |"


def parse_size(name: str):
    """A preset name, or "L<layers>-D<width>" (vocab 50277) or "L<layers>-D<width>-V<vocab>"."""
    if name in rw.PRESETS:
        return rw.PRESETS[name]
    m = re.fullmatch(r"L(\d+)-D(\d+)(?:-V(\d+))?", name)
    if not m:
        raise SystemExit(f"decode.py: error: --preset must be one of {sorted(rw.PRESETS)} or L<n>-D<c>[-V<v>], "
                         f"got {name!r}")
    vocab = {} if m.group(3) is None else dict(vocab_size=int(m.group(3)))
    return rw.RWKVConfig(n_layer=int(m.group(1)), n_embd=int(m.group(2)), **vocab)


def gpu_checks(log):
    """Small model: the properties the tests check on CPU, here on the accelerator."""
    from rwkv2_jax.testing.release_checkpoint import make_release_state_dict  # torch: an optional dependency

    sd = make_release_state_dict(n_layer=3, n_embd=64, vocab_size=97, seed=1)
    model = rw.from_release_arrays({k: v.numpy() for k, v in sd.items()})
    ref = model.replace(wkv_impl="reference")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, 97, n).tolist() for n in (1, 6, 40, 300)]
    batch = generate(model, prompts, 12, temperature=0, chunk_size=64)
    alone = [generate(model, [p], 12, temperature=0, chunk_size=64)[0] for p in prompts]
    log(f"# check: batched greedy == one by one: {batch == alone}")
    logits, state = prompt_logits(model, [prompts[3]], chunk_size=64)  # 4 full chunks (default WKV) + a padded one
    one_logits, one_state = ref.prefill([prompts[3]])
    err = float(np.max(np.abs(np.asarray(logits[0]) - np.asarray(one_logits[0, -1]))))
    serr = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b)) / (1e-3 + np.abs(np.asarray(b)))))
               for a, b in zip(state, one_state))
    log(f"# check: chunked prefill ({model.wkv_impl}) vs one-shot (reference WKV): max |dlogit| {err:.2e}, "
        f"max state rel err {serr:.2e}")
    return batch == alone and err < 1e-3


def fused_check(models, prompt, log):
    """The decode step as fused Pallas kernels vs the per-operation step, full size, on the GPU:
    one step from the state after 9-token prompts, B = 1 and 2 (rows differ)."""
    step = jax.jit(rnn_step, static_argnums=0)
    ok = True
    for name, model in models.items():
        spec = spec_of(model)
        for B in (1, 2):
            _, state = prompt_logits(model, [prompt[i: i + 9] for i in range(B)])
            token = jnp.asarray(prompt[9: 9 + B], jnp.int32)
            want = step(spec_of(model, DecodeOptions(fused=False)), decode_params(model), token, state)
            got = step(spec, decode_params(model), token, state)
            errs = {}
            for f, a, b in [("logits", got[0], want[0]),
                            *zip(("x_att", "x_ffn", "aa", "bb", "pp"), got[1], want[1])]:
                a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
                errs[f] = float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
            tol = 1e-5 if name == "float32" else 2e-2
            good = errs["logits"] <= tol and errs["x_att"] <= tol and errs["x_ffn"] <= tol  # NaN fails
            ok &= good
            log(f"# check: fused vs per-operation decode step, {name}, B={B}: "
                + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()) + (" PASS" if good else " FAIL"))
    return ok


def parse_blocks(spec: str, flag: str = "--sweep-blocks"):
    """"4x512,2x256x8,2x256/1x256/2x256x2/2x2048" -> [DecodeBlockSizes(4, 512),
    DecodeBlockSizes(2, 256, num_warps=8), LayerBlockSizes(...)]: OUTxIN[xWARPS] for all four
    kernels of a layer, or four of them joined by / for time_mix_in/att_out/channel_mix_in/ffn_out."""
    def one(item):
        nums = [int(v) for v in item.split("x")]
        if not 2 <= len(nums) <= 3:
            raise ValueError("two or three numbers")
        return DecodeBlockSizes(*nums[:2], **({"num_warps": nums[2]} if len(nums) > 2 else {}))

    out = []
    for item in filter(None, spec.split(",")):
        try:
            parts = [one(part) for part in item.split("/")]
            if len(parts) not in (1, 4):
                raise ValueError("one block size, or four joined by /")
            out.append(parts[0] if len(parts) == 1 else LayerBlockSizes(*parts))
        except (ValueError, TypeError) as err:
            raise SystemExit(f"{flag}: {item!r} is not OUTxIN[xWARPS] (powers of two) or four of them joined "
                             f"by / ({err})")
    return out


def blocks_label(blocks) -> str:
    """DecodeBlockSizes -> "2x256x4" (OUTxINxWARPS); LayerBlockSizes -> the four kernels' joined by /."""
    if not isinstance(blocks, DecodeBlockSizes):
        return "/".join(blocks_label(b) for b in blocks)
    return f"{blocks.block_out}x{blocks.block_in}x{blocks.num_warps}"


def greedy_steps(spec, steps: int):
    """jit of (dparams, token [B], state) -> (token, state) after `steps` greedy RNN steps
    (rnn_step + argmax) in one fori_loop: the decode step itself, without generate's sampling,
    bookkeeping and set-up. dparams is an argument: closed over, jit would make it a constant."""
    def body(dparams, _, carry):
        token, st = carry
        logits, st = rnn_step(spec, dparams, token, st)
        return jnp.argmax(logits, -1).astype(jnp.int32), st

    # compiled as rw.generate compiles its decode loops (rwkv2_jax.xla.DECODE_COMPILER_OPTIONS)
    return jax.jit(lambda dparams, token, state: jax.lax.fori_loop(
        0, steps, functools.partial(body, dparams), (token, state)),
        compiler_options=compiler_options(options=DECODE_COMPILER_OPTIONS))


def sweep_fused(model, log, steps=64, blocks_list=None, gen_tokens=512):
    """ms per RNN step (bf16, B = 1) of a jitted loop of greedy steps, per block sizes (a
    DecodeBlockSizes for all four kernels of a layer or a LayerBlockSizes; blocks_list: these
    instead of the default list), with and without the L2 hints and the resident output
    matrices; then rw.generate's (gen_tokens and a quarter of them)."""
    _, state0 = prompt_logits(model, [[1, 2, 3]])
    dparams = decode_params(model)
    default = LayerBlockSizes()
    variants = [("per-operation step", dict(fused=False)), (f"fused {blocks_label(default)} (default)", {}),
                ("fused, no L2 hints (XLA's head)", dict(stream_weights=False)),
                ("fused, no resident output matrices", dict(resident_out_bytes=0))]
    for b in blocks_list or (DecodeBlockSizes(), DecodeBlockSizes(num_warps=8), DecodeBlockSizes(block_out=4, block_in=512),
                             DecodeBlockSizes(block_out=2, block_in=512), DecodeBlockSizes(block_out=4, block_in=256)):
        if b != default:
            variants.append((f"fused {blocks_label(b)}", dict(fused_blocks=b)))
    one = jax.jit(rnn_step, static_argnums=0)
    token0 = jnp.ones((1,), jnp.int32)
    for name, change in variants:
        t0 = time.perf_counter()
        spec = spec_of(model, DecodeOptions(**change))
        f = functools.partial(greedy_steps(spec, steps), dparams, jnp.zeros((1,), jnp.int32))
        jax.block_until_ready(f(state0))
        # one step from the same state vs the per-operation step (bf16: rounding apart)
        logits = one(spec, dparams, token0, state0)[0]
        fused = change.get("fused", True)
        if not fused:
            ref = logits
        dev = float(jnp.linalg.norm(logits - ref) / jnp.linalg.norm(ref))
        jaxpr = jax.make_jaxpr(rnn_step, static_argnums=0)(spec, dparams, token0, state0).jaxpr
        kernels = sum(e.primitive.name == "pallas_call" and "decode_" in str(e.params.get("name", ""))
                      for e in jaxpr.eqns)
        sec = median_time(lambda: jax.block_until_ready(f(state0)), 5)
        # bf16 rounding apart (below 1e-2); and the fused kernels must be what ran
        verdict = "PASS" if dev < 5e-2 and (kernels > 0) == fused else f"FAIL ({kernels} fused kernels)"
        log(f"| {name} | {1e3 * sec / steps:.3f} | {steps / sec:,.0f} |  ({time.perf_counter() - t0:.0f} s; "
            f"one step's logits vs the per-operation step's: rel. {dev:.1e} {verdict})")
    # rw.generate around the default step: its loop's steps per iteration, and the cost
    # that does not grow with the tokens (from two lengths).
    per_iter = generator.DEVICE_STEPS_PER_ITER
    try:
        for k, n in ((4, gen_tokens), (per_iter, gen_tokens), (per_iter, max(gen_tokens // 4, 1))):
            generator.DEVICE_STEPS_PER_ITER = k
            t0 = time.perf_counter()
            run_decode(model, [[1]], n, dict(temperature=0))
            sec = median_time(functools.partial(run_decode, model, [[1]], n, dict(temperature=0)), 5)
            log(f"| rw.generate, {n} tokens, {k} steps per loop iteration | {1e3 * sec / n:.3f} | {n / sec:,.0f} "
                f"|  ({time.perf_counter() - t0:.0f} s)")
    finally:
        generator.DEVICE_STEPS_PER_ITER = per_iter


SWEEP_VARIANTS = ("ops", "pad16", "fused")  # --sweep-variants: sweep_batches' rows, in order


def sweep_batches(model, log, batches, steps=32, fused_up_to=4, only=SWEEP_VARIANTS):
    """ms per RNN step (bf16) of a jitted loop of greedy steps at each batch size: the
    per-operation step unpadded, the same with the rows padded to 16 (DecodeOptions.pad_rows; at
    5-15 rows only), and the fused kernels (pallas_kernels.decode, with the block sizes the step
    takes by default at that batch size) up to `fused_up_to` rows: the measurements behind
    FUSED_MAX_BATCH and PAD_ROWS (rwkv2_jax.generation.step). Each variant's kernels and
    one-step logits are checked (against the first variant's). only: the variants to time, by
    their SWEEP_VARIANTS keys (in that order)."""
    dparams = decode_params(model)
    one = jax.jit(rnn_step, static_argnums=0)
    variants = {  # SWEEP_VARIANTS key -> (row name, DecodeOptions, rows timed)
        "ops": ("per-operation step", dict(fused=False, pad_rows=()), None),
        "pad16": ("per-operation step, rows padded to 16", dict(fused=False, pad_rows=((5, 15, 16),)), (5, 15)),
        "fused": ("fused kernels", dict(fused=True, fused_max_batch=MAX_BATCH), (1, fused_up_to)),
    }
    assert tuple(variants) == SWEEP_VARIANTS
    variants = [variants[key] for key in SWEEP_VARIANTS if key in only]
    for B in batches:
        _, state0 = prompt_logits(model, [[1, 2, 3]] * B)
        token0 = jnp.ones((B,), jnp.int32)
        ref = None
        for name, options, rows in variants:
            fused = options["fused"]
            if rows is not None and not rows[0] <= B <= rows[1]:
                log(f"| {B} | {name} | not timed | (timed at {rows[0]}-{rows[1]} rows) |")
                continue
            t0 = time.perf_counter()
            spec = spec_of(model, DecodeOptions(**options))
            f = functools.partial(greedy_steps(spec, steps), dparams)
            jax.block_until_ready(f(token0, state0))
            jaxpr = jax.make_jaxpr(rnn_step, static_argnums=0)(spec, dparams, token0, state0).jaxpr
            names = [str(e.params.get("name", "")) for e in jaxpr.eqns if e.primitive.name == "pallas_call"]
            kernels = sum("decode_" in n for n in names)
            # the step that was meant: fused kernels or none
            ran = "" if (kernels > 0) == fused else f" FAIL ({kernels} fused kernels)"
            logits = one(spec, dparams, token0, state0)[0]
            ref = logits if ref is None else ref
            dev = float(jnp.linalg.norm(logits - ref) / jnp.linalg.norm(ref))
            if dev > 5e-2:  # bf16 rounding apart: below 1e-2
                ran += f" FAIL (logits rel. {dev:.1e})"
            sec = median_time(lambda: jax.block_until_ready(f(token0, state0)), 5)
            log(f"| {B} | {name} | {1e3 * sec / steps:.3f} | {B * steps / sec:,.0f} |  "
                f"({time.perf_counter() - t0:.0f} s; one step's logits vs the first row's: rel. {dev:.1e}{ran})")


def steps_loop(model, steps):
    """-> a function running `steps` greedy RNN steps (batch 1) in one jitted loop from a
    prefilled state (greedy_steps): what generate adds per token is the difference."""
    _, state0 = prompt_logits(model, [[1, 2, 3]])
    f = greedy_steps(spec_of(model), steps)
    return lambda: jax.block_until_ready(f(decode_params(model), jnp.zeros((1,), jnp.int32), state0))


def run_prefill(model, prompts):
    prompt_logits(model, prompts)[0].block_until_ready()


def run_decode(model, prompts, n, kw):
    out = generate(model, prompts, n, seed=1, **{"decode_loop": "device", **kw})
    assert all(len(r) == n for r in out)


def gpu_main(args, log) -> int:
    t_start = time.perf_counter()
    dev = jax.devices()[0]
    log(f"# {time.strftime('%Y-%m-%d %H:%M')}  device: {dev.device_kind} ({dev.platform}), jax {jax.__version__}")
    log(f"# command: python {' '.join(sys.argv)}")
    try:
        ok = True if args.skip_checks else gpu_checks(log)
    except Exception as err:  # the Pallas kernel may not be usable yet
        log(f"# check with wkv_impl=auto failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
        ok = False
    wkv_impl = args.wkv_impl
    config = parse_size(args.preset)
    f32 = rw.Model(config, random_params(config, seed=0), wkv_impl=wkv_impl)
    rng = np.random.default_rng(0)
    prompt = rng.integers(1, config.vocab_size, args.prefill_len + 1).tolist()

    # The model's kernels must work: a fallback to the plain-JAX paths would time something
    # else under the same row names (a broken fused step once timed as the per-operation one).
    try:
        prompt_logits(f32, [prompt[:1025]])[0].block_until_ready()
    except Exception as err:
        log(f"# wkv_impl={wkv_impl!r} failed in prefill ({type(err).__name__}: {str(err).splitlines()[0][:200]}); "
            "nothing timed (--wkv-impl reference times the plain-JAX paths)")
        raise SystemExit(1)
    log(f"# model {args.preset} random weights, V={config.vocab_size}, wkv_impl={wkv_impl!r}, "
        f"checks {'skipped' if args.skip_checks else 'passed' if ok else 'FAILED'}")

    models = {"float32": f32, "bfloat16": with_weight_dtype(f32, jnp.bfloat16)}
    try:
        if not args.skip_checks:  # (the sweep also checks each variant's logits)
            fused_check(models, prompt, log)
    except Exception as err:
        log(f"# check of the fused decode step failed: {type(err).__name__}: {str(err).splitlines()[0][:200]}")
    if args.sweep_batches:
        log("| B | bf16, jitted loop of 32 greedy steps | ms/step | tokens/s |\n|---:|---|---:|---:|")
        sweep_batches(models["bfloat16"], log, [int(b) for b in args.sweep_batches.split(",")],
                      only=tuple(args.sweep_variants.split(",")))
        log(f"# total {time.perf_counter() - t_start:.0f} s (--sweep-batches: no table)")
        return 0
    if args.sweep_fused:
        log("| bf16, B=1, jitted loop of 64 greedy steps | ms/step | tokens/s |\n|---|---:|---:|")
        sweep_fused(models["bfloat16"], log, blocks_list=parse_blocks(args.sweep_blocks), gen_tokens=args.steps_b1)
        log(f"# total {time.perf_counter() - t_start:.0f} s (--sweep-fused: no table)")
        return 0
    models["bfloat16 per-op"] = models["bfloat16"]  # with DecodeOptions(fused=False) in its row
    log(row(("weights", "B", "what", "tokens/s", "ms")))
    log("|" + "|".join("-" * (w + 2) for w in WIDTHS) + "|")
    jobs = []
    for name in args.dtypes.split(","):
        for B in (int(b) for b in args.batches.split(",")):
            jobs.append((name, B, "decode, greedy, one lax.while_loop", dict(temperature=0)))
            if B == 1:  # the same steps without generate's sampling and bookkeeping, same process
                jobs.append((name, 1, "jitted loop of 64 steps + argmax (no generate)", "steps"))
        if name == "bfloat16":
            jobs.append(("bfloat16 per-op", 1, "decode, greedy, per-operation step (DecodeOptions(fused=False))",
                         dict(temperature=0, decode_options=DecodeOptions(fused=False))))
        jobs.append((name, 1, f"prefill T={args.prefill_len} (+1 RNN step), with state", None))
    # Ragged prompts: 8 rows of T/2 .. T tokens (padded chunks: the kernel with lengths).
    ragged = [prompt[: args.prefill_len // 2 + 1 + i * args.prefill_len // 16] for i in range(8)]
    jobs.append(("bfloat16", 8, f"prefill 8 ragged prompts of {len(ragged[0])}..{len(ragged[-1])} tokens",
                 "ragged"))
    for B in (int(b) for b in args.batches.split(",")):
        jobs.append(("bfloat16", B, "decode, greedy, host loop of jitted steps",
                     dict(temperature=0, decode_loop="host")))
    for B in (int(b) for b in args.batches.split(",")):
        jobs.append(("bfloat16", B, "decode, top_p=0.7 temperature=1", dict(top_p=0.7)))

    if args.rows:
        jobs = [job for job in jobs if re.search(args.rows, job[2])]
    t_rows = time.perf_counter()  # the budget counts from the first timed row (not the checks)
    for name, B, what, kw in jobs:
        if time.perf_counter() - t_rows > args.budget_s:
            log(row((name, B, what, "skipped", "(budget)")))
            continue
        model = models[name]
        try:
            if kw == "steps":
                sec = median_time(steps_loop(model, 64), args.repeats)
                log(row((name, B, what, f"{64 / sec:,.0f}", f"{1e3 * sec / 64:.3f}")))
            elif kw is None or kw == "ragged":
                rows_ = [prompt] if kw is None else ragged
                sec = median_time(functools.partial(run_prefill, model, rows_), args.repeats)
                n_tok = sum(len(r) for r in rows_)
                log(row((name, B, what, f"{n_tok / sec:,.0f}", f"{1e3 * sec:.2f}")))
            else:
                n = args.steps if B > 1 else args.steps_b1
                prompts = rng.integers(1, config.vocab_size, (B, 1)).tolist()
                sec = median_time(functools.partial(run_decode, model, prompts, n, kw), args.repeats)
                log(row((name, B, what, f"{B * n / sec:,.0f}", f"{1e3 * sec / n:.3f}")))
        except Exception as err:
            log(row((name, B, what, "error", "")) + f"  {type(err).__name__}: {str(err).splitlines()[0][:160]}")
    log(f"# total {time.perf_counter() - t_start:.0f} s")
    return 0


def host_copy_bandwidth(repeats: int, nbytes: int = 256 << 20) -> float:
    """Bytes read + written per second by a numpy copy of nbytes: roughly what this machine's
    memory delivers to one stream of reads."""
    src = np.ones(nbytes // 8)
    dst = np.empty_like(src)
    return 2 * src.nbytes / median_time(lambda: np.copyto(dst, src), repeats)


def cpu_main(args, log) -> int:
    import torch  # torch (the reference): an optional dependency

    from rwkv2_jax.testing.release_checkpoint import make_release_state_dict
    from rwkv2_jax.testing.torch_reference import TorchRWKV2

    L, C, V, n, T = args.cpu_layers, args.cpu_width, args.cpu_vocab, args.cpu_steps, args.cpu_gpt_len
    sd = make_release_state_dict(L, C, V, seed=0)
    model = rw.from_release_arrays({k: v.numpy() for k, v in sd.items()}, wkv_impl="reference")
    ref = TorchRWKV2(sd, k_eps=model.config.k_eps)
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(1, V, 8)]
    tokens = rng.integers(0, V, (1, T))

    def ours(B=1):
        return generate(model, [prompt] * B, n, temperature=0)

    def reference():
        logits, state = ref.rnn(torch.tensor([prompt]))
        out = []
        for _ in range(n):
            x = logits[0, -1]
            x[0] = -float("inf")
            token = int(torch.argmax(x))
            out.append(token)
            logits, state = ref.rnn(torch.tensor([[token]]), state)
        return out

    same = ours()[0] == reference()
    log(f"# {time.strftime('%Y-%m-%d %H:%M')}  CPU: {os.cpu_count()} cores, jax {jax.__version__} "
        f"({jax.devices()[0].platform}), torch {torch.__version__} ({torch.get_num_threads()} threads)")
    log(f"# command: python {' '.join(sys.argv)}")
    log(f"# model L{L}-D{C}, V={V}, float32 random release-format weights; greedy, {n} new tokens after an "
        f"8-token prompt; ours == reference tokens: {same}")
    log(f"| {'what':52s} | {'tokens/s':>9s} |")
    log(f"|{'-' * 54}|{'-' * 11}|")
    t_ref = median_time(reference, args.repeats)
    t_ours = median_time(ours, args.repeats)
    t_ours8 = median_time(lambda: ours(8), args.repeats)
    t_top_p = median_time(lambda: generate(model, [prompt], n, top_p=0.7, seed=0), args.repeats)
    loop = steps_loop(model, 32)  # the decode step alone (no prefill, no sampling, no host loop)
    t_loop = median_time(loop, args.repeats)
    t_gpt = median_time(lambda: model(tokens).block_until_ready(), args.repeats)
    t_gpt_ref = median_time(lambda: ref.forward(torch.as_tensor(tokens)), args.repeats)
    log(f"| {'PyTorch reference, RNN loop + argmax (B=1)':52s} | {n / t_ref:9.1f} |")
    log(f"| {'ours, generate() incl. prefill (B=1)':52s} | {n / t_ours:9.1f} |")
    log(f"| {'ours, generate() incl. prefill (B=8)':52s} | {8 * n / t_ours8:9.1f} |")
    log(f"| {'ours, jitted loop of 32 steps + argmax (no generate)':52s} | {32 / t_loop:9.1f} |")
    log(f"| {'ours, generate() top_p=0.7 (sample.py default) (B=1)':52s} | {n / t_top_p:9.1f} |")
    log(f"| {f'PyTorch reference, GPT mode T={T} (B=1)':52s} | {T / t_gpt_ref:9.1f} |")
    log(f"| {f'ours, GPT mode T={T} (B=1)':52s} | {T / t_gpt:9.1f} |")
    log(f"# batch-1 decode speed-up over the reference: {t_ref / t_ours:.2f}x; GPT mode: {t_gpt_ref / t_gpt:.2f}x")
    # What bounds both decodes: every matrix but the embedding is read once per token.
    step_bytes = sum(v.numel() * 4 for k, v in sd.items() if v.ndim == 2 and k != "emb.weight")
    bw = host_copy_bandwidth(args.repeats)
    log(f"# memory-bandwidth floor: {step_bytes / 1e6:.1f} MB of float32 weights per token at "
        f"{bw / 1e9:.1f} GB/s (numpy copy, read + write) -> at most {bw / step_bytes:,.0f} tokens/s")
    # The head product alone, [1, C] x [C, V] float32 (most of those bytes at a large vocabulary).
    w = sd["head.weight"].float()  # [V, C], as the release stores it
    x = torch.randn(1, C)
    x_jax, w_jax = jax.numpy.asarray(x.numpy()), jax.numpy.asarray(w.numpy())
    xla_head = jax.jit(lambda x, w: jax.lax.dot_general(x, w, (((1,), (1,)), ((), ()))))
    t_xla = median_time(lambda: xla_head(x_jax, w_jax).block_until_ready(), 2 * args.repeats + 1)
    t_torch = median_time(lambda: x @ w.T, 2 * args.repeats + 1)
    log(f"# the head product alone ({w.numel() * 4 / 1e6:.1f} MB): XLA {1e3 * t_xla:.2f} ms, "
        f"torch x @ W.T {1e3 * t_torch:.2f} ms")
    return 0 if same else 1


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="the CPU comparison with the PyTorch reference "
                   "(the default when JAX has no accelerator)")
    p.add_argument("--gpu-rows", action="store_true", help="the accelerator rows even on CPU (to try the script)")
    p.add_argument("--preset", default="L24-D1024", help="model size for the GPU rows: a preset or "
                   "L<layers>-D<width>[-V<vocab>] (default L24-D1024, vocab 50277)")
    p.add_argument("--dtypes", default="bfloat16,float32", help="weight dtypes, in order (default bfloat16,float32)")
    p.add_argument("--batches", default="1,64", help="decode batch sizes (default 1,64)")
    p.add_argument("--steps-b1", type=int, default=512, help="decode steps timed at B=1 (default 512)")
    p.add_argument("--steps", type=int, default=256, help="decode steps timed at B>1 (default 256)")
    p.add_argument("--prefill-len", type=int, default=2048, help="prefill tokens (default 2048)")
    p.add_argument("--wkv-impl", default="auto", help="WKV for GPT mode (default auto: Pallas on GPU)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row; the median is shown (default 3)")
    p.add_argument("--budget-s", type=float, default=1e9, help="skip the remaining rows once this many seconds have passed since the first row "
                   "(the checks and set-up before it are not counted)")
    p.add_argument("--rows", default="", help="only the table rows whose description (the 'what' column) matches "
                   "this regular expression, e.g. 'greedy, one|top_p'")
    p.add_argument("--skip-checks", action="store_true", help="no correctness checks before the timings "
                   "(for a re-timing of code whose checks passed on this card)")
    p.add_argument("--sweep-fused", action="store_true", help="time the fused decode step's block sizes and L2 hints "
                   "(bf16, B=1; each variant's logits checked against the per-operation step) and rw.generate's loop, "
                   "instead of the table")
    p.add_argument("--sweep-blocks", default="", help="with --sweep-fused: these block sizes instead of the "
                   "default list, comma-separated: OUTxIN[xWARPS] for all four kernels of a layer, or four joined by / "
                   "for time_mix_in/att_out/channel_mix_in/ffn_out (e.g. 2x256,4x512x8,2x256/1x256/2x256x2/2x2048)")
    p.add_argument("--sweep-batches", default="", help="time the decode step's variants at these batch sizes (bf16, "
                   "comma-separated: the per-operation step, the same with the rows padded to 16, the fused kernels "
                   "up to 4 rows), instead of the table")
    p.add_argument("--sweep-variants", default=",".join(SWEEP_VARIANTS),
                   help=f"with --sweep-batches: the variants timed, comma-separated, of {','.join(SWEEP_VARIANTS)} "
                   "(per-operation step; rows padded to 16; fused kernels) (default all)")
    p.add_argument("--cpu-layers", type=int, default=6)
    p.add_argument("--cpu-width", type=int, default=512)
    p.add_argument("--cpu-vocab", type=int, default=50277)
    p.add_argument("--cpu-steps", type=int, default=32, help="tokens decoded in the CPU rows (default 32)")
    p.add_argument("--cpu-gpt-len", type=int, default=256, help="tokens of the CPU rows' GPT mode (default 256)")
    p.add_argument("--log", default=None, help="also append the output to this file")
    args = p.parse_args(argv)
    try:
        re.compile(args.rows)
    except re.error as err:
        p.error(f"--rows: {args.rows!r} is not a regular expression ({err})")
    unknown = sorted(set(args.sweep_variants.split(",")) - set(SWEEP_VARIANTS))
    if unknown:
        p.error(f"--sweep-variants: unknown {unknown}; choose from {','.join(SWEEP_VARIANTS)}")

    def log(line):
        print(line, flush=True)
        if args.log:
            with open(args.log, "a") as f:
                f.write(line + "\n")

    if args.cpu or (jax.default_backend() == "cpu" and not args.gpu_rows):
        return cpu_main(args, log)
    return gpu_main(args, log)


if __name__ == "__main__":
    sys.exit(main())
