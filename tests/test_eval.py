"""Evaluation: loglikelihood and per-token losses vs the PyTorch reference, the
`rwkv2-eval` subcommands end to end, and the lm-evaluation-harness adapter."""

import csv
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import rwkv2_jax as rw
from rwkv2_jax.cli import eval as ev_cli
from rwkv2_jax.evaluation import scoring as ev
from rwkv2_jax.cli.demo import DEMO_TEXT, char_tokenizer
from rwkv2_jax.tokenizer import TOKENIZER_NAMES
from tests.conftest import REPO, one_line_error, real_tokenizer_path
from rwkv2_jax.testing.release_checkpoint import make_release_state_dict, write_release_checkpoint
from rwkv2_jax.testing.torch_reference import TorchRWKV2

# --- independent expectations from the PyTorch reference --------------------------------


def torch_logprobs(ref: TorchRWKV2, inputs) -> torch.Tensor:
    """log_softmax of the reference's GPT-mode logits, in float64: [T] ids -> [T, V]."""
    return torch.log_softmax(ref.forward(np.asarray([inputs]))[0].double(), dim=-1)


def torch_loglikelihood(ref, context, continuation):
    """(summed log p(continuation | context), every continuation token is the argmax)."""
    context = list(context) or [0]  # the documented empty-context convention
    full = context + list(continuation)
    logp = torch_logprobs(ref, full[:-1])[len(context) - 1:]  # rows predicting the continuation
    target = torch.tensor(continuation)
    return float(logp.gather(1, target[:, None]).sum()), bool((logp.argmax(-1) == target).all())


def torch_greedy(ref, ids, n):
    ids = list(ids)
    for _ in range(n):
        ids.append(int(ref.forward(np.asarray([ids]))[0, -1].argmax()))
    return ids


def torch_window_losses(ref, windows):
    """-log p(next token) for windows [N, T + 1] -> [N, T] (float64)."""
    logp = torch.log_softmax(ref.forward(np.asarray(windows)[:, :-1]).double(), dim=-1)
    return -logp.gather(2, torch.as_tensor(np.asarray(windows)[:, 1:], dtype=torch.long)[..., None])[..., 0].numpy()




# --- fixtures ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def char_setup(tmp_path_factory):
    """A random release checkpoint over a character vocabulary, the tokenizer saved next to
    it under the default name, and the PyTorch reference of the same weights."""
    root = tmp_path_factory.mktemp("eval")
    tok = char_tokenizer(DEMO_TEXT)
    tok.save(str(root / TOKENIZER_NAMES[0]))
    # seed 8: the random model's greedy text has spaces, so greedy LAMBADA documents exist
    sd = make_release_state_dict(n_layer=2, n_embd=16, vocab_size=tok.get_vocab_size(), seed=8)
    ckpt = write_release_checkpoint(root / "model.pth", sd)
    return {"root": root, "ckpt": ckpt, "tok": tok, "ref": TorchRWKV2(sd, k_eps=1e-9),
            "model": rw.load_torch(ckpt, verbose=False)}


# Short documents (compiles are shared: every test here pads rows to 16..48 tokens, batch 4).
SENTENCES = ["RWKV is a recurrent network", "Both modes give the same answer",
             "The channel mix is a small layer", "Each new token adds its key", "It reads one token at a time"]
BATCH = "4"


@pytest.fixture(scope="module")
def lambada_docs(char_setup):
    """Documents whose last word is the model's greedy continuation (found by the reference)
    and ordinary sentences, so both accuracy outcomes occur."""
    tok, ref = char_setup["tok"], char_setup["ref"]
    docs = []
    for prompt in ("The time", "A model", "RWKV is", "The channel", "Both modes", "Each new",
                   "That is", "In GPT mode"):
        gen = tok.decode(torch_greedy(ref, tok.encode("\n" + prompt).ids, 16))[1 + len(prompt):]
        j = gen.find(" ")  # a space the model generates, then the start of a word
        if j >= 0 and gen[j + 1:j + 2].strip():
            docs.append(prompt + gen[:j] + " " + gen[j + 1:].split()[0])
    assert len(docs) >= 2, f"the reference generated too few spaces to build greedy documents: {docs}"
    return docs + SENTENCES


# --- library: loglikelihood ------------------------------------------------------------


@pytest.mark.slow
def test_loglikelihood_matches_torch_reference(char_setup):
    model, ref = char_setup["model"], char_setup["ref"]
    V = model.config.vocab_size
    rng = np.random.default_rng(0)
    requests = [(rng.integers(0, V, n).tolist(), rng.integers(0, V, m).tolist())
                for n, m in ((3, 2), (40, 5), (17, 1), (8, 8), (1, 1), (30, 3), (12, 4))]
    for n_ctx, n_cont in ((5, 3), (19, 1), (1, 6)):  # continuations the model itself predicts
        greedy = torch_greedy(ref, rng.integers(0, V, n_ctx).tolist(), n_cont)
        requests.append((greedy[:n_ctx], greedy[n_ctx:]))
    # Rows are sorted by length, padded to 16/24/48 and run 4 at a time; results come back in order.
    got = ev.loglikelihood(model, requests, batch_size=4)
    want = [torch_loglikelihood(ref, c, k) for c, k in requests]
    np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-5, atol=1e-4)
    assert [g[1] for g in got] == [w[1] for w in want]
    assert {g[1] for g in got} == {True, False}
    # The documented conventions: an empty context is [EOT_ID]; an empty continuation is (0.0, True).
    empty, explicit, nothing = ev.loglikelihood(model, [([], [5, 6]), ([ev.EOT_ID], [5, 6]), ([1, 2], [])],
                                                batch_size=4)
    assert empty == explicit and empty[0] == pytest.approx(torch_loglikelihood(ref, [0], [5, 6])[0], rel=1e-5)
    assert nothing == (0.0, True)


def test_loglikelihood_bad_requests_name_the_request(char_setup):
    model = char_setup["model"]
    V = model.config.vocab_size
    with pytest.raises(ValueError, match=rf"request 1 continuation: token id {V} at position 1 is outside"):
        ev.loglikelihood(model, [([1], [2]), ([1], [2, V])])
    with pytest.raises(ValueError, match="request 0 context: token id -3 at position 0"):
        ev.loglikelihood(model, [([-3], [2])])
    with pytest.raises(ValueError, match="request 0 must be a pair"):
        ev.loglikelihood(model, [[1, 2, 3]])
    with pytest.raises(ValueError, match="integer token ids"):
        ev.loglikelihood(model, [([1.5], [2])])


def test_bucket_lengths():
    assert [ev.bucket_length(n) for n in (1, 16, 17, 24, 25, 33, 49, 96, 97, 1000)] == \
        [16, 16, 24, 24, 32, 48, 64, 96, 128, 1024]
    for n in range(1, 3000, 7):
        assert n <= ev.bucket_length(n) < max(17, 1.5 * n)  # under a third of a row is padding


# --- library: per-token losses over windows ------------------------------------------------


def test_token_losses_match_torch_across_chunks_and_batches(char_setup):
    model, ref = char_setup["model"], char_setup["ref"]
    windows = np.random.default_rng(2).integers(0, model.config.vocab_size, (5, 41))
    # chunk_len 16 does not divide T = 40 and batch 4 does not divide N = 5.
    got = ev.token_losses(model, windows, batch_size=4, chunk_len=16)
    assert got.shape == (5, 40) and got.dtype == np.float32
    np.testing.assert_allclose(got, torch_window_losses(ref, windows), rtol=1e-5, atol=1e-5)


def test_window_starts():
    np.testing.assert_array_equal(ev.window_starts(100, 24), [0, 24, 48, 72])  # windows of 25 tokens
    np.testing.assert_array_equal(ev.window_starts(100, 24, count=2), [0, 24])
    np.testing.assert_array_equal(ev.window_starts(97, 24), [0, 24, 48, 72])
    np.testing.assert_array_equal(ev.window_starts(96, 24), [0, 24, 48])
    r = ev.window_starts(100, 24, mode="random", count=50, seed=3)
    assert r.min() >= 0 and r.max() <= 100 - 25 and len(set(r.tolist())) > 10
    np.testing.assert_array_equal(r, ev.window_starts(100, 24, mode="random", count=50, seed=3))
    with pytest.raises(ValueError, match="has 10 tokens; a window needs 25"):
        ev.window_starts(10, 24)


# --- python -m rwkv2_jax.cli.eval lambada ------------------------------------------------------


def write_jsonl(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def test_lambada_end_to_end_matches_torch(char_setup, lambada_docs, tmp_path, capsys):
    data = write_jsonl(tmp_path / "lambada.jsonl", lambada_docs)
    out = tmp_path / "result.json"
    # The tokenizer is found next to the checkpoint (20B_tokenizer.json).
    assert ev_cli.main(["lambada", str(data), "--checkpoint", str(char_setup["ckpt"]),
                        "--batch-size", BATCH, "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    tok, ref = char_setup["tok"], char_setup["ref"]
    want = []
    for text in lambada_docs:  # the release's recipe, written out independently
        context, word = text.rsplit(" ", 1)
        want.append(torch_loglikelihood(ref, tok.encode("\n").ids + tok.encode(context).ids,
                                        tok.encode(" " + word).ids))
    assert result["n"] == len(lambada_docs)
    assert result["ppl"] == pytest.approx(math.exp(-np.mean([w[0] for w in want])), rel=1e-4)
    assert result["acc"] == pytest.approx(np.mean([w[1] for w in want]))
    assert 0 < result["acc"] < 1
    printed = capsys.readouterr().out
    assert f"n={len(lambada_docs)}" in printed and f"acc={100 * result['acc']:.2f}%" in printed

    assert ev_cli.main(["lambada", str(data), "--checkpoint", str(char_setup["ckpt"]), "--limit", "2",
                        "--batch-size", BATCH, "--no-newline-prefix", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["n"] == 2 and not result["newline_prefix"]
    lls = [torch_loglikelihood(ref, tok.encode(c).ids, tok.encode(" " + w).ids)[0]
           for c, w in (d.rsplit(" ", 1) for d in lambada_docs[:2])]  # no "\n" before the context
    assert result["ppl"] == pytest.approx(math.exp(-np.mean(lls)), rel=1e-4)


def test_lambada_requests_use_the_real_tokenizer_as_the_release_did(tmp_path):
    tok = rw.load_tokenizer(real_tokenizer_path())
    text = "In my palm is a clue, she said. He looked at the small brass key"
    requests = ev_cli.read_lambada(write_jsonl(tmp_path / "one.jsonl", [text]), tok)
    (context, continuation), = requests
    assert context[0] == 187  # "\n"
    assert context == tok.encode("\n" + text.rsplit(" ", 1)[0])
    assert continuation == tok.encode(" key") and len(continuation) == 1
    assert (context, continuation) == ev.lambada_request(text, tok)


@pytest.mark.parametrize("content, pattern", [
    (None, "file not found"),
    ("", "no documents (the file is empty"),
    ("\n  \n", "no documents"),
    ('{"text": "a b c"}\n{"text": "a b\n', "data.jsonl:2: malformed JSON"),
    ('{"text": "a b c"}\n["a b"]\n', 'data.jsonl:2: expected an object with a string "text" field'),
    ('{"text": "a b c"}\n{"txt": "a b"}\n', 'data.jsonl:2: expected an object with a string "text" field'),
    ('{"text": "a b c"}\n\n{"text": "nospace"}\n', "data.jsonl:3: the text has no last word"),
    ('{"text": "ends with a space "}\n', "data.jsonl:1: the text has no last word"),
    (b'{"text": "a b"}\n{"text": "caf\xe9 x"}\n', "data.jsonl:2: not UTF-8"),
    ('{"text": "a b"}\n{"text": "known \\u00c6\\u00d8\\u00c5"}\n',
     "data.jsonl:2: the last word 'ÆØÅ' tokenizes to nothing"),
])
def test_lambada_bad_input_is_one_line_naming_the_line(char_setup, tmp_path, capsys, content, pattern):
    from tokenizers import Tokenizer, models

    # A tokenizer without an unknown token and without " ": unknown characters vanish.
    vocab = {ch: i for ch, i in char_setup["tok"].get_vocab().items() if ch != " "}
    dropping = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    dropping.save(str(tmp_path / "dropping.json"))
    data = tmp_path / "data.jsonl"
    if isinstance(content, bytes):
        data.write_bytes(content)
    elif content is not None:
        data.write_text(content, encoding="utf-8")
    code = ev_cli.main(["lambada", str(data), "--checkpoint", str(char_setup["ckpt"]),
                        "--tokenizer", str(tmp_path / "dropping.json")])
    one_line_error(capsys, code, pattern)


def test_lambada_missing_tokenizer_and_checkpoint(char_setup, tmp_path, capsys):
    data = write_jsonl(tmp_path / "d.jsonl", ["a b"])
    lone = tmp_path / "m.pth"
    lone.write_bytes(char_setup["ckpt"].read_bytes())
    one_line_error(capsys, ev_cli.main(["lambada", str(data), "--checkpoint", str(lone)]),
                   f"tokenizer not found next to {lone}: looked for 20B_tokenizer.json and tokenizer.json")
    one_line_error(capsys, ev_cli.main(["lambada", str(data), "--checkpoint", str(tmp_path / "x.pth")]),
                   "checkpoint not found")
    # The demo's name for its tokenizer is found too.
    (tmp_path / "tokenizer.json").write_bytes((char_setup["root"] / TOKENIZER_NAMES[0]).read_bytes())
    assert ev_cli.main(["lambada", str(data), "--checkpoint", str(lone), "--batch-size", BATCH]) == 0


def test_cheap_inputs_are_checked_before_the_model_loads(char_setup, tmp_path, capsys):
    """A bad tokenizer, data file or prompt is reported even when the checkpoint is unreadable:
    the cheap checks run first, so the user does not wait for a model to load."""
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    data = write_jsonl(tmp_path / "d.jsonl", ["a b"])
    tok = ["--tokenizer", str(char_setup["root"] / TOKENIZER_NAMES[0])]
    one_line_error(capsys, ev_cli.main(["verify", "--checkpoint", str(junk)]), "tokenizer not found next to")
    one_line_error(capsys, ev_cli.main(["lambada", str(data), "--checkpoint", str(junk)]), "tokenizer not found")
    one_line_error(capsys, ev_cli.main(["verify", "--checkpoint", str(junk), *tok, "--prompt", "T"]),
                   "at least 2")
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    one_line_error(capsys, ev_cli.main(["lambada", str(tmp_path / "bad.jsonl"), "--checkpoint", str(junk), *tok]),
                   "bad.jsonl:1: malformed JSON")
    (tmp_path / "bad.npy").write_bytes(b"not an npy file")
    for sub in ("loss", "positional"):
        extra = ["--max-len", "8"] if sub == "positional" else []
        one_line_error(capsys, ev_cli.main([sub, str(tmp_path / "bad.npy"), "--checkpoint", str(junk), *extra]),
                       "cannot read")
    # ... and the checkpoint is read only after them.
    one_line_error(capsys, ev_cli.main(["verify", "--checkpoint", str(junk), *tok]), "junk.pth")


# --- loss and positional -------------------------------------------------------------------


@pytest.fixture(scope="module")
def token_file(char_setup):
    tokens = np.asarray(char_setup["tok"].encode(DEMO_TEXT).ids, np.uint16)  # like the trainer's files
    path = char_setup["root"] / "tokens.npy"
    np.save(path, tokens)
    return path, tokens


def written_by_open(path) -> bool:
    """The file has the mode open() gives a new file: 0666 less the umask (0644 for umask 022)."""
    umask = os.umask(0)
    os.umask(umask)
    return (os.stat(path).st_mode & 0o777) == (0o666 & ~umask)


def test_loss_sequential_windows_match_torch(char_setup, token_file, tmp_path, capsys):
    path, tokens = token_file
    out = tmp_path / "loss.json"
    assert ev_cli.main(["loss", str(path), "--checkpoint", str(char_setup["ckpt"]), "--ctx-len", "40",
                        "--windows", "7", "--chunk-len", "16", "--batch-size", BATCH, "--output", str(out)]) == 0
    assert written_by_open(out)
    result = json.loads(out.read_text())
    windows = np.stack([tokens[s:s + 41] for s in range(0, 7 * 40, 40)]).astype(np.int64)
    per_window = torch_window_losses(char_setup["ref"], windows).mean(axis=1)  # [7]
    assert result["windows"] == 7 and result["ctx_len"] == 40
    assert result["loss"] == pytest.approx(per_window.mean(), rel=1e-5)
    assert result["ci95"] == pytest.approx(1.96 * per_window.std(ddof=1) / math.sqrt(7), rel=1e-3)
    assert f"loss: {result['loss']:.4f} ± {result['ci95']:.4f}" in capsys.readouterr().out


def test_loss_random_windows_and_bad_token_files(char_setup, token_file, tmp_path, capsys):
    path, tokens = token_file
    ckpt = ["--checkpoint", str(char_setup["ckpt"])]
    assert ev_cli.main(["loss", str(path), *ckpt, "--ctx-len", "40", "--mode", "random", "--windows", "5",
                        "--chunk-len", "16", "--batch-size", BATCH]) == 0
    assert "95% CI over 5 windows of 40 tokens" in capsys.readouterr().out
    one_line_error(capsys, ev_cli.main(["loss", str(path), *ckpt, "--mode", "random"]), "--windows")
    one_line_error(capsys, ev_cli.main(["loss", str(tmp_path / "none.npy"), *ckpt]), "none.npy")
    one_line_error(capsys, ev_cli.main(["loss", str(path), *ckpt, "--ctx-len", "100000"]),
                   f"has {len(tokens)} tokens; a window needs 100001")
    bad = tokens.astype(np.int64)
    bad[123] = 999
    np.save(tmp_path / "bad.npy", bad)
    one_line_error(capsys, ev_cli.main(["loss", str(tmp_path / "bad.npy"), *ckpt]),
                   "token id 999 at position 123 is outside")
    np.save(tmp_path / "2d.npy", tokens.reshape(-1, 1))
    one_line_error(capsys, ev_cli.main(["loss", str(tmp_path / "2d.npy"), *ckpt]), "expected a 1-D array")
    (tmp_path / "junk.npy").write_bytes(b"not an npy file")
    one_line_error(capsys, ev_cli.main(["loss", str(tmp_path / "junk.npy"), *ckpt]), "cannot read")


@pytest.mark.slow
def test_positional_writes_csv_and_png(char_setup, token_file, tmp_path, capsys):
    path, tokens = token_file
    # A second curve from a native checkpoint that says ctx_len=32, so the plot marks it.
    other_pth = write_release_checkpoint(
        tmp_path / "other.pth",
        make_release_state_dict(n_layer=2, n_embd=16, vocab_size=char_setup["tok"].get_vocab_size(), seed=6))
    other = rw.save(rw.load_torch(other_pth, verbose=False).replace(ctx_len=32), tmp_path / "other.safetensors")
    out = tmp_path / "plots" / "pos"
    max_len = 56  # chunk 16 does not divide it
    assert ev_cli.main(["positional", str(path), "--max-len", str(max_len), "--checkpoint", str(char_setup["ckpt"]),
                        "--checkpoint", str(other), "--windows", "5", "--chunk-len", "16", "--seed", "4",
                        "--batch-size", BATCH, "--out", str(out)]) == 0
    assert written_by_open(tmp_path / "plots" / "pos.csv") and written_by_open(tmp_path / "plots" / "pos.png")
    rows = list(csv.reader((tmp_path / "plots" / "pos.csv").read_text().splitlines()))
    assert rows[0] == ["position", "model.pth_loss", "model.pth_stderr", "other.safetensors_loss",
                       "other.safetensors_stderr"]
    assert len(rows) == 1 + max_len and [int(r[0]) for r in rows[1:]] == list(range(max_len))
    starts = ev.window_starts(len(tokens), max_len, mode="random", count=5, seed=4)
    windows = np.stack([tokens[s:s + max_len + 1] for s in starts]).astype(np.int64)
    want = torch_window_losses(char_setup["ref"], windows)  # [5, max_len]
    np.testing.assert_allclose([float(r[1]) for r in rows[1:]], want.mean(axis=0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose([float(r[2]) for r in rows[1:]], want.std(axis=0, ddof=1) / math.sqrt(5),
                               rtol=1e-3, atol=1e-5)
    assert [float(r[3]) for r in rows[1:]] != [float(r[1]) for r in rows[1:]]
    import matplotlib.image

    image = matplotlib.image.imread(tmp_path / "plots" / "pos.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.std() > 0
    one_line_error(capsys, ev_cli.main(["positional", str(path), "--max-len", "100000",
                                        "--checkpoint", str(char_setup["ckpt"])]), "a window needs 100001")


# --- verify ----------------------------------------------------------------------------------


@pytest.mark.slow
def test_verify_gpt_rnn_prefill_agree(char_setup, capsys):
    ckpt = ["--checkpoint", str(char_setup["ckpt"])]
    assert ev_cli.main(["verify", *ckpt, "--prompt", "The time mix keeps two running sums", "--split", "11"]) == 0
    out = capsys.readouterr().out
    diffs = [float(line.rsplit("=", 1)[1]) for line in out.splitlines() if "max |diff|" in line]
    assert len(diffs) == 2 and max(diffs) < 1e-4 and "prefill(11)+RNN(24)" in out and "verify: OK" in out
    one_line_error(capsys, ev_cli.main(["verify", *ckpt, "--prompt", "T"]), "at least 2")
    one_line_error(capsys, ev_cli.main(["verify", *ckpt, "--prompt", "The time", "--split", "8"]),
                   "--split 8 must be in [1, 7]")


def test_curve_labels_are_file_names_told_apart_by_their_folders():
    assert ev_cli._labels(["out/demo.pth", "out/demo.safetensors"]) == ["demo.pth", "demo.safetensors"]
    assert ev_cli._labels(["a/x/m.pth", "b/x/m.pth", "c.pth"]) == ["a/x/m.pth", "b/x/m.pth", "c.pth"]
    assert ev_cli._labels(["m.pth", "m.pth"]) == ["m.pth#0", "m.pth#1"]  # one file given twice


def test_positional_ctx_len_flag_marks_the_training_length(char_setup, token_file, tmp_path, capsys):
    path, _ = token_file
    for ctx_len in (None, "24"):
        flags = [] if ctx_len is None else ["--ctx-len", ctx_len]
        args = ev_cli.parse_args(["positional", str(path), "--max-len", "8", "--checkpoint",
                                  str(char_setup["ckpt"]), *flags])
        assert ev_cli.load_model(args, str(char_setup["ckpt"])).config.ctx_len == int(ctx_len or 768)


def test_eval_help(capsys):
    r = subprocess.run([sys.executable, "-m", "rwkv2_jax.cli.eval", "--help"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0
    assert all(name in r.stdout for name in ("lambada", "loss", "positional", "verify"))
    with pytest.raises(SystemExit):
        ev_cli.main(["loss", "--help"])
    text = capsys.readouterr().out
    assert "95% confidence interval" in text and "%%" not in text and "--ctx-len" in text


# --- lm-evaluation-harness adapter ----------------------------------------------------------


@pytest.fixture(scope="module")
def harness():
    import importlib.util

    if importlib.util.find_spec("lm_eval") is None:  # installed but broken fails below, loudly
        pytest.skip("lm_eval not installed (pip install -e '.[eval]')")
    import lm_eval

    from rwkv2_jax.evaluation import lm_eval_adapter

    return lm_eval, lm_eval_adapter


def instances(kind, args):
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_harness_registers_the_model(harness):
    lm_eval, adapter = harness
    from lm_eval.api.registry import get_model, model_registry

    assert get_model("rwkv2_jax") is adapter.RWKV2LM
    assert "hf" in model_registry  # the harness's own models are still there


@pytest.mark.parametrize("newline_prefix", [True, False])
def test_harness_loglikelihood_equals_library(harness, char_setup, newline_prefix):
    _, adapter = harness
    lm = adapter.RWKV2LM(checkpoint=str(char_setup["ckpt"]), newline_prefix=newline_prefix, batch_size=4)
    tok, model = char_setup["tok"], char_setup["model"]
    pairs = [("The time mix", " keeps"), ("RWKV is a", " recurrent network"), ("", "The"), ("A model ", "with"),
             ("x", " y")]
    got = lm.loglikelihood(instances("loglikelihood", pairs), disable_tqdm=True)
    prefix = tok.encode("\n").ids if newline_prefix else []
    requests = []
    for context, continuation in pairs:
        if context.endswith(" "):  # the harness moves trailing spaces into the continuation
            context, continuation = context.rstrip(" "), " " + continuation
        context_ids = tok.encode(context).ids
        requests.append(((prefix + context_ids) if context or prefix else [], tok.encode(continuation).ids))
    assert got == ev.loglikelihood(model, requests, batch_size=4)  # same batches, so bit for bit
    # The same from an already loaded model and tokenizer (Python use).
    in_memory = adapter.RWKV2LM(model=model, tokenizer=tok, newline_prefix=newline_prefix, batch_size=4)
    assert in_memory.loglikelihood(instances("loglikelihood", pairs), disable_tqdm=True) == got


def test_harness_rejects_unknown_model_args(harness, char_setup):
    _, adapter = harness
    with pytest.raises(adapter.ModelArgsError, match=r"unknown model_args \['checkpont'\]"):
        adapter.RWKV2LM.create_from_arg_string(f"checkpont={char_setup['ckpt']}")
    with pytest.raises(adapter.ModelArgsError, match="batch_size must be a positive int, got 0"):
        adapter.RWKV2LM.create_from_arg_string(f"checkpoint={char_setup['ckpt']}", {"batch_size": 0})


def test_harness_rolling_and_generation(harness, char_setup):
    _, adapter = harness
    tok, ref = char_setup["tok"], char_setup["ref"]
    text = "The time mix keeps two sums."
    ids = tok.encode(text).ids
    whole = adapter.RWKV2LM(checkpoint=str(char_setup["ckpt"]), max_length=len(ids) + 1)
    rolling = whole.loglikelihood_rolling(instances("loglikelihood_rolling", [(text,)]), disable_tqdm=True)
    assert rolling[0] == pytest.approx(torch_loglikelihood(ref, [0], ids)[0], rel=1e-5)
    windowed = adapter.RWKV2LM(checkpoint=str(char_setup["ckpt"]), max_length=16)
    short = windowed.loglikelihood_rolling(instances("loglikelihood_rolling", [(text,)]), disable_tqdm=True)[0]
    assert math.isfinite(short) and short != pytest.approx(rolling[0], rel=1e-3)  # less context per token

    # Greedy generation after the "\n" prefix equals the reference's argmax decoding, ended by
    # token 0 and cut at the first `until` string; prompts of different lengths share a batch.
    def reference(prompt, n=12):
        ids = torch_greedy(ref, tok.encode("\n" + prompt).ids, n)[len(prompt) + 1:]
        return tok.decode(ids[:ids.index(0)] if 0 in ids else ids)

    a_model, rwkv_is, the_time = reference("A model"), reference("RWKV is"), reference("The time")
    assert len(a_model) == len(rwkv_is) == 12  # (the_time may well end at once with token 0)
    out = whole.generate_until(instances("generate_until", [
        ("A model", {"until": [a_model[5]], "max_gen_toks": 12}),
        ("RWKV is", {"until": ["@@"], "max_gen_toks": 12, "do_sample": False}),
        ("The time", {"until": "@@", "max_gen_toks": 12}),
    ]), disable_tqdm=True)
    assert out == [a_model[:a_model.index(a_model[5])], rwkv_is, the_time]


def test_harness_simple_evaluate_on_a_local_task(harness, char_setup, lambada_docs, tmp_path, capsys):
    lm_eval, _ = harness
    from lm_eval.tasks import TaskManager

    data = write_jsonl(tmp_path / "local.jsonl", lambada_docs)
    (tmp_path / "tasks").mkdir()
    # lambada_openai's definition, reading a local file instead of the hub's dataset.
    (tmp_path / "tasks" / "lambada_local.yaml").write_text(f"""
task: lambada_local
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {tmp_path / "hf_cache"}
output_type: loglikelihood
test_split: test
doc_to_text: "{{{{text.split(' ')[:-1]|join(' ')}}}}"
doc_to_target: "{{{{' '+text.split(' ')[-1]}}}}"
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    results = lm_eval.simple_evaluate(
        model="rwkv2_jax", model_args=f"checkpoint={char_setup['ckpt']}", batch_size=4,
        tasks=["lambada_local"], task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False),
        bootstrap_iters=0,
    )["results"]["lambada_local"]
    out = tmp_path / "cli.json"
    assert ev_cli.main(["lambada", str(data), "--checkpoint", str(char_setup["ckpt"]), "--batch-size", BATCH,
                        "--output", str(out)]) == 0
    cli = json.loads(out.read_text())
    assert results["perplexity,none"] == pytest.approx(cli["ppl"], rel=1e-6)
    assert results["acc,none"] == cli["acc"] and 0 < cli["acc"] < 1


def test_harness_command_line_finds_the_model(harness, tmp_path):
    r = subprocess.run([sys.executable, "-m", "rwkv2_jax.evaluation.lm_eval_adapter", "--model", "rwkv2_jax",
                        "--model_args", f"checkpoint={tmp_path / 'none.pth'}", "--tasks", "lambada_openai"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1] == f"rwkv2-lm-eval: error: checkpoint not found: {tmp_path / 'none.pth'}"


def test_harness_command_line_checks_paths_before_lm_eval(harness, char_setup, tmp_path, capsys, monkeypatch):
    """A missing checkpoint or tokenizer in --model_args is one line before lm_eval starts
    (which first indexes every task it knows, ~10 s); good paths go on to lm_eval."""
    _, adapter = harness
    started = []
    monkeypatch.setattr("lm_eval.__main__.cli_evaluate", lambda: started.append(sys.argv[1:]))
    monkeypatch.setattr(adapter.multiprocessing, "set_start_method", lambda *a, **k: None)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    ckpt, lonely = char_setup["ckpt"], tmp_path / "lonely.pth"
    shutil.copy(ckpt, lonely)
    for argv, message in [
        (["--model", "rwkv2_jax", "--model_args", f"checkpoint={tmp_path / 'none.pth'}"],
         f"checkpoint not found: {tmp_path / 'none.pth'}"),
        (["--model=rwkv2_jax", "-a", f"checkpoint={ckpt}", f"tokenizer={tmp_path / 'none.json'}"],
         f"tokenizer not found: {tmp_path / 'none.json'}"),
        (["--model", "rwkv2_jax", "--model_args", f"checkpoint={lonely},batch_size=2"],
         f"tokenizer not found next to {lonely}"),
    ]:
        assert adapter.main([*argv, "--tasks", "lambada_openai"]) == 2
        assert capsys.readouterr().err.startswith(f"rwkv2-lm-eval: error: {message}")
    assert not started
    tokenizer = char_setup["root"] / TOKENIZER_NAMES[0]
    good = ["--model", "rwkv2_jax", "--model_args", f"checkpoint={ckpt},tokenizer={tokenizer}", "--tasks", "lambada_openai"]
    assert adapter.main(good) == 0 and started == [good]


def test_harness_help_documents_its_own_arguments(harness, capsys):
    _, adapter = harness
    assert adapter.main(["--help"]) == 0
    out = capsys.readouterr().out
    for needle in ("--model rwkv2_jax", "checkpoint=", "tokenizer=", "newline_prefix=", "max_length=",
                   "--include_path examples/lm_eval", "forkserver"):
        assert needle in out, needle


@pytest.mark.slow
def test_harness_runs_the_shipped_offline_task_without_forking(harness, char_setup, tmp_path):
    """examples/lm_eval's task, on the command line as the README shows it: the same numbers as
    `rwkv2-eval lambada` on its data, and no fork of the JAX process (lm_eval's bootstrap pool)."""
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf"), "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "rwkv2_jax.evaluation.lm_eval_adapter", "--model", "rwkv2_jax",
                        "--model_args", f"checkpoint={char_setup['ckpt']}", "--tasks", "lambada_offline",
                        "--include_path", "examples/lm_eval", "--batch_size", "4",
                        "--output_path", str(tmp_path / "results")],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "os.fork()" not in r.stderr and "fork" not in r.stderr.lower(), r.stderr[-3000:]
    (results_file,) = (tmp_path / "results").rglob("results_*.json")
    harness_numbers = json.loads(results_file.read_text())["results"]["lambada_offline"]
    out = tmp_path / "cli.json"
    assert ev_cli.main(["lambada", str(REPO / "examples/lm_eval/lambada_offline.jsonl"), "--checkpoint",
                        str(char_setup["ckpt"]), "--batch-size", BATCH, "--output", str(out)]) == 0
    cli = json.loads(out.read_text())
    assert cli["n"] == 8
    assert harness_numbers["perplexity,none"] == pytest.approx(cli["ppl"], rel=1e-6)
    assert harness_numbers["acc,none"] == cli["acc"]
