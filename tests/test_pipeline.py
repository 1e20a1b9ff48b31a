"""Text in, text out: rw.load_tokenizer / find_tokenizer, incremental detokenization across
multi-byte characters, and rw.Pipeline against the token-level API it wraps."""

import numpy as np
import pytest
import tokenizers

import rwkv2_jax as rw
from rwkv2_jax.cli.demo import DEMO_TEXT, char_tokenizer
from tests.conftest import real_tokenizer_path
from rwkv2_jax.testing.release_checkpoint import make_release_state_dict, write_release_checkpoint

# Characters of 2, 3 and 4 UTF-8 bytes; the 20B tokenizer splits most of them over byte tokens.
MULTI_BYTE = list("éßñ東京日本語한국어😀🎉🦀ℝ∑")


@pytest.fixture(scope="module")
def char_pipe(tmp_path_factory):
    """A Pipeline over a random release checkpoint with the demo's character tokenizer."""
    root = tmp_path_factory.mktemp("pipeline")
    char_tokenizer(DEMO_TEXT).save(str(root / "tokenizer.json"))
    tokenizer = rw.load_tokenizer(root)
    sd = make_release_state_dict(n_layer=2, n_embd=16, vocab_size=tokenizer.vocab_size, seed=5)
    model = rw.load_torch(write_release_checkpoint(root / "m.pth", sd), verbose=False)
    return rw.Pipeline(model, tokenizer)


# --- the tokenizer ---------------------------------------------------------------------------


def test_load_tokenizer_from_a_file_a_folder_or_next_to_a_checkpoint(tmp_path):
    char_tokenizer("ab").save(str(tmp_path / "tokenizer.json"))
    ckpt = tmp_path / "model.pth"
    assert rw.find_tokenizer(ckpt) == tmp_path / "tokenizer.json"
    assert rw.load_tokenizer(tmp_path).vocab_size == 3
    char_tokenizer("abc").save(str(tmp_path / "20B_tokenizer.json"))  # the release's name comes first
    assert rw.find_tokenizer(ckpt) == tmp_path / "20B_tokenizer.json"
    tok = rw.load_tokenizer(tmp_path)
    assert tok.vocab_size == 4 and tok.path == tmp_path / "20B_tokenizer.json"
    assert tok.encode("cab") == [3, 1, 2] and tok.decode([3, 1, 2]) == "cab"
    assert rw.load_tokenizer(tmp_path / "tokenizer.json").vocab_size == 3
    assert rw.load_tokenizer(ckpt).path == tmp_path / "20B_tokenizer.json"  # the one beside a checkpoint

    with pytest.raises(rw.TokenizerError, match="tokenizer not found next to .*looked for 20B_tokenizer.json "
                                                "and tokenizer.json"):
        rw.find_tokenizer(tmp_path / "empty" / "model.pth")
    with pytest.raises(rw.TokenizerError, match="tokenizer not found: .*none.json"):
        rw.load_tokenizer(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(rw.TokenizerError, match="cannot read tokenizer .*bad.json"):
        rw.load_tokenizer(tmp_path / "bad.json")
    with pytest.raises(rw.TokenizerError, match="has 4 tokens but the model only 3"):
        tok.check_fits(3)
    with pytest.raises(TypeError, match="encode takes a str"):
        tok.encode([1, 2])


def test_the_real_tokenizer_through_the_thin_layer():
    path = real_tokenizer_path()
    tok = rw.load_tokenizer(path)
    backend = tokenizers.Tokenizer.from_file(str(path))
    text = "In a shocking finding, scientists discovered a herd of dragons. 東京 😀"
    assert tok.vocab_size == 50277
    assert tok.encode(text) == backend.encode(text).ids and tok.decode(tok.encode(text)) == text
    assert tok.encode_batch([text, "\n"]) == [tok.encode(text), [187]]
    assert tok.token_to_id("<|endoftext|>") == 0


def stream_pieces(tokenizer, ids):
    stream = tokenizer.decode_stream()
    return [stream.push(i) for i in ids], stream.flush()


def test_decode_stream_keeps_multi_byte_characters_whole(rng):
    tok = rw.load_tokenizer(real_tokenizer_path())
    for _ in range(20):
        text = "".join(rng.choice(MULTI_BYTE + [" ", "a", "z"], size=int(rng.integers(1, 30))))
        ids = tok.encode(text)
        pieces, tail = stream_pieces(tok, ids)
        assert "".join(pieces) == text and tail == ""
        assert not any("\ufffd" in p for p in pieces)  # never half a character
        assert sum(p == "" for p in pieces) == len(ids) - sum(p != "" for p in pieces)
    split = tok.encode("😀")  # one character, four byte-level tokens
    assert len(split) > 1 and stream_pieces(tok, split)[0] == [""] * (len(split) - 1) + ["😀"]
    # A stream cut inside a character: flush gives what decode gives for it.
    pieces, tail = stream_pieces(tok, split[:-1])
    assert pieces == [""] * (len(split) - 1) and tail == tok.decode(split[:-1])
    # Any ids at all (invalid byte sequences included): the pieces and the tail add up to decode.
    for _ in range(20):
        ids = rng.integers(0, tok.vocab_size, size=int(rng.integers(1, 40))).tolist()
        pieces, tail = stream_pieces(tok, ids)
        assert "".join(pieces) + tail == tok.decode(ids)


def test_decode_stream_of_the_demo_tokenizer(char_pipe):
    tok = char_pipe.tokenizer
    ids = tok.encode(DEMO_TEXT[:200])
    pieces, tail = stream_pieces(tok, ids)
    assert pieces == list(DEMO_TEXT[:200]) and tail == ""


# --- the pipeline ------------------------------------------------------------------------------


@pytest.mark.slow
def test_pipeline_generate_is_the_token_api_on_encoded_text(char_pipe, rng):
    pipe, tok, model = char_pipe, char_pipe.tokenizer, char_pipe.model
    seed = int(rng.integers(1 << 30))
    sampling = dict(temperature=0.9, top_p=0.8, presence_penalty=0.3, seed=seed)
    text = pipe.generate("The time mix", 24, **sampling)
    assert text == tok.decode(rw.generate(model, [tok.encode("The time mix")], 24, **sampling)[0])
    assert len(text) == 24  # one character per token
    # A batch: row b as that prompt alone with seed + b.
    prompts = ["RWKV is", "A model with a state", "The"]
    batch = pipe.generate(prompts, 16, **sampling)
    assert batch == [pipe.generate(p, 16, **{**sampling, "seed": seed + b}) for b, p in enumerate(prompts)]
    assert pipe.generate("The", 0) == ""


@pytest.mark.slow
def test_pipeline_stream_equals_generate(char_pipe, rng):
    pipe = char_pipe
    seed = int(rng.integers(1 << 30))
    pieces = list(pipe.stream("The channel mix", 20, temperature=1.0, seed=seed))
    assert len(pieces) == 20 and "".join(pieces) == pipe.generate("The channel mix", 20, seed=seed)
    prompts = ["In GPT mode", "Both"]
    steps = list(pipe.stream_batch(prompts, 12, temperature=0.7, seed=seed))
    rows = ["".join(step[b] for step in steps) for b in range(2)]
    assert rows == pipe.generate(prompts, 12, temperature=0.7, seed=seed)
    # A stop token ends its row: the row's pieces stop, the other row goes on.
    stop = pipe.tokenizer.encode(rows[0][3])[0]
    stopped = list(pipe.stream_batch(prompts, 12, temperature=0.7, seed=seed, stop_tokens=(stop,)))
    assert "".join(s[0] for s in stopped) == rows[0][:rows[0].index(rows[0][3])]


def test_pipeline_loglikelihood_is_the_token_api_on_encoded_text(char_pipe):
    pipe, tok = char_pipe, char_pipe.tokenizer
    pairs = [("The time mix keeps two running", " sums"), ("", "RWKV"), ("A", " model with")]
    want = rw.loglikelihood(pipe.model, [(tok.encode(c), tok.encode(k)) for c, k in pairs])
    assert pipe.loglikelihood([c for c, _ in pairs], [k for _, k in pairs]) == want
    c, k = pairs[0]
    assert pipe.loglikelihood(c, k) == rw.loglikelihood(pipe.model, [(tok.encode(c), tok.encode(k))])[0]
    logprob, greedy = want[0]
    assert logprob < 0 and isinstance(greedy, bool)


def test_pipeline_continues_a_saved_conversation(char_pipe, tmp_path):
    pipe = char_pipe
    first = "RWKV is a recurrent network"
    reply, state = pipe.generate(first, 10, temperature=0, return_state=True)
    rw.save_state(tmp_path / "chat.safetensors", state, pipe.model)
    later = rw.load_state(tmp_path / "chat.safetensors", pipe.model)
    more = pipe.generate(" The time mix", 12, temperature=0, state=later)
    assert more == pipe.generate(first + reply + " The time mix", 12, temperature=0)  # the whole text again
    assert "".join(pipe.stream(" The time mix", 12, temperature=0, state=later)) == more


def test_pipeline_with_the_real_tokenizer_streams_characters_split_over_tokens(tmp_path, rng):
    path = real_tokenizer_path()
    sd = make_release_state_dict(n_layer=1, n_embd=8, vocab_size=50277, seed=0)
    model = rw.load_torch(write_release_checkpoint(tmp_path / "m.pth", sd), verbose=False)
    pipe = rw.Pipeline(model, path)
    # Only the byte-level pieces of multi-byte characters may be drawn: most draws split a character.
    allowed = set(pipe.encode("".join(MULTI_BYTE)))
    ban = [i for i in range(model.config.vocab_size) if i not in allowed]
    seed = int(rng.integers(1 << 30))
    text = pipe.generate("東京", 24, ban_tokens=ban, seed=seed)
    pieces = list(pipe.stream("東京", 24, ban_tokens=ban, seed=seed))
    assert "".join(pieces) == text and len(pieces) < 24  # pieces wait for whole characters


def test_pipeline_bad_input(char_pipe):
    pipe = char_pipe
    with pytest.raises(ValueError, match="the prompt is empty after tokenization"):
        pipe.generate("", 4)
    with pytest.raises(ValueError, match="prompt 1 is empty after tokenization"):
        pipe.generate(["a", ""], 4)
    with pytest.raises(TypeError, match="stream takes one str"):
        next(pipe.stream(["a", "b"], 4))
    with pytest.raises(TypeError, match="stream_batch takes a list of str"):
        next(pipe.stream_batch("ab", 4))
    with pytest.raises(ValueError, match="2 contexts but 1 continuations"):
        pipe.loglikelihood(["a", "b"], ["c"])
    with pytest.raises(TypeError, match="both be str"):
        pipe.loglikelihood("a", ["c"])
    with pytest.raises(TypeError, match="model must be an rw.Model"):
        rw.Pipeline("model.pth", pipe.tokenizer)
    with pytest.raises(rw.TokenizerError, match="wrong tokenizer for this model"):
        rw.Pipeline(pipe.model.replace(), char_tokenizer(DEMO_TEXT + "€"))
