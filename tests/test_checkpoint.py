"""Release .pth and native .safetensors: key/shape checks, bit-exact round trips, bad files."""

import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import rwkv2_jax as rw
from rwkv2_jax import formats as ckpt
from rwkv2_jax.testing.release_checkpoint import make_release_state_dict, write_release_checkpoint
from tests.conftest import SMALL


def assert_same_state_dict(a, b):
    assert list(a) == list(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k].view(torch.int8) if a[k].dtype == torch.bfloat16 else a[k],
                           b[k].view(torch.int8) if b[k].dtype == torch.bfloat16 else b[k]), k


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("ffn_pre", [False, True])
def test_pth_round_trip_is_bit_exact(tmp_path, seed, dtype, ffn_pre):
    sd = make_release_state_dict(**SMALL, seed=seed, ffn_pre=ffn_pre, dtype=dtype)
    src = write_release_checkpoint(tmp_path / "in.pth", sd)
    model = rw.load_torch(src, verbose=False)
    assert model.config.ffn_pre == ffn_pre
    assert {str(x.dtype) for x in jax.tree.leaves(model.params)} == {str(dtype).split(".")[1]}
    rw.save_torch(model, tmp_path / "out.pth")
    back = torch.load(tmp_path / "out.pth", weights_only=True)
    assert_same_state_dict(sd, back)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_round_trip_is_bit_exact_and_keeps_config(tmp_path, seed, dtype):
    sd = make_release_state_dict(**SMALL, seed=seed, dtype=dtype)
    model = rw.load_torch(write_release_checkpoint(tmp_path / "in.pth", sd), k_eps=1e-8, k_clamp=None)
    rw.save(model, tmp_path / "m.safetensors")
    again = rw.load(tmp_path / "m.safetensors")
    assert again.config == model.config
    assert again.config.k_eps == 1e-8 and again.config.k_clamp is None
    rw.save_torch(again, tmp_path / "out.pth")
    assert_same_state_dict(sd, torch.load(tmp_path / "out.pth", weights_only=True))


def test_config_inferred_from_shapes(release_files):
    model = rw.load_torch(release_files["ffn_pre"], verbose=False)
    assert (model.config.n_layer, model.config.n_embd, model.config.vocab_size) == (
        SMALL["n_layer"], SMALL["n_embd"], SMALL["vocab_size"])
    assert model.config.ffn_pre and model.config.ctx_len == 768 and model.config.k_clamp == 60.0


def test_layout_matches_release_table():
    cfg = rw.RWKVConfig(n_layer=2, n_embd=8, vocab_size=11)
    shapes = {e.key: e.shape for e in ckpt.release_layout(cfg)}
    assert shapes["blocks.1.att.time_decay"] == (8, 1)
    assert shapes["blocks.1.att.time_mix"] == (1, 1, 8)
    assert shapes["blocks.0.ffn.key.weight"] == (32, 8)
    assert shapes["blocks.0.ffn.value.weight"] == (8, 32)
    assert shapes["head.weight"] == (11, 8)
    assert not any("ln0" in k or "time_mix_k" in k for k in shapes)
    assert len(shapes) == 1 + 2 * (4 + 7 + 4) + 3


@pytest.mark.parametrize("name,eps", [("20220615-10803.pth", 1e-8), ("RWKV-20220524-4006.pth", 1e-9),
                                      ("my-finetune.pth", 1e-9)])
def test_k_eps_chosen_from_release_name_and_printed(tmp_path, capsys, name, eps):
    path = write_release_checkpoint(tmp_path / name, make_release_state_dict(**SMALL, seed=0))
    model = rw.load_torch(path)
    assert model.config.k_eps == eps
    err = capsys.readouterr().err
    assert f"k_eps={eps:g}" in err
    assert rw.load_torch(path, k_eps=1e-7).config.k_eps == 1e-7


def test_dtype_override_casts_params(tmp_path, release_files):
    model = rw.load_torch(release_files["plain"], dtype=jnp.bfloat16, verbose=False)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(model.params))
    assert model(np.array([[1, 2, 3]])).dtype == jnp.float32


# --- bad files: one clear error naming the path or key -----------------------------


def _write_sd(tmp_path, sd):
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    return path


def test_missing_file(tmp_path):
    with pytest.raises(rw.CheckpointError, match="not found: .*nothere.pth"):
        rw.load_torch(tmp_path / "nothere.pth")


def test_truncated_file(tmp_path, release_files):
    data = release_files["plain"].read_bytes()
    path = tmp_path / "trunc.pth"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(rw.CheckpointError, match="cannot read .*trunc.pth as a PyTorch checkpoint"):
        rw.load_torch(path)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("hello")
    with pytest.raises(rw.CheckpointError, match="notes.pth"):
        rw.load_torch(path)


def test_pickle_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"emb.weight": Evil()}, f)
    with pytest.raises(rw.CheckpointError, match="evil.pth"):
        rw.load_torch(path)


def test_missing_key(tmp_path):
    sd = make_release_state_dict(**SMALL, seed=0)
    del sd["blocks.1.att.time_first"]
    with pytest.raises(rw.CheckpointError, match="missing key 'blocks.1.att.time_first'"):
        rw.load_torch(_write_sd(tmp_path, sd), verbose=False)


def test_unexpected_key(tmp_path):
    sd = make_release_state_dict(**SMALL, seed=0)
    sd["blocks.0.ln0.weight"] = torch.ones(SMALL["n_embd"])
    with pytest.raises(rw.CheckpointError, match="unexpected key 'blocks.0.ln0.weight'"):
        rw.load_torch(_write_sd(tmp_path, sd), verbose=False)


def test_wrong_shape(tmp_path):
    sd = make_release_state_dict(**SMALL, seed=0)
    sd["blocks.2.ffn.key.weight"] = torch.zeros(5, SMALL["n_embd"])
    with pytest.raises(rw.CheckpointError,
                       match=r"'blocks.2.ffn.key.weight' has shape \[5, 24\], expected \[96, 24\]"):
        rw.load_torch(_write_sd(tmp_path, sd), verbose=False)


def test_wrong_dtype(tmp_path):
    sd = make_release_state_dict(**SMALL, seed=0)
    sd["ln_out.bias"] = torch.zeros(SMALL["n_embd"], dtype=torch.int64)
    with pytest.raises(rw.CheckpointError, match="'ln_out.bias' has dtype int64"):
        rw.load_torch(_write_sd(tmp_path, sd), verbose=False)


def test_not_a_state_dict(tmp_path):
    with pytest.raises(rw.CheckpointError, match="expected a state dict"):
        rw.load_torch(_write_sd(tmp_path, [torch.zeros(3)]), verbose=False)


def test_native_bad_files(tmp_path, release_files):
    with pytest.raises(rw.CheckpointError, match="not found"):
        rw.load(tmp_path / "none.safetensors")
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(rw.CheckpointError, match="x.safetensors"):
        rw.load(bad)
