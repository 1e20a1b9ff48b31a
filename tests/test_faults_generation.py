"""Generation faults: the sampler never draws a banned token (tiny temperatures under jit, NaN
logits or state, extreme penalties), bad CLI values get one line, text streams in O(1) per token,
and a state file written onto a directory is one line (docs/reliability.md lists each guarantee)."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import rwkv2_jax as rw
from rwkv2_jax.cli import sample
from rwkv2_jax.formats import CheckpointError
from rwkv2_jax.generation.generator import generate, stream
from rwkv2_jax.generation.sampling import (NONFINITE, PENALTY_BOUND, TEMPERATURE_FLOOR, SamplingParams, draw,
                                           penalize, sample_logits)
from rwkv2_jax.generation.state_file import save_state
from rwkv2_jax.model import State
from tests.conftest import REPO, SMALL, one_line_error, real_tokenizer_path
from rwkv2_jax.testing.release_checkpoint import write_release_checkpoint

V = SMALL["vocab_size"]
PROMPTS = [[5, 9, 2], list(range(1, 12))]
TINY = [1e-6, 1e-10, 1e-20, 1e-30]


@pytest.fixture(scope="module")
def model(release_files):
    return rw.load_torch(release_files["plain"], verbose=False)


def allowed_argmax(logits, banned):
    return np.argmax(np.where(banned, -np.inf, logits), axis=-1)


# --- the draw itself -------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("temperature", TINY)
def test_tiny_temperature_is_greedy_among_allowed_tokens_under_jit(rng, temperature):
    B, N = 64, 500
    logits = (rng.normal(size=(B, N)) * rng.uniform(0.5, 20, size=(B, 1))).astype(np.float32)
    banned = np.zeros(N, bool)
    banned[0] = True
    banned[np.argmax(logits, axis=-1)] = True  # every row's favourite is banned
    want = allowed_argmax(logits, banned)
    key = jax.random.key(int(rng.integers(1 << 30)))
    for kw in ({}, {"top_p": 0.7}, {"top_k": 5}):
        # the temperature a compile-time constant, which XLA folds into the arithmetic ...
        fixed = jax.jit(lambda x, k: sample_logits(x, k, jnp.asarray(banned), temperature=temperature, **kw))
        np.testing.assert_array_equal(np.asarray(fixed(logits, key)), want)
        # ... and a traced value (as generate passes it)
        p = SamplingParams(temperature=temperature, ban_tokens=np.flatnonzero(banned).tolist(), **kw)
        masked = jnp.where(jnp.asarray(banned), -jnp.inf, jnp.asarray(logits))
        traced = jax.jit(draw, static_argnums=3)(masked, jax.random.split(key, B), p.knobs(), p.static())
        np.testing.assert_array_equal(np.asarray(traced), want)


@pytest.mark.parametrize("temperature", [2 * TEMPERATURE_FLOOR, 1e-3])
def test_just_above_the_floor_still_samples_and_never_draws_a_ban(rng, temperature):
    """Two allowed tokens 0.5 T apart in logit share the draws as e^-0.5; the banned best never comes."""
    N = 4000
    row = np.full(10, -30.0, np.float32)
    row[3] = 50.0  # banned
    row[6], row[8] = 20.0, 20.0 - 0.5 * temperature
    banned = np.zeros(10, bool)
    banned[3] = True
    keys = jax.random.split(jax.random.key(int(rng.integers(1 << 30))), N)
    tokens = np.asarray(jax.jit(lambda x, k: sample_logits(x, k, jnp.asarray(banned), temperature=temperature))(
        jnp.broadcast_to(row, (N, 10)), keys))
    assert set(tokens.tolist()) == {6, 8}
    share = np.mean(tokens == 8)
    assert abs(share - np.exp(-0.5) / (1 + np.exp(-0.5))) < 0.05  # 0.378; float32 rounds 20 - 1e-4 a little


@pytest.mark.slow
def test_nonfinite_logits_draw_nonfinite_never_a_token(rng):
    logits = rng.normal(size=(5, V)).astype(np.float32)
    logits[1, 7] = np.nan
    logits[2, 9] = np.inf
    logits[3, 1:] = -np.inf  # only the banned token 0 is finite
    logits[4, :] = np.nan
    banned = np.zeros(V, bool)
    banned[0] = True
    for temperature in (0.0, 1e-20, 1.0):
        for kw in ({}, {"top_p": 0.5}, {"top_k": 3}):
            got = np.asarray(jax.jit(lambda x: sample_logits(x, jax.random.key(0), jnp.asarray(banned),
                                                             temperature=temperature, **kw))(logits))
            assert got[0] not in (0, NONFINITE) and (got[1:] == NONFINITE).all(), (temperature, kw, got)


def test_penalties_are_bounded_and_keep_bans():
    logits = jnp.array([[-jnp.inf, 1.0, 2.0, 3.0]])
    seen = jnp.array([[False, True, True, False]])
    counts = jnp.array([[0.0, 1e10, 4.0, 0.0]])
    for presence, frequency in ((0.0, -1e38), (1e38, 0.0), (-1e38, -1e38), (1e38, 1e38), (-1e38, 1e38)):
        out = np.asarray(penalize(logits, seen, counts, jnp.float32(presence), jnp.float32(frequency)))
        assert out[0, 0] == -np.inf and np.isfinite(out[0, 1:]).all(), (presence, frequency, out)
        assert np.abs(out[0, 1:3]).max() <= PENALTY_BOUND * 1.001


# --- generate: bans, penalties, non-finite logits ----------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("temperature", TINY)
def test_generate_at_tiny_temperatures_equals_greedy(model, temperature):
    ban = tuple(range(0, V, 3))
    greedy = generate(model, PROMPTS, 12, temperature=0, ban_tokens=ban)
    assert generate(model, PROMPTS, 12, temperature=temperature, ban_tokens=ban, seed=7) == greedy
    assert not {t for row in greedy for t in row} & set(ban)


@pytest.mark.parametrize("presence,frequency", [(0.0, -1e38), (-1e38, 0.0), (1e38, 1e38), (-1e38, 1e38)])
def test_extreme_penalties_never_draw_a_banned_token(model, presence, frequency):
    ban = tuple(range(0, V, 2))  # half the vocabulary, token 0 included
    for temperature in (0.0, 1.0, 1e-30):
        out = generate(model, PROMPTS, 24, temperature=temperature, presence_penalty=presence,
                       frequency_penalty=frequency, ban_tokens=ban, seed=3)
        tokens = {t for row in out for t in row}
        assert all(len(row) == 24 for row in out) and not tokens & set(ban), (temperature, out)


def test_huge_top_k_is_no_cut(model):
    assert generate(model, PROMPTS, 10, top_k=2**40, seed=4) == generate(model, PROMPTS, 10, seed=4)


@pytest.mark.parametrize("loop", ["host", "device"])
def test_nan_state_is_an_error_naming_row_and_step(model, loop):
    state = model.init_state(2)
    state = State(*(x.at[:, 1].set(jnp.nan) if i == 2 else x for i, x in enumerate(state)))  # row 1's aa
    with pytest.raises(ValueError, match=r"row 1: the model's logits are not finite \(NaN or inf\) at step 0"):
        generate(model, PROMPTS, 5, state=state, decode_loop=loop)
    with pytest.raises(ValueError, match=r"row 0: .* not finite .* at step 0"):
        list(stream(model, PROMPTS[0], 5, state=State(*(jnp.full_like(x[:, :1], jnp.nan) for x in state))))


@pytest.mark.slow
def test_nan_reached_mid_generation_names_the_step(release_files):
    """Weights with a NaN embedding row for one token: the error comes at the step after it is drawn."""
    sd = {k: v.numpy() for k, v in torch.load(release_files["plain"], weights_only=True).items()}
    n = 10
    first = generate(rw.from_release_arrays(sd, verbose=False), PROMPTS, n, temperature=0)
    # a token row 1 draws first at step s, which row 0 never sees
    s = next((s for s in range(n - 1) if first[1][s] not in PROMPTS[1] + first[1][:s] + PROMPTS[0] + first[0]),
             None)
    assert s is not None, first
    sd["emb.weight"][first[1][s]] = np.nan
    broken = rw.from_release_arrays(sd, verbose=False, allow_nonfinite=True)
    for loop in ("host", "device"):
        with pytest.raises(ValueError, match=rf"row 1: .* not finite .* at step {s + 1} "):
            generate(broken, PROMPTS, n, temperature=0, decode_loop=loop)


# --- sample.py -----------------------------------------------------------------------------------


def run_sample(*argv):
    """sample.main's exit status; argparse errors give theirs through SystemExit."""
    try:
        code = sample.main(list(argv))
    except SystemExit as exit_info:
        code = exit_info.code
    return code


def test_sample_tiny_temperature_prints_the_greedy_text(char_release, capsys):
    ckpt, tok, _ = char_release
    base = ["--checkpoint", str(ckpt), "--tokenizer", str(tok), "--prompt", "The", "--tokens", "8"]
    assert sample.main(base + ["--temperature", "0"]) == 0
    greedy = capsys.readouterr().out
    assert sample.main(base + ["--temperature", "1e-12"]) == 0
    captured = capsys.readouterr()
    assert captured.out == greedy and len(greedy.strip()) == len("The") + 8
    assert "below 0.0001: greedy" in captured.err


def test_sample_huge_values_are_validated_or_clamped(char_release, capsys):
    ckpt, tok, _ = char_release
    base = ["--checkpoint", str(ckpt), "--tokenizer", str(tok), "--tokens", "3"]
    assert sample.main(base + ["--top-k", "1099511627776"]) == 0
    assert "--top-k 1099511627776 >= the vocabulary" in capsys.readouterr().err
    one_line_error(capsys, run_sample(*base, "--seed", str(2**70)), "--seed must be in [0, 2^32)")
    one_line_error(capsys, run_sample(*base, "--seed", "2**70"), "invalid int value: '2**70'")
    one_line_error(capsys, run_sample(*base, "--seed", "-1"), "--seed must be in [0, 2^32)")
    one_line_error(capsys, run_sample(*base, "--temperature", "nan"), "--temperature must be a finite")
    one_line_error(capsys, run_sample(*base, "--frequency-penalty", "inf"), "--frequency-penalty must be")
    assert sample.main(base + ["--seed", str(2**32 - 1), "--num-samples", "2"]) == 0  # seeds wrap past 2^32


def test_sample_nonfinite_weights(char_release, tmp_path, capsys):
    _, tok, sd = char_release
    sd = {k: v.clone() for k, v in sd.items()}
    sd["blocks.0.ffn.key.weight"][2, 3] = float("nan")
    ckpt = write_release_checkpoint(tmp_path / "nan.pth", sd)
    base = ["--checkpoint", str(ckpt), "--tokenizer", str(tok), "--tokens", "3"]
    one_line_error(capsys, sample.main(base), "key 'blocks.0.ffn.key.weight' holds 1 non-finite values")
    one_line_error(capsys, sample.main(base + ["--allow-nonfinite"]), "row 0: the model's logits are not finite")


def test_sample_reads_a_misnamed_checkpoint(char_release, tmp_path, capsys):
    ckpt, tok, _ = char_release
    misnamed = tmp_path / "model.safetensors"
    misnamed.write_bytes(ckpt.read_bytes())
    assert sample.main(["--checkpoint", str(misnamed), "--tokenizer", str(tok), "--tokens", "2"]) == 0


# --- text streaming -------------------------------------------------------------------------------


def test_detokenizer_streams_exactly_the_decoded_text(rng):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(real_tokenizer_path()))
    text = "naïve café 世界 🎉🦀 — ünïcödé\n" + "".join(chr(int(c)) for c in rng.integers(0x20, 0x2FFF, 200))
    ids = tok.encode(text).ids + rng.integers(1, tok.get_vocab_size(), 300).tolist()
    detok = rw.Tokenizer(tok).decode_stream()
    pieces = [detok.push(t) for t in ids] + [detok.flush()]  # flush: an unfinished last character
    assert "".join(pieces) == tok.decode(ids)
    assert "\ufffd" not in "".join(pieces[: len(tok.encode(text).ids)])  # split characters wait for their bytes
    emoji, detok = tok.encode("🦀").ids, rw.Tokenizer(tok).decode_stream()
    assert len(emoji) > 1 and [detok.push(t) for t in emoji] == [""] * (len(emoji) - 1) + ["🦀"]


def test_stream_text_bench_smoke():
    real_tokenizer_path()
    r = subprocess.run([sys.executable, "bench/stream_text.py", "--tokens", "4096", "--window", "512",
                        "--redecode-window", "16", "--repeats", "1"], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "CORRECTNESS: PASS" in r.stdout and "| incremental (DecodeStream; sample.py) |" in r.stdout


# --- state files ------------------------------------------------------------------------------------


def test_save_state_onto_a_directory_is_one_line(model, tmp_path):
    target = tmp_path / "chat"
    target.mkdir()
    with pytest.raises(CheckpointError, match="chat: it is a directory"):
        save_state(target, model.init_state(1), model)
    assert not any(target.iterdir()) and not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_generate_takes_seeds_of_any_size(model):
    """Seeds are used modulo 2**32: 2**70 + b draws as b does, and a bad seed list is one line."""
    kw = dict(temperature=1.0, top_p=1.0)
    big = generate(model, PROMPTS, 6, seed=2**70, **kw)  # 2**70 % 2**32 == 0
    assert big == generate(model, PROMPTS, 6, seed=0, **kw)
    assert generate(model, PROMPTS, 6, seed=[2**40 + 7, 3], **kw)[1] == generate(model, [PROMPTS[1]], 6, seed=3, **kw)[0]
    with pytest.raises(ValueError, match=r"seed must be an int or 2 ints"):
        generate(model, PROMPTS, 6, seed=[1.5, 2], **kw)
