"""Shared timing helpers for the bench/ scripts."""

import collections
import glob
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
from jax.profiler import ProfileData


def median_time(fn, repeats: int) -> float:
    """Median wall time of `repeats` calls of fn, after one warm-up call (compile / allocate)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_fn(fn, arg_sets, reps, min_time):
    """Median seconds per call: reps x (N back-to-back calls, then one block)."""
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*arg_sets[0]))  # compile + warm up
    time_fn.first_call = time.perf_counter() - t0
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*arg_sets[1 % len(arg_sets)]))
    one = time.perf_counter() - t0
    if one > 3.0:  # too slow to repeat within one device lease: one timed call
        return one
    n = int(min(1000, max(1, min_time / max(one, 1e-6))))
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = None
        for i in range(n):
            out = fn(*arg_sets[i % len(arg_sets)])
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / n)
    return statistics.median(times)


def copy_bandwidth(smoke):
    """Bytes read + written per second by a device-to-device copy of 1 GiB (best of two forms)."""
    n = (1 << 20) if smoke else (1 << 28)
    x = jax.random.normal(jax.random.key(0), (n,), jnp.float32)
    best = 0.0
    for name, f in [("copy", jax.jit(lambda x: jnp.array(x, copy=True))), ("x+1", jax.jit(lambda x: x + 1.0))]:
        t = time_fn(f, [(x,)], 5, 0.2)
        bw = 2 * x.nbytes / t
        print(f"device-to-device {name} of {x.nbytes / 2**30:.3g} GiB: {t * 1e3:.3f} ms, {bw / 1e9:.0f} GB/s")
        best = max(best, bw)
    return best


def gpu_kernel_events(trace_dir: str):
    """[(kernel name, start ns, duration ns)] on the GPU's streams of a jax.profiler trace
    (None when no trace file was written; [] on a CPU run)."""
    files = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
    if not files:
        return None
    events = []
    for plane in ProfileData.from_file(files[0]).planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            if line.name.startswith("Stream"):  # skip derived lines (XLA Ops, XLA Modules)
                events += [(ev.name, ev.start_ns, ev.duration_ns) for ev in line.events]
    return events


def kernel_breakdown(fn, arg_sets, calls: int):
    """[(kernel name, launches per call, median µs per launch)] on the GPU, from a jax.profiler
    trace of `calls` back-to-back calls, longest first (None where the trace holds no GPU kernels)."""
    jax.block_until_ready(fn(*arg_sets[0]))
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d):
            out = None
            for i in range(calls):
                out = fn(*arg_sets[i % len(arg_sets)])
            jax.block_until_ready(out)
        events = gpu_kernel_events(d)
    if not events:
        return None
    by_name = collections.defaultdict(list)
    for name, _, dur in events:
        by_name[name].append(dur)
    rows = [(name, len(d) / calls, statistics.median(d) / 1e3) for name, d in by_name.items()]
    return sorted(rows, key=lambda r: -r[1] * r[2])


def device_time(fn, arg_sets, calls: int):
    """GPU kernel seconds per call, from a jax.profiler trace of `calls` back-to-back calls:
    for each kernel, its median duration times how often a call runs it, summed over the
    kernels (None where the trace holds no GPU kernels).

    Unlike wall time per call this does not include the host's dispatch of each call, which
    is what back-to-back calls of a kernel shorter than the dispatch measure instead."""
    rows = kernel_breakdown(fn, arg_sets, calls)
    if not rows:
        return None
    return sum(per_call * us for _, per_call, us in rows) / 1e6
