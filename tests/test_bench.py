"""The benchmark scripts run end to end on CPU: one smoke run each, at the smallest sizes its flags allow.

Every number in docs/PERF.md comes from these scripts, and GPU time is scarce: a script that
breaks must fail here, not on the GPU machine. Each run checks what the script itself reports
(its exit status, its correctness verdicts, the rows of its table and that their numbers are
finite), never the times, which mean nothing on CPU. The correctness checks that bench/wkv.py,
bench/matvec.py and bench/decode.py run before timing compare the kernels and decode paths with
the references that tests/test_*kernel*.py and the generation tests already compare them with,
in the same interpret mode; here they are skipped (--no-check, --skip-checks), as they would
take most of the time. Every smoke run compiles Pallas kernels in interpret mode or a small
model, so they are all slow; the bench helpers at the end are quick.
"""

import inspect
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.decode import parse_blocks
from bench.wkv import time_cell
from pallas_kernels.decode import DecodeBlockSizes, LayerBlockSizes

REPO = Path(__file__).resolve().parents[1]


def run(*argv, timeout=900) -> str:
    """Run `python argv` from the repository root; its stdout, after asserting exit status 0."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, f"{' '.join(argv)} exited {r.returncode}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r.stdout


def tables(out: str) -> list[list[dict[str, str]]]:
    """Every markdown table the script printed, as rows of {header: cell} (text after a row's
    last '|', such as a compile time, is not a cell)."""
    def cells(line):
        return [c.strip() for c in line.split("|")[1:-1]]

    lines = out.splitlines()
    found = []
    for i in range(len(lines) - 1):
        is_rule = re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", lines[i + 1].strip())
        if lines[i].startswith("|") and is_rule:
            head, rows = cells(lines[i]), []
            for line in lines[i + 2:]:
                if not line.startswith("|"):
                    break
                rows.append(dict(zip(head, cells(line))))
            found.append(rows)
    return found


def number(cell: str) -> float:
    """The first number in a cell ('1,087', 'wall 644.2', '2.6e-08 PASS'); nan if there is none."""
    m = re.search(r"[-+]?\d[\d,]*(\.\d+)?([eE][-+]?\d+)?", cell)
    return float(m.group(0).replace(",", "")) if m else math.nan


def assert_positive(rows, *columns):
    for r in rows:
        for c in columns:
            assert number(r[c]) > 0 and math.isfinite(number(r[c])), (c, r)


@pytest.mark.slow
def test_wkv_smoke():
    """The timing table: the kernel in interpret mode, forward and forward+backward, and the baselines."""
    out = run("bench/wkv.py", "--smoke", "--no-check")
    summary = tables(out)[-1]
    assert [r["impl"].split(" (")[0] for r in summary] == ["pallas", "plain-JAX scan", "O(T²) convolution"]
    assert_positive(summary, "fwd µs", "fwd+bwd µs")


@pytest.mark.slow
def test_matvec_smoke():
    out = run("bench/matvec.py", "--smoke", "--no-check")
    summary = tables(out)[-1]
    assert summary and [r["impl"] for r in summary] == ["XLA dot_general", "pallas matvec"] * (len(summary) // 2)
    assert_positive(summary, "µs per product")


@pytest.mark.slow
def test_train_smoke():
    """The check (chosen WKV vs plain-JAX) and the bf16-vs-float32 agreement, each in its own
    process, then the long-context rows, each in its own process: T doubled at half the rows."""
    out = run("bench/train.py", "--smoke", "--long-context", "--agreement")
    assert re.search(r"^# check .*: OK$", out, re.M), out
    agreement = re.search(r"^# agreement .*gradient rel L2 (\S+), .*: (\w+) \(tolerances", out, re.M)
    assert agreement and agreement.group(2) == "OK" and 0 < float(agreement.group(1)) < 6e-2, out
    assert re.search(r"^# model .*deterministic ops=True$", out, re.M), out
    (rows,) = tables(out)
    assert [(r["compute dtype"], r["T"], r["remat"]) for r in rows] == [
        ("bfloat16", "32", "False"), ("bfloat16", "64", "False")]
    assert rows[0]["vs first row"] == "100%"
    assert_positive(rows, "tokens/s", "ms/step", "vs first row")


@pytest.mark.slow
def test_compare_smoke(tmp_path):
    """Two checkouts side by side: this one, and one whose trainer fails to import, which is
    reported in its row while the other is still timed (and the script exits 1, not hangs)."""
    broken = tmp_path / "broken"
    (broken / "rwkv2_jax" / "training").mkdir(parents=True)
    (broken / "rwkv2_jax" / "__init__.py").write_text("")
    (broken / "rwkv2_jax" / "training" / "trainer.py").write_text("raise RuntimeError('broken on purpose')\n")
    r = subprocess.run([sys.executable, "bench/compare.py", "--smoke", ".", str(broken)], cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 1, r.stdout + r.stderr
    (rows,) = tables(r.stdout)
    assert [row["checkout"] for row in rows] == [".", str(broken)]
    assert rows[0]["vs first"] == "1.000"
    assert_positive(rows[:1], "tokens/s (median)", "warm-up s")
    assert "RuntimeError: broken on purpose" in rows[1]["tokens/s (median)"]


@pytest.mark.slow
def test_profile_smoke():
    """A traced decode call; on CPU the trace holds no GPU kernels, so no table."""
    out = run("bench/profile.py", "decode", "--smoke")
    assert re.search(r"^## decode .* on cpu", out, re.M), out
    assert "no trace written" not in out


@pytest.mark.slow
def test_decode_cpu_smoke():
    """--cpu: ours vs the PyTorch reference on the same weights (exit status 1 if their greedy
    tokens differ), then the table."""
    out = run("bench/decode.py", "--cpu", "--cpu-layers", "2", "--cpu-width", "32", "--cpu-vocab", "100",
              "--cpu-steps", "4", "--repeats", "1")
    assert "ours == reference tokens: True" in out
    (rows,) = tables(out)
    assert len(rows) >= 4 and any(r["what"].startswith("PyTorch reference") for r in rows), rows
    assert_positive(rows, "tokens/s")


@pytest.mark.slow
def test_decode_gpu_rows_smoke():
    """--gpu-rows on CPU: the accelerator path, the rows --rows selects."""
    rows_re = "greedy, one|prefill T"
    out = run("bench/decode.py", "--gpu-rows", "--preset", "L1-D32-V300", "--dtypes", "bfloat16", "--batches", "1",
              "--steps-b1", "4", "--steps", "4", "--prefill-len", "16", "--repeats", "1", "--rows", rows_re,
              "--skip-checks")
    (rows,) = tables(out)
    assert {re.search(rows_re, r["what"]).group(0) for r in rows} == {"greedy, one", "prefill T"}, rows
    assert_positive(rows, "tokens/s", "ms")


@pytest.mark.slow
def test_decode_kernels_smoke():
    """Each kernel at its default block sizes (marked *), then at those asked for, each checked
    against its reference."""
    out = run("bench/decode_kernels.py", "--interpret", "--layers", "2", "--width", "32", "--blocks", "2x16",
              "--min-time", "0.01", "--kernels", "time_mix_in,ffn_out")
    (rows,) = tables(out)
    assert [r["kernel"] for r in rows] == ["time_mix_in", "time_mix_in", "ffn_out", "ffn_out"]
    assert [r["blocks"].endswith(" *") for r in rows] == [True, False, True, False]
    assert all(r["blocks"] == "2x16x4" for r in rows[1::2])
    assert all(r["rel. diff vs reference"].endswith("PASS") for r in rows), rows
    assert_positive(rows, "wall µs/call")


def test_wkv_cells_use_the_gpu_time_when_traced():
    """GB/s comes from the kernels' GPU time where a trace gave one (a wall time per call also
    holds the host's dispatch), and from the wall time where it did not (CPU, slow rows)."""
    nbytes, copy_bw = 100e6, 3e12
    traced = time_cell([40e-6, 38e-6, 39e-6], [58e-6, 52e-6, 70e-6], nbytes, copy_bw)
    assert traced.startswith("GPU 39.0 (38.0–40.0); wall 58.0 (52.0–70.0) |"), traced
    assert "| 2,564 (85%)" in traced, traced  # 100 MB / 39 us
    wall = time_cell([], [5e-3], nbytes, copy_bw)
    assert wall == "wall 5,000.0 | 20 (1%)", wall


def test_decode_block_sizes_parse():
    """OUTxIN[xWARPS] -> DecodeBlockSizes, four joined by / -> LayerBlockSizes; anything else a one-line exit."""
    assert parse_blocks("2x256,4x512x8") == [DecodeBlockSizes(2, 256), DecodeBlockSizes(4, 512, num_warps=8)]
    assert parse_blocks("2x256/1x256/2x256x2/2x2048") == [LayerBlockSizes(
        DecodeBlockSizes(2, 256), DecodeBlockSizes(1, 256), DecodeBlockSizes(2, 256, num_warps=2),
        DecodeBlockSizes(2, 2048))]
    with pytest.raises(SystemExit, match=r"'2x256/1x256' is not .* or four of them joined by /"):
        parse_blocks("2x256/1x256")
    with pytest.raises(SystemExit, match=r"'2x24' is not OUTxIN"):
        parse_blocks("2x24")


def test_profile_categories_from_hlo_metadata():
    """A kernel's category comes from its name (cuBLAS, WKV, collectives) or from the source
    file and op that XLA's metadata gives for the fusion it runs."""
    from bench import profile

    hlo = ('  %loop_add_fusion.1 = f32[8]{0} fusion(%a), kind=kLoop, calls=%f, metadata={op_name="jit(step)/mul" '
           'source_file="/x/optax/_src/transform.py" source_line=12}\n'
           '  %input_reduce_fusion = f32[8]{0} fusion(%b), kind=kInput, calls=%g, metadata={op_name='
           '"jit(step)/jvp(RWKV)/reduce_sum" source_file="/r/rwkv2_jax/model.py" source_line=99}\n')
    meta = profile.hlo_metadata(hlo)
    assert meta == {"loop_add_fusion_1": ("jit(step)/mul", "transform.py:12"),
                    "input_reduce_fusion": ("jit(step)/jvp(RWKV)/reduce_sum", "model.py:99")}
    assert profile.category("loop_add_fusion_1", *meta["loop_add_fusion_1"]) == "optimizer"
    assert profile.category("input_reduce_fusion", *meta["input_reduce_fusion"]) == "elementwise and reductions"
    assert profile.category("nvjet_tst_128x256_64x4", "", "") == "matmul"
    assert profile.category("wkv_bwd_tiles", "", "") == "WKV"
    assert profile.category("copy_fusion_3", "jit(step)/convert_element_type", "model.py:5") == "copies and casts"


def test_profile_finds_the_source_line_of_a_compiled_op():
    """With the installed jax, compiled HLO names the source line of an op (in metadata, or
    through its tables of stack frames), so the profile's by-line table is not empty."""
    import jax
    import jax.numpy as jnp

    from bench import profile

    def double_sin(x):
        return jnp.sin(x) * 2

    hlo = jax.jit(double_sin).lower(jnp.ones(8)).compile().as_text()
    line = inspect.getsourcelines(double_sin)[1] + 1
    assert f"test_bench.py:{line}" in {where for _, where in profile.hlo_metadata(hlo).values()}
