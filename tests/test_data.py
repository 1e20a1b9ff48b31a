"""Token files: streaming tokenization equals whole-document tokenization; memory-mapped
reading with checks; seeded windows that depend on (seed, step) only; the prepare_data CLI."""

import io
import json
import subprocess
import sys

import numpy as np
import pytest

from rwkv2_jax.training.data import (
    DataError,
    TokenFile,
    WindowSampler,
    _chunks,
    eval_windows,
    load_tokens,
    token_dtype,
    tokenize_to_npy,
)
from rwkv2_jax.cli.demo import DEMO_TEXT
from rwkv2_jax.cli.prepare_data import main as prepare_main
from tests.conftest import REPO, SHARED_TOKENIZER


def byte_level_bpe():
    """A small BPE with the 20B tokenizer's pipeline (NFC, GPT-2 byte-level pre-tokenizer),
    trained here so the test needs no download."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([DEMO_TEXT] * 4, trainer)
    return tok


def tokenizers_under_test():
    toks = [("bpe", byte_level_bpe())]
    if SHARED_TOKENIZER.is_file():  # the real 20B tokenizer in the dev checkout
        from tokenizers import Tokenizer

        toks.append(("20B", Tokenizer.from_file(str(SHARED_TOKENIZER))))
    return toks


# Whitespace runs, newlines, contractions, accents (combining and precomposed), emoji, special token.
ALPHABET = list("ab xyZ  \n\n\t'sé1 2.,!?") + ["\u0301", "😀", "ﬁ", "<|endoftext|>", "'re", " \n", "  ", "the"]


@pytest.mark.parametrize("name,tok", tokenizers_under_test(), ids=lambda x: x if isinstance(x, str) else "")
def test_chunked_tokenization_equals_whole(name, tok, rng):
    for _ in range(300):
        text = "".join(rng.choice(ALPHABET, size=rng.integers(1, 80)))
        whole = tok.encode(text, add_special_tokens=False).ids
        for chunk_chars in (1, 3, 7):
            pieces = list(_chunks(io.StringIO(text).read, chunk_chars))
            assert "".join(pieces) == text
            ids = [i for p in pieces for i in tok.encode(p, add_special_tokens=False).ids]
            assert ids == whole, (text, pieces)


def test_tokenize_file_folder_and_jsonl(tmp_path):
    tok = byte_level_bpe()
    enc = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
    eot = tok.token_to_id("<|endoftext|>")
    docs = [DEMO_TEXT, "Second file.\n\nWith  spaces\r\nand CRLF.\n", "Third: émoji 😀 done"]

    # One .txt is one document, streamed in small chunks: exactly the ids of the whole text.
    (tmp_path / "one.txt").write_text(docs[0])
    res = tokenize_to_npy([tmp_path / "one.txt"], tmp_path / "one.npy", tok, chunk_chars=50, progress=False)
    one = np.load(tmp_path / "one.npy")
    assert one.dtype == np.uint16 and res.n_documents == 1
    assert one.tolist() == enc(docs[0])

    # A folder: files in sorted order (recursively), <|endoftext|> between documents;
    # text is read with universal newlines, as open(path).read().
    folder = tmp_path / "books"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(docs[0])
    (folder / "sub" / "b.txt").write_bytes(docs[1].encode())
    (folder / "c.txt").write_text(docs[2])
    (folder / "ignored.md").write_text("not text input")
    tokenize_to_npy([folder], tmp_path / "f.npy", tok, chunk_chars=20, progress=False)
    want = enc(docs[0]) + [eot] + enc(docs[2]) + [eot] + enc(docs[1].replace("\r\n", "\n"))
    assert np.load(tmp_path / "f.npy").tolist() == want  # a.txt, c.txt, sub/b.txt

    # .jsonl: one document per line, from the text field.
    lines = [json.dumps({"text": d, "id": i}) for i, d in enumerate(docs)]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n\n")
    res = tokenize_to_npy([tmp_path / "c.jsonl"], tmp_path / "j.npy", tok, separator=None, progress=False)
    assert res.n_documents == 3
    assert np.load(tmp_path / "j.npy").tolist() == enc(docs[0]) + enc(docs[1]) + enc(docs[2])

    (tmp_path / "bad.jsonl").write_text(lines[0] + "\n" + json.dumps({"body": "x"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:2: no string field 'text'"):
        tokenize_to_npy([tmp_path / "bad.jsonl"], tmp_path / "x.npy", tok, progress=False)
    assert not (tmp_path / "x.npy").exists() and not (tmp_path / "x.npy.tmp").exists()


def test_large_vocab_gives_uint32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {f"w{i}": i for i in range(70_000)}
    words["[UNK]"] = 70_000
    tok = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    (tmp_path / "t.txt").write_text("w1 w65535 w65536 w69999 w3")
    tokenize_to_npy([tmp_path / "t.txt"], tmp_path / "t.npy", tok, progress=False)
    out = np.load(tmp_path / "t.npy")
    assert out.dtype == np.uint32 and out.tolist() == [1, 65535, 65536, 69999, 3]
    assert token_dtype(65536) == np.uint16 and token_dtype(65537) == np.uint32


def test_token_file_checks(tmp_path):
    good = tmp_path / "good.npy"
    np.save(good, np.arange(100, dtype=np.uint16) % 50)
    assert len(TokenFile(good, vocab_size=50, min_tokens=17)) == 100
    assert isinstance(load_tokens(good), np.memmap)

    with pytest.raises(DataError, match="token file not found: .*missing.npy"):
        TokenFile(tmp_path / "missing.npy", 50, 17)
    (tmp_path / "text.npy").write_text("hello")
    with pytest.raises(DataError, match="cannot read .*text.npy as a .npy token file"):
        TokenFile(tmp_path / "text.npy", 50, 17)
    np.save(tmp_path / "2d.npy", np.zeros((4, 4), np.uint16))
    with pytest.raises(DataError, match=r"expected a 1-D array of token ids, got shape \[4, 4\]"):
        TokenFile(tmp_path / "2d.npy", 50, 17)
    np.save(tmp_path / "f.npy", np.zeros(40, np.float32))
    with pytest.raises(DataError, match="must be integers, got dtype float32"):
        TokenFile(tmp_path / "f.npy", 50, 17)
    with pytest.raises(DataError, match="has 100 tokens, fewer than the 101 needed"):
        TokenFile(good, 50, 101)
    ids = np.arange(100, dtype=np.uint16) % 50
    ids[73] = 50
    np.save(tmp_path / "big.npy", ids)
    with pytest.raises(DataError, match=r"token id 50 at position 73 is outside \[0, vocab_size=50\)"):
        TokenFile(tmp_path / "big.npy", 50, 17)


def test_windows_depend_on_seed_and_step_only():
    tokens = np.arange(1000, dtype=np.uint16)
    a, b = WindowSampler(tokens, 16, seed=3), WindowSampler(tokens, 16, seed=3)
    batch = a.batch(5, grad_accum=2, batch_size=4)
    assert batch.shape == (2, 4, 17) and batch.dtype == np.int32
    # Reproducible in any order (a resumed run asks for step 5 without steps 0..4).
    b.batch(0, 2, 4)
    np.testing.assert_array_equal(b.batch(5, 2, 4), batch)
    # Each row is a contiguous window of the file.
    rows = batch.reshape(-1, 17)
    np.testing.assert_array_equal(rows, rows[:, :1] + np.arange(17))
    assert not np.array_equal(a.batch(6, 2, 4), batch)
    assert not np.array_equal(WindowSampler(tokens, 16, seed=4).batch(5, 2, 4), batch)
    # Starts cover [0, N - ctx_len - 1]: the last window ends at the last token.
    starts = a.starts(0, 20_000)
    assert starts.min() == 0 and starts.max() == 1000 - 17
    # A file of exactly one window always gives that window.
    one = WindowSampler(np.arange(17, dtype=np.uint16), 16, seed=0)
    np.testing.assert_array_equal(one.batch(9, 1, 3)[0], np.tile(np.arange(17), (3, 1)))
    with pytest.raises(DataError, match="fewer than one window"):
        WindowSampler(np.arange(16, dtype=np.uint16), 16, seed=0)


def test_eval_windows_are_consecutive():
    tokens = np.arange(100, dtype=np.uint16)
    w = eval_windows(tokens, 16, 100)
    assert w.shape == (6, 17)  # (100 - 1) // 16
    np.testing.assert_array_equal(w[:, 0], np.arange(6) * 16)
    np.testing.assert_array_equal(w[1], np.arange(16, 33))


def test_prepare_data_cli(tmp_path, capsys):
    tok = byte_level_bpe()
    tok.save(str(tmp_path / "tok.json"))
    (tmp_path / "in.txt").write_text(DEMO_TEXT)
    out = tmp_path / "out.npy"
    args = [str(tmp_path / "in.txt"), "--tokenizer", str(tmp_path / "tok.json"), "--out", str(out),
            "--no-progress"]
    assert prepare_main(args + ["--verify", "--verify-tokens", "5"]) == 0
    text = capsys.readouterr().out
    ids = tok.encode(DEMO_TEXT, add_special_tokens=False).ids
    assert f"{len(ids):,} tokens (uint16)" in text
    assert repr(tok.decode(ids[:5])) in text and repr(tok.decode(ids[-5:])) in text
    assert np.load(out).tolist() == ids

    def error(argv, pattern):
        assert prepare_main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("rwkv2-prepare-data: error: ") and pattern in err, err

    error(args, "out.npy exists; pass --force")
    error([str(tmp_path / "nope.txt")] + args[1:] + ["--force"], "input not found: ")
    error(args[:2] + [str(tmp_path / "no.json")] + args[3:], "tokenizer not found")
    (tmp_path / "bad.json").write_text("{not json")
    error(args[:2] + [str(tmp_path / "bad.json")] + args[3:], "cannot read tokenizer")
    # --tokenizer may name the folder holding tokenizer.json (or 20B_tokenizer.json).
    (tmp_path / "folder").mkdir()
    tok.save(str(tmp_path / "folder" / "tokenizer.json"))
    assert prepare_main(args[:2] + [str(tmp_path / "folder")] + args[3:] + ["--force"]) == 0
    assert np.load(out).tolist() == ids
    (tmp_path / "bin.txt").write_bytes(b"ok\xff\xfe bad")
    error([str(tmp_path / "bin.txt")] + args[1:] + ["--force"], "not UTF-8 text")


def test_prepare_data_help():
    r = subprocess.run([sys.executable, "-m", "rwkv2_jax.cli.prepare_data", "--help"], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 0
    for flag in ("--tokenizer", "--out", "--text-field", "--separator", "--verify", "--chunk-chars"):
        assert flag in r.stdout
