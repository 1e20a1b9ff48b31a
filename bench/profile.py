"""Where the GPU time goes: trace one workload with jax.profiler and sum device time per kernel.

    python3 bench/profile.py decode --batch 1          # rw.generate's decode loop, bf16 L24-D1024
    python3 bench/profile.py decode --batch 64 --dtype float32
    python3 bench/profile.py decode --no-fused         # the per-operation step (DecodeOptions(fused=False))
    python3 bench/profile.py prefill --tokens 2048     # rw.prefill of one prompt
    python3 bench/profile.py train                     # one bf16 training step, B=8, T=768
    python3 bench/profile.py decode --smoke            # tiny model on CPU (checks the script)

Prints, per workload unit (a decode step, a prefill call, a training step): wall time,
the sum of kernel times on the GPU's streams ("busy"), the kernel count, and the kernels
grouped by name with their share; for `train`, also the time by category (matmul, WKV,
optimizer, loss, copies and casts, collectives, elementwise and reductions) and by the source
line that XLA's metadata gives for each kernel. Wall time well above "busy" means the GPU waits on
launches (host overhead), not on memory or arithmetic. Timings here are for diagnosis;
the numbers in docs/PERF.md come from bench/decode.py, bench/train.py and bench/wkv.py.
"""

from __future__ import annotations

import argparse
import collections
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere: this checkout first

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import rwkv2_jax as rw  # noqa: E402
from bench.decode import parse_size, random_params  # noqa: E402
from bench.timing import gpu_kernel_events  # noqa: E402
from rwkv2_jax.generation.generator import generate, prompt_logits, with_weight_dtype  # noqa: E402
from rwkv2_jax.generation.step import DecodeOptions  # noqa: E402
from rwkv2_jax.model import RWKV  # noqa: E402
from rwkv2_jax.training import trainer as tr  # noqa: E402
from rwkv2_jax.training.sharding import make_mesh  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("what", choices=["decode", "prefill", "train"])
    p.add_argument("--preset", default="L24-D1024", help="model size: a preset or L<layers>-D<width>")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--batch", type=int, default=None, help="rows (default: decode 1, train 8, prefill 1)")
    p.add_argument("--steps", type=int, default=64, help="decode steps traced (default 64)")
    p.add_argument("--tokens", type=int, default=2048, help="prefill tokens / training ctx_len (train default 768)")
    p.add_argument("--top", type=int, default=25, help="kernel groups shown (default 25)")
    p.add_argument("--no-fused", action="store_true",
                   help="decode with the per-operation step (DecodeOptions(fused=False))")
    p.add_argument("--smoke", action="store_true", help="tiny model on CPU")
    return p.parse_args(argv)


def kernel_group(name: str) -> str:
    """Fold numbered variants (fusion_12, loop_add_fusion_3, ...) into one group."""
    name = re.sub(r"[._]\d+\b", "", name)
    return name[:90]


CATEGORIES = ("matmul", "WKV", "optimizer", "loss", "copies and casts", "collectives", "elementwise and reductions")


def stack_frames(hlo_text: str) -> dict:
    """{stack_frame_id: "file:line"} from the FileNames / FileLocations / StackFrames tables
    that compiled HLO text carries (metadata names a frame instead of a source file)."""
    tables = {}
    for m in re.finditer(r"^(FileNames|FunctionNames|FileLocations|StackFrames)\n((?:\d+ .*\n)*)", hlo_text, re.M):
        tables[m.group(1)] = dict(re.findall(r"^(\d+) (.*)$", m.group(2), re.M))
    files = {i: Path(name.strip('"')).name for i, name in tables.get("FileNames", {}).items()}
    where = {}
    for i, loc in tables.get("FileLocations", {}).items():
        f, line = re.search(r"file_name_id=(\d+)", loc), re.search(r"\bline=(\d+)", loc)
        if f and line:
            where[i] = f"{files.get(f.group(1), '?')}:{line.group(1)}"
    frames = {}
    for i, frame in tables.get("StackFrames", {}).items():
        loc = re.search(r"file_location_id=(\d+)", frame)
        if loc and loc.group(1) in where:
            frames[i] = where[loc.group(1)]
    return frames


def hlo_metadata(hlo_text: str) -> dict:
    """{kernel-style instruction name: (op_name, source file:line)} from compiled HLO text
    (XLA names a fusion's kernel after the fusion instruction, '.' -> '_'). The source is
    the innermost frame JAX kept: a `source_file`/`source_line` pair or a `stack_frame_id`."""
    frames = stack_frames(hlo_text)
    out = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*?metadata=\{([^}]*)\}", hlo_text, re.M):
        meta = m.group(2)
        op = re.search(r'op_name="([^"]*)"', meta)
        src = re.search(r'source_file="([^"]*)"', meta)
        line = re.search(r"source_line=(\d+)", meta)
        frame = re.search(r"stack_frame_id=(\d+)", meta)
        where = f"{Path(src.group(1)).name}:{line.group(1)}" if src and line else ""
        if not where and frame:
            where = frames.get(frame.group(1), "")
        out[m.group(1).replace(".", "_").replace("-", "_")] = (op.group(1) if op else "", where)
    return out


def category(kernel: str, op_name: str, where: str) -> str:
    k = kernel.lower()
    if k.startswith("wkv_"):
        return "WKV"
    if any(s in k for s in ("gemm", "cublas", "cutlass", "xmma", "nvjet", "wgmma")):
        return "matmul"
    if any(s in k for s in ("nccl", "all_reduce", "all_gather", "reduce_scatter")):
        return "collectives"
    src = where.split(":")[0]
    if src in ("transform.py", "alias.py", "combine.py", "clipping.py", "numerics.py", "update.py") or "adam" in op_name:
        return "optimizer"
    if "cross_entropy" in op_name or "log_softmax" in op_name or "logsumexp" in op_name:
        return "loss"
    if any(s in k for s in ("copy", "transpose", "convert", "bitcast", "memcpy", "memset")):
        return "copies and casts"
    return "elementwise and reductions"


def by_category(events, units: int, busy: float, hlo_text: str, top: int) -> None:
    """The busy time by category, then by the source line XLA's metadata names for each kernel."""
    meta = hlo_metadata(hlo_text)
    cats = collections.defaultdict(float)
    lines = collections.defaultdict(float)
    for name, _, dur in events:
        op, where = meta.get(name, meta.get(re.sub(r"_\d+$", "", name), ("", "")))
        cats[category(name, op, where)] += dur
        key = where or ("(Pallas/cuBLAS kernel)" if not op else op.split("/")[-1])
        lines[f"{category(name, op, where)}: {key}"] += dur
    print("| category | us per unit | % busy |\n|---|---:|---:|")
    for c in CATEGORIES:
        if cats.get(c):
            print(f"| {c} | {cats[c] / 1e3 / units:,.1f} | {100 * cats[c] / busy:.1f} |")
    print("| category: source (file:line of the op) | us per unit | % busy |\n|---|---:|---:|")
    for key, t in sorted(lines.items(), key=lambda kv: -kv[1])[:top]:
        print(f"| {key} | {t / 1e3 / units:,.1f} | {100 * t / busy:.1f} |")


def summarize(trace_dir: str, units: int, wall_s: float, top: int, hlo_text: str = ""):
    events = gpu_kernel_events(trace_dir)
    if events is None:
        print("no trace written")
        return
    groups = collections.defaultdict(lambda: [0, 0.0])
    names = collections.defaultdict(lambda: [0, 0.0])
    busy, first, last = 0.0, None, None
    for name, start, dur in events:
        for g in (groups[kernel_group(name)], names[name]):
            g[0] += 1
            g[1] += dur
        busy += dur
        first = start if first is None else min(first, start)
        last = start + dur if last is None else max(last, start + dur)
    if not groups:
        print("no GPU kernel events in the trace (CPU run?)")
        return
    n = sum(c for c, _ in groups.values())
    span = (last - first) / 1e3
    print(f"per unit: wall {1e6 * wall_s / units:,.1f} us | GPU span {span / units:,.1f} us | "
          f"kernels busy {busy / 1e3 / units:,.1f} us ({100 * busy / 1e3 / span:.0f}% of span) | "
          f"{n / units:,.1f} kernels")
    print("| kernel group | per unit | us per unit | % busy |\n|---|---:|---:|---:|")
    for name, (c, t) in sorted(groups.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"| `{name}` | {c / units:,.1f} | {t / 1e3 / units:,.1f} | {100 * t / busy:.1f} |")
    print("| kernel | per unit | us per call | us per unit |\n|---|---:|---:|---:|")
    for name, (c, t) in sorted(names.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"| `{name[:90]}` | {c / units:,.1f} | {t / 1e3 / c:,.2f} | {t / 1e3 / units:,.1f} |")
    if hlo_text:
        by_category(events, units, busy, hlo_text, top)


def workload(args):
    """-> (fn to trace, units per call of fn, compiled HLO text for the categories or "")."""
    if args.smoke:
        args.preset = "L2-D64"
    config = parse_size(args.preset)
    if args.what == "train":

        B = args.batch or 8
        T = 32 if args.smoke else (args.tokens if args.tokens != 2048 else 768)
        cfg = tr.TrainConfig(ctx_len=T, batch_size=B, epochs=1, epoch_steps=100, dtype=args.dtype)
        s = tr.setup(config, cfg, make_mesh(1, 1))
        params = RWKV(config).init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"]
        state = [s.init_state(params)]
        batch = s.put_batch(np.random.default_rng(0).integers(0, config.vocab_size, (1, B, T + 1)).astype(np.int32))

        def fn():
            state[0], m = s.train_step(state[0], batch)
            jax.block_until_ready(m)

        hlo = s.train_step.lower(state[0], batch).compile().as_text()
        return fn, 1, hlo
    model = rw.Model(config, random_params(config, 0))
    options = DecodeOptions(fused=not args.no_fused)
    if args.dtype == "bfloat16":
        model = with_weight_dtype(model, jnp.bfloat16)
    rng = np.random.default_rng(0)
    if args.what == "decode":
        prompts = rng.integers(1, config.vocab_size, (args.batch or 1, 1)).tolist()
        steps = 8 if args.smoke else args.steps
        return (lambda: generate(model, prompts, steps, temperature=0, decode_loop="device",
                                 decode_options=options)), steps, ""
    prompt = rng.integers(1, config.vocab_size, (32 if args.smoke else args.tokens) + 1).tolist()
    return (lambda: prompt_logits(model, [prompt])[0].block_until_ready()), 1, ""


def main(argv=None) -> int:
    args = parse_args(argv)

    fn, units, hlo = workload(args)
    fn()  # compile
    fn()
    t0 = time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            fn()
        dev = jax.devices()[0]
        print(f"## {args.what} {args.preset} {args.dtype} batch={args.batch}"
              f"{' no-fused' if args.no_fused else ''} on {dev.device_kind}, "
              f"jax {jax.__version__} ({units} units per call; wall time from an untraced call)")
        summarize(d, units, wall, args.top, hlo)
    return 0


if __name__ == "__main__":
    sys.exit(main())
