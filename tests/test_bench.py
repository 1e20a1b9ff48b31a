"""The benchmark scripts run end to end on CPU (their --smoke modes: tiny shapes, interpret mode).

Every performance claim in docs/PERF.md comes from these scripts, and GPU time is scarce: a
script that breaks (a refactor, an API change) must fail here, not on the GPU machine.
Timings printed on CPU mean nothing and are not checked.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def run(*argv, timeout=600):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, f"{' '.join(argv)} failed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def test_wkv_bench():
    out = run("bench/wkv.py", "--smoke")
    assert "CORRECTNESS: PASS" in out
    assert "| pallas (4 chunks) |" in out and "| plain-JAX scan |" in out and "| O(T²) convolution |" in out


def test_matvec_bench():
    out = run("bench/matvec.py", "--smoke")
    assert "CORRECTNESS: PASS" in out
    assert "| pallas matvec |" in out and "| XLA dot_general |" in out


def test_train_bench():
    out = run("bench/train.py", "--smoke")
    assert "| bfloat16 |" in out and "| float32 |" in out


@pytest.mark.parametrize("what", ["decode", "prefill", "train"])
def test_profile_bench(what):
    out = run("bench/profile.py", what, "--smoke")
    assert f"## {what} L2-D64" in out


def test_decode_bench_gpu_rows_on_cpu():
    out = run("bench/decode.py", "--gpu-rows", "--preset", "L2-D64", "--steps-b1", "4", "--steps", "4",
              "--prefill-len", "64", "--repeats", "1", "--batches", "1,4")
    assert "checks passed" in out
    assert "prefill T=64" in out and "decode, greedy" in out
    assert out.count("| jitted loop of 64 steps + argmax (no generate) |") == 2  # B = 1, per dtype


def test_decode_bench_rows_option():
    """--rows REGEX times only the table rows whose description matches."""
    out = run("bench/decode.py", "--gpu-rows", "--preset", "L1-D32-V300", "--steps-b1", "4", "--steps", "4",
              "--prefill-len", "16", "--repeats", "1", "--batches", "1,3", "--dtypes", "bfloat16", "--skip-checks",
              "--rows", "top_p|greedy, one")
    rows = [line.split("|")[2:4] for line in out.splitlines() if line.startswith("| bfloat16")]
    assert [(b.strip(), w.strip()) for b, w in rows] == [
        ("1", "decode, greedy, one lax.while_loop"), ("3", "decode, greedy, one lax.while_loop"),
        ("1", "decode, top_p=0.7 temperature=1"), ("3", "decode, top_p=0.7 temperature=1")], out


def test_decode_bench_cpu_comparison():
    """--cpu: ours vs the PyTorch reference on the same weights (same greedy tokens, checked in
    the run: exit status 1 otherwise), the step alone, GPT mode in both, the bandwidth floor and
    the head product in both."""
    out = run("bench/decode.py", "--cpu", "--cpu-layers", "2", "--cpu-width", "32", "--cpu-vocab", "100",
              "--cpu-steps", "4", "--cpu-gpt-len", "16", "--repeats", "1")
    assert "ours == reference tokens: True" in out
    for what in ("PyTorch reference, RNN loop + argmax (B=1)", "ours, generate() incl. prefill (B=8)",
                 "ours, jitted loop of 32 steps + argmax (no generate)", "ours, generate() top_p=0.7",
                 "PyTorch reference, GPT mode T=16 (B=1)", "ours, GPT mode T=16 (B=1)"):
        assert f"| {what}" in out, what
    assert "batch-1 decode speed-up over the reference:" in out and "the head product alone (0.0 MB): XLA" in out
    assert "# memory-bandwidth floor:" in out


def test_decode_bench_sweep_on_cpu():
    """--sweep-fused (the fused decode step's variants, each checked against the per-operation
    step, then rw.generate's loop) on a tiny model with the kernels in interpret mode."""
    out = run("bench/decode.py", "--gpu-rows", "--sweep-fused", "--skip-checks", "--preset", "L2-D64-V300",
              "--wkv-impl", "pallas_interpret", "--sweep-blocks", "2x16", "--steps-b1", "8")
    assert out.count("PASS") == 5 and "FAIL" not in out
    assert "| per-operation step |" in out and "| fused 2x16x4 |" in out and "(default) |" in out
    assert "| fused, no L2 hints (XLA's head) |" in out and "| fused, no resident output matrices |" in out
    assert "| rw.generate, 8 tokens, 32 steps per loop iteration |" in out


def test_decode_bench_sweep_batches_on_cpu():
    """--sweep-batches: the per-operation step, the same with the rows padded to 16 (at 5-15
    rows), and the fused kernels at each batch size (also above FUSED_MAX_BATCH, where the step
    would not take them by default; not above 4 rows); each variant's kernels and logits
    checked (a FAIL in the row otherwise)."""
    out = run("bench/decode.py", "--gpu-rows", "--sweep-batches", "1,5", "--skip-checks", "--preset", "L2-D64-V300",
              "--prefill-len", "64", "--wkv-impl", "pallas_interpret")
    rows = [[c.strip() for c in line.split("|")[1:4]] for line in out.splitlines() if line.startswith(("| 1 |", "| 5 |"))]
    pad = "per-operation step, rows padded to 16"
    assert [r[:2] for r in rows] == [[b, what] for b in "15" for what in ("per-operation step", pad, "fused kernels")]
    timed = {(b, what): ms != "not timed" for b, what, ms in rows}
    assert timed == {(b, what): (what, b) not in ((pad, "1"), ("fused kernels", "5")) for b, what in timed}
    assert "FAIL" not in out


def test_decode_bench_sweep_variants_option():
    """--sweep-variants picks sweep_batches' rows by key; an unknown key is a one-line usage error."""
    proc = subprocess.run([sys.executable, "bench/decode.py", "--sweep-batches", "5", "--sweep-variants", "ops,padd16"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "unknown ['padd16']" in proc.stderr and "Traceback" not in proc.stderr
    out = run("bench/decode.py", "--gpu-rows", "--sweep-batches", "5", "--sweep-variants", "pad16,ops", "--skip-checks",
              "--preset", "L1-D32-V300", "--prefill-len", "16", "--wkv-impl", "pallas_interpret")
    rows = [[c.strip() for c in line.split("|")[1:4]] for line in out.splitlines() if line.startswith("| 5 |")]
    assert [r[1] for r in rows] == ["per-operation step", "per-operation step, rows padded to 16"]
    assert all(r[2] != "not timed" for r in rows) and "FAIL" not in out


def test_decode_kernels_bench_on_cpu():
    """bench/decode_kernels.py times each fused decode kernel per block size (interpret mode on
    CPU: the rows and the check against the plain-JAX reference, not the times)."""
    out = run("bench/decode_kernels.py", "--interpret", "--layers", "2", "--width", "32", "--blocks", "2x16,1x32x2",
              "--min-time", "0.01", "--kernels", "att_out,ffn_out")
    rows = [line for line in out.splitlines() if line.startswith("| att_out") or line.startswith("| ffn_out")]
    # each kernel: its default in the step (marked *) first, then the two asked for
    assert [r.split("|")[2].strip() for r in rows] == ["1x256x4 *", "2x16x4", "1x32x2", "2x2048x4 *", "2x16x4", "1x32x2"]
    assert all(r.count("PASS") == 1 for r in rows), rows
    with pytest.raises(AssertionError, match="each kernel is timed alone"):
        run("bench/decode_kernels.py", "--interpret", "--blocks", "2x16/2x16/2x16/2x16")


def test_wkv_bench_cells_use_the_gpu_time_when_traced(monkeypatch):
    """GB/s comes from the kernels' GPU time where a trace gave one (a wall time per call also
    holds the host's dispatch), and from the wall time where it did not (CPU, slow rows)."""
    monkeypatch.syspath_prepend(str(REPO))
    from bench.wkv import time_cell

    nbytes, copy_bw = 100e6, 3e12
    traced = time_cell([40e-6, 38e-6, 39e-6], [58e-6, 52e-6, 70e-6], nbytes, copy_bw)
    assert traced.startswith("GPU 39.0 (38.0–40.0); wall 58.0 (52.0–70.0) |"), traced
    assert "| 2,564 (85%)" in traced, traced  # 100 MB / 39 us
    wall = time_cell([], [5e-3], nbytes, copy_bw)
    assert wall == "wall 5,000.0 | 20 (1%)", wall


def test_decode_bench_sweep_blocks(monkeypatch):
    """--sweep-blocks: OUTxIN[xWARPS] -> DecodeBlockSizes; anything else a one-line exit."""
    monkeypatch.syspath_prepend(str(REPO))
    from bench.decode import parse_blocks
    from pallas_kernels.decode import DecodeBlockSizes, LayerBlockSizes

    assert parse_blocks("2x256,4x512x8") == [DecodeBlockSizes(2, 256), DecodeBlockSizes(4, 512, num_warps=8)]
    assert parse_blocks("2x256/1x256/2x256x2/2x2048") == [LayerBlockSizes(
        DecodeBlockSizes(2, 256), DecodeBlockSizes(1, 256), DecodeBlockSizes(2, 256, num_warps=2),
        DecodeBlockSizes(2, 2048))]
    with pytest.raises(SystemExit, match=r"'2x256/1x256' is not .* or four of them joined by /"):
        parse_blocks("2x256/1x256")
    with pytest.raises(SystemExit, match=r"'2x24' is not OUTxIN"):
        parse_blocks("2x24")
