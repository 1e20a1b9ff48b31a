"""CLI smoke runs: python -m convert, sample.py, the demo, every entry point's --help; bad input
gives one line, no traceback."""

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import rwkv2_jax as rw
from rwkv2_jax.cli import sample
from rwkv2_jax.cli.convert import main as convert_main
from rwkv2_jax.cli.demo import DEMO_TEXT, char_tokenizer
from tests.conftest import REPO, one_line_error, real_tokenizer_path
from rwkv2_jax.testing.release_checkpoint import make_release_state_dict, write_release_checkpoint


# --- convert --------------------------------------------------------------------------


def test_convert_both_directions_bit_exact(tmp_path, release_files, capsys):
    src = release_files["ffn_pre"]
    assert convert_main([str(src), str(tmp_path / "m.safetensors")]) == 0
    assert "verified bit-exact" in capsys.readouterr().out
    assert convert_main([str(tmp_path / "m.safetensors"), str(tmp_path / "back.pth")]) == 0
    a = torch.load(src, weights_only=True)
    b = torch.load(tmp_path / "back.pth", weights_only=True)
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert rw.load(tmp_path / "m.safetensors").config.ffn_pre


def test_convert_dtype_and_k_eps(tmp_path, release_files, capsys):
    assert convert_main([str(release_files["plain"]), str(tmp_path / "h.safetensors"),
                         "--dtype", "bfloat16", "--k-eps", "1e-8"]) == 0
    m = rw.load(tmp_path / "h.safetensors")
    assert m.config.k_eps == 1e-8
    assert {str(x.dtype) for x in __import__("jax").tree.leaves(m.params)} == {"bfloat16"}


def test_convert_errors(tmp_path, release_files, capsys):
    one_line_error(capsys, convert_main([str(tmp_path / "none.pth"), str(tmp_path / "o")]), "none.pth")
    out = tmp_path / "exists.safetensors"
    out.write_text("x")
    one_line_error(capsys, convert_main([str(release_files["plain"]), str(out)]), "--force")
    sd = make_release_state_dict(n_layer=2, n_embd=8, vocab_size=11, seed=0)
    sd["blocks.1.att.key.weight"] = torch.zeros(8, 9)
    bad = write_release_checkpoint(tmp_path / "bad.pth", sd)
    one_line_error(capsys, convert_main([str(bad), str(tmp_path / "o.safetensors")]),
                   "'blocks.1.att.key.weight' has shape [8, 9], expected [8, 8]")


def test_convert_help():
    r = subprocess.run([sys.executable, "-m", "convert", "--help"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and "--to" in r.stdout


# --- sample.py -------------------------------------------------------------------------


@pytest.mark.slow
def test_sample_streams_text_in_a_subprocess(char_release):
    ckpt, tok, _ = char_release
    r = subprocess.run(
        [sys.executable, "sample.py", "--checkpoint", str(ckpt), "--tokenizer", str(tok),
         "--prompt", "The time", "--tokens", "30", "--seed", "1", "--num-samples", "2"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("The time") == 2 and "sample 2/2" in r.stdout
    assert "tokens/s" in r.stderr


@pytest.mark.slow
def test_sample_greedy_equals_gpt_argmax(char_release, capsys):
    ckpt, tok_path, _ = char_release
    assert sample.main(["--checkpoint", str(ckpt), "--tokenizer", str(tok_path), "--prompt", "RWKV",
                        "--tokens", "6", "--temperature", "0"]) == 0
    text = capsys.readouterr().out.strip("\n")
    tok = char_tokenizer(DEMO_TEXT)
    model = rw.load_torch(ckpt, verbose=False)
    ids = tok.encode("RWKV").ids
    for _ in range(6):
        logits = np.array(model([ids]))[0, -1]
        logits[0] = -np.inf
        ids.append(int(np.argmax(logits)))
    assert text == tok.decode(ids)


@pytest.mark.slow
def test_sample_presence_penalty_and_bfloat16(char_release, capsys):
    ckpt, tok_path, _ = char_release
    args = ["--checkpoint", str(ckpt), "--tokenizer", str(tok_path), "--prompt", "RWKV", "--tokens", "12",
            "--temperature", "0"]
    assert sample.main(args + ["--presence-penalty", "1e6"]) == 0
    new = capsys.readouterr().out.strip("\n")[len("RWKV"):]
    assert len(new) == 12 and len(set(new)) == 12  # no character twice: each is one token here
    assert sample.main(args + ["--dtype", "bfloat16"]) == 0
    assert capsys.readouterr().out.startswith("RWKV")
    with pytest.raises(SystemExit) as exit_info:  # argparse: usage, then one error line
        sample.main(args + ["--penalty-decay", "2"])
    assert exit_info.value.code == 2
    assert "--penalty-decay must be in [0, 1], got 2.0" in capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize("name", ["20B_tokenizer.json", "tokenizer.json"])
def test_sample_finds_tokenizer_next_to_checkpoint(char_release, tmp_path, capsys, name):
    ckpt, tok, _ = char_release
    (tmp_path / "m.pth").write_bytes(ckpt.read_bytes())
    (tmp_path / name).write_bytes(tok.read_bytes())
    assert sample.main(["--checkpoint", str(tmp_path / "m.pth"), "--tokens", "3"]) == 0


def test_sample_draws_a_fresh_seed_and_says_how_to_repeat_it(char_release, capsys):
    ckpt, tok, _ = char_release
    args = ["--checkpoint", str(ckpt), "--tokenizer", str(tok), "--prompt", "The", "--tokens", "24"]
    assert sample.main(args) == 0
    captured = capsys.readouterr()
    (seed,) = re.findall(r"# seed (\d+); rerun with --seed \1", captured.err)
    assert sample.main(args + ["--seed", seed]) == 0
    again = capsys.readouterr()
    assert again.out == captured.out and "rerun with" not in again.err


def test_sample_native_checkpoint(char_release, tmp_path, capsys):
    ckpt, tok, _ = char_release
    rw.save(rw.load_torch(ckpt, verbose=False), tmp_path / "m.safetensors")
    assert sample.main(["--checkpoint", str(tmp_path / "m.safetensors"), "--tokenizer", str(tok),
                        "--tokens", "3", "--prompt-file", str(tok)]) == 0


def test_sample_bad_inputs(char_release, tmp_path, capsys):
    ckpt, tok, _ = char_release
    base = ["--tokenizer", str(tok), "--tokens", "2"]
    one_line_error(capsys, sample.main(["--checkpoint", str(tmp_path / "no.pth")] + base), "no.pth")
    trunc = tmp_path / "trunc.pth"
    trunc.write_bytes(ckpt.read_bytes()[:1000])
    one_line_error(capsys, sample.main(["--checkpoint", str(trunc)] + base), "trunc.pth")
    sd = make_release_state_dict(n_layer=2, n_embd=16, vocab_size=60, seed=3)
    del sd["ln_out.bias"]
    missing = write_release_checkpoint(tmp_path / "missing.pth", sd)
    one_line_error(capsys, sample.main(["--checkpoint", str(missing)] + base), "missing key 'ln_out.bias'")
    sd = make_release_state_dict(n_layer=2, n_embd=16, vocab_size=60, seed=3)
    sd["head.weight"] = torch.zeros(60, 15)
    shape = write_release_checkpoint(tmp_path / "shape.pth", sd)
    one_line_error(capsys, sample.main(["--checkpoint", str(shape)] + base), "'head.weight' has shape [60, 15]")
    lone = tmp_path / "lone" / "m.pth"
    lone.parent.mkdir()
    lone.write_bytes(ckpt.read_bytes())
    one_line_error(capsys, sample.main(["--checkpoint", str(lone), "--tokens", "2"]),
                   f"tokenizer not found next to {lone}: looked for 20B_tokenizer.json and tokenizer.json")
    one_line_error(capsys, sample.main(["--checkpoint", str(ckpt), "--tokenizer", str(tmp_path / "t.json")]),
                   "t.json")
    bad_tok = tmp_path / "bad.json"
    bad_tok.write_text("{not json")
    one_line_error(capsys, sample.main(["--checkpoint", str(ckpt), "--tokenizer", str(bad_tok)]), "bad.json")
    one_line_error(capsys, sample.main(["--checkpoint", str(ckpt), "--prompt", "", *base]), "prompt is empty")
    one_line_error(capsys, sample.main(["--checkpoint", str(ckpt), "--prompt-file", str(tmp_path / "p.txt"),
                                        *base]), "p.txt")


def test_sample_rejects_a_tokenizer_larger_than_the_vocab(tmp_path, capsys):
    tok = real_tokenizer_path()
    small = write_release_checkpoint(tmp_path / "s.pth", make_release_state_dict(n_layer=1, n_embd=8,
                                                                                 vocab_size=100, seed=0))
    one_line_error(capsys, sample.main(["--checkpoint", str(small), "--tokenizer", str(tok)]),
                   "wrong tokenizer")


def test_sample_with_the_real_20b_tokenizer(tmp_path, capsys):
    tok = real_tokenizer_path()
    sd = make_release_state_dict(n_layer=1, n_embd=8, vocab_size=50277, seed=0)
    ckpt = write_release_checkpoint(tmp_path / "rwkv.pth", sd)
    assert sample.main(["--checkpoint", str(ckpt), "--tokenizer", str(tok), "--prompt",
                        "In a shocking finding, scientists", "--tokens", "12", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("In a shocking finding, scientists") and len(out) > 40


def test_sample_help():
    r = subprocess.run([sys.executable, "sample.py", "--help"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and "--top-p" in r.stdout and "--allow-end-of-text" in r.stdout
    help_text = " ".join(r.stdout.split())
    assert "(default: a fresh one, printed with the command-line flag that repeats the run)" in help_text


# --- every entry point ------------------------------------------------------------------------

ENTRY_POINTS = {  # console script -> module
    "rwkv2-sample": "rwkv2_jax.cli.sample", "rwkv2-train": "rwkv2_jax.cli.train",
    "rwkv2-convert": "rwkv2_jax.cli.convert", "rwkv2-eval": "rwkv2_jax.cli.eval",
    "rwkv2-prepare-data": "rwkv2_jax.cli.prepare_data", "rwkv2-demo": "rwkv2_jax.cli.demo",
    "rwkv2-lm-eval": "rwkv2_jax.evaluation.lm_eval_adapter",
}


def run_all(commands, **kwargs):
    """Run commands side by side (each imports jax: seconds); -> their CompletedProcess-like results."""
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)
             for c in commands]
    return [(p, *p.communicate(timeout=300)) for p in procs]


def test_entry_points_are_declared():
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert {name: target.split(":")[0] for name, target in scripts.items()} == ENTRY_POINTS
    assert all(target.endswith(":main") for target in scripts.values())


@pytest.mark.slow
def test_every_cli_module_prints_its_help():
    results = run_all([[sys.executable, "-m", module, "--help"] for module in ENTRY_POINTS.values()], cwd=REPO)
    for module, (proc, out, err) in zip(ENTRY_POINTS.values(), results):
        assert proc.returncode == 0 and "usage:" in out and "Traceback" not in err, (module, err[-2000:])


@pytest.mark.slow
def test_console_scripts_print_their_help(tmp_path):
    missing = [name for name in ENTRY_POINTS if shutil.which(name) is None]
    if missing:
        pytest.skip(f"console scripts not installed ({', '.join(missing)}): pip install -e .")
    env = {**os.environ, "PYTHONPATH": str(REPO)}  # this checkout's code, whichever one is installed
    results = run_all([[shutil.which(name), "--help"] for name in ENTRY_POINTS], cwd=tmp_path, env=env)
    for name, (proc, out, err) in zip(ENTRY_POINTS, results):
        assert proc.returncode == 0 and "usage:" in out and "Traceback" not in err, (name, err[-2000:])


# --- demo ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_demo_trains_and_samples(tmp_path, capsys):
    from rwkv2_jax.cli import demo

    assert demo.main(["--steps", "120", "--out", str(tmp_path), "--tokens", "40"]) == 0
    out = capsys.readouterr().out
    losses = [float(line.split()[3]) for line in out.splitlines() if line.startswith("step")]
    assert losses[-1] < losses[0] / 3  # it learned
    assert "The time mix" in out
    umask = os.umask(0)
    os.umask(umask)
    for name in ("demo.pth", "tokenizer.json", "text.npy"):  # as open() makes files: 0644 for umask 022
        assert (os.stat(tmp_path / name).st_mode & 0o777) == 0o666 & ~umask, name
    # The tools find the demo's tokenizer, and its text as a token file.
    model = rw.load_torch(tmp_path / "demo.pth", ctx_len=demo.CTX_LEN, verbose=False)
    tokenizer = rw.load_tokenizer(rw.find_tokenizer(tmp_path / "demo.pth"))
    text = tokenizer.decode(np.load(tmp_path / "text.npy").tolist())
    assert text == demo.DEMO_TEXT
    assert f"--ctx-len {demo.CTX_LEN}" in out
    # Greedy text from the trained model continues the training text.
    reply = rw.Pipeline(model, tokenizer).generate("The channel mix is a", 5, temperature=0)
    assert "The channel mix is a" + reply in demo.DEMO_TEXT, reply

