"""RNN-state files (rwkv2_jax.generation.state_file): a saved state round-trips exactly and
continues a conversation as if the history had been generated at once; bad files are one-line errors."""

import numpy as np
import pytest

import rwkv2_jax as rw
from rwkv2_jax.formats import CheckpointError
from rwkv2_jax.generation.generator import generate, prompt_logits
from rwkv2_jax.generation.state_file import load_state, save_state
from rwkv2_jax.testing.release_checkpoint import make_release_state_dict
from tests.conftest import SMALL

V = SMALL["vocab_size"]
PROMPTS = [[5], [3, 14, 15, 9, 2, 6], list(range(1, 18)), [(7 * i) % (V - 1) + 1 for i in range(41)]]


def test_state_round_trip_and_continuing_a_conversation(release_files, tmp_path):
    model = rw.load_torch(release_files["plain"], verbose=False)
    first, question = PROMPTS[2], [4, 8, 15, 16]
    reply, state = generate(model, [first], 6, temperature=0, return_state=True)
    path = save_state(tmp_path / "chat.safetensors", state, model)
    loaded = load_state(path, model)
    for a, b in zip(loaded, state):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # continuing from the saved state == generating after the whole history at once
    assert (generate(model, [question], 8, temperature=0, state=loaded)
            == generate(model, [first + reply[0] + question], 8, temperature=0))


def test_state_file_errors(release_files, tmp_path):
    model = rw.load_torch(release_files["plain"], verbose=False)
    state = prompt_logits(model, PROMPTS)[1]
    path = save_state(tmp_path / "s.safetensors", state, model)
    other = rw.from_release_arrays({k: v.numpy() for k, v in
                                    make_release_state_dict(n_layer=2, n_embd=24, vocab_size=V, seed=0).items()})
    with pytest.raises(CheckpointError, match=r"state saved for a L3-D24 .* cannot load it into this L2-D24"):
        load_state(path, other)
    with pytest.raises(CheckpointError, match="state file not found"):
        load_state(tmp_path / "none.safetensors", model)
    rw.save(model, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="not a rwkv2_jax.state file"):
        load_state(tmp_path / "model.safetensors", model)
    with pytest.raises(ValueError, match=r"state has shape \[3, 4, 24\] per field, expected \[3, 1, 24\]"):
        generate(model, [[1]], 2, state=state)
