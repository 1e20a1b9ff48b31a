"""Loading and conversion faults: bad values, bad metadata, misnamed files, failed writes.

Every case gets a one-line error naming the key, field or path, and no write leaves a partial
or temporary file behind (docs/reliability.md lists each guarantee and its test here).
"""

import argparse
import errno
import json
import os
import pickle
import stat

import jax
import ml_dtypes
import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

import rwkv2_jax as rw
from rwkv2_jax import formats as ckpt
from rwkv2_jax.cli import eval as eval_cli
from rwkv2_jax.cli.convert import main as convert_main
from tests.conftest import SMALL, one_line_error
from rwkv2_jax.testing.release_checkpoint import make_release_state_dict, write_release_checkpoint


def release_sd(seed=0, dtype=torch.float32):
    return make_release_state_dict(**SMALL, seed=seed, dtype=dtype)


def write_native_raw(path, arrays, config: dict):
    """A native file with exactly this config JSON in its metadata (no validation on the way)."""
    metadata = {"format": ckpt.NATIVE_FORMAT, "version": ckpt.NATIVE_VERSION, "config": json.dumps(config)}
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path), metadata=metadata)
    return path


def native_arrays(dtype=np.float32):
    return {k: v.numpy().astype(dtype) for k, v in release_sd().items()}


def good_config(**changes):
    cfg = rw.RWKVConfig(**SMALL).to_dict()
    cfg.update(changes)
    return cfg


def leftovers(folder):
    """Temporary files a writer left in folder."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# --- values: floating point and finite ------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nonfinite_pth_is_refused_naming_the_key(tmp_path, rng, bad, dtype):
    sd = release_sd(dtype=dtype)
    key = "blocks.1.att.value.weight"
    idx = tuple(int(rng.integers(n)) for n in sd[key].shape)
    sd[key][idx] = bad
    path = write_release_checkpoint(tmp_path / "m.pth", sd)
    with pytest.raises(rw.CheckpointError, match=rf"m.pth: key '{key}' holds 1 non-finite values .*"
                                                 rf"at \[{idx[0]}, {idx[1]}\].*allow_nonfinite=True"):
        rw.load_torch(path, verbose=False)
    model = rw.load_torch(path, verbose=False, allow_nonfinite=True)
    got = np.asarray(model.params["blocks_1"]["att"]["value"]["kernel"], np.float32)[idx[::-1]]  # [in, out]
    assert np.isnan(got) if np.isnan(bad) else got == bad


def test_nonfinite_native_is_refused_naming_the_key(tmp_path):
    arrays = native_arrays()
    arrays["ln_out.bias"][3] = np.nan
    path = write_native_raw(tmp_path / "m.safetensors", arrays, good_config())
    with pytest.raises(rw.CheckpointError, match=r"m.safetensors: key 'ln_out.bias' holds 1 non-finite"):
        rw.load(path)
    with pytest.raises(rw.CheckpointError, match="'ln_out.bias'"):
        rw.load_any(path)
    assert np.isnan(np.asarray(rw.load(path, allow_nonfinite=True).params["ln_out"]["bias"])[3])


@pytest.mark.parametrize("dtype", [np.int32, np.int64, np.bool_, np.uint8])
def test_native_non_float_tensors_are_refused(tmp_path, dtype):
    arrays = native_arrays()
    arrays["blocks.0.ln1.weight"] = arrays["blocks.0.ln1.weight"].astype(dtype)
    path = write_native_raw(tmp_path / "m.safetensors", arrays, good_config())
    with pytest.raises(rw.CheckpointError, match=rf"key 'blocks.0.ln1.weight' has dtype {np.dtype(dtype).name}"):
        rw.load(path)


@pytest.mark.parametrize("dtype", [torch.bool, torch.int32, torch.complex64, torch.float8_e4m3fn])
def test_pth_non_float_tensors_are_refused(tmp_path, dtype):
    sd = release_sd()
    sd["emb.weight"] = sd["emb.weight"].to(dtype)
    path = write_release_checkpoint(tmp_path / "m.pth", sd)
    with pytest.raises(rw.CheckpointError, match=r"key 'emb.weight' has dtype "):
        rw.load_torch(path, verbose=False)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("layout", ["sparse_coo", "sparse_csr"])
def test_sparse_tensor_in_pth_is_one_line(tmp_path, capsys, layout):
    sd = release_sd()
    sd["head.weight"] = sd["head.weight"].to_sparse() if layout == "sparse_coo" else sd["head.weight"].to_sparse_csr()
    path = write_release_checkpoint(tmp_path / "sparse.pth", sd)
    with pytest.raises(rw.CheckpointError, match=rf"key 'head.weight' is a {layout} tensor; only dense"):
        rw.load_torch(path, verbose=False)
    one_line_error(capsys, convert_main([str(path), str(tmp_path / "o.safetensors")]), "'head.weight' is a")
    assert not (tmp_path / "o.safetensors").exists() and not leftovers(tmp_path)


# --- float64: accepted, stated, converted faithfully --------------------------------------


def test_float64_loads_with_a_notice(tmp_path, capsys):
    path = write_release_checkpoint(tmp_path / "m.pth", release_sd(dtype=torch.float64))
    model = rw.load_torch(path, k_eps=1e-9)
    err = capsys.readouterr().err
    assert "holds float64 weights" in err and "float32" in err
    want = ckpt.release_to_params({k: v.numpy() for k, v in release_sd(dtype=torch.float64).items()}, model.config)
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(want)):
        assert a.dtype == np.float32 and np.array_equal(np.asarray(a), b.astype(np.float32))


def test_float64_native_converts_to_pth_faithfully(tmp_path, capsys):
    arrays = native_arrays(np.float64)
    src = write_native_raw(tmp_path / "m64.safetensors", arrays, good_config())
    assert convert_main([str(src), str(tmp_path / "out.pth")]) == 0
    out = capsys.readouterr().out
    assert "float64" in out and "float32" not in out and "bit-exact" in out
    back = torch.load(tmp_path / "out.pth", weights_only=True)
    assert {t.dtype for t in back.values()} == {torch.float64}
    for k, a in arrays.items():
        assert np.array_equal(back[k].numpy(), a), k
    # a cast is stated, never passed off as the input's values
    assert convert_main([str(src), str(tmp_path / "out32.pth"), "--dtype", "float32"]) == 0
    assert "float32 (cast from float64 by --dtype)" in capsys.readouterr().out


# --- native config metadata -------------------------------------------------------------


@pytest.mark.parametrize("field,value", [
    ("k_clamp", True), ("k_clamp", -1e30), ("k_clamp", float("nan")), ("k_clamp", 0.0), ("k_clamp", 89.0),
    ("k_clamp", "60"), ("k_eps", 1e300), ("k_eps", 0.0), ("k_eps", -1e-9), ("k_eps", float("inf")),
    ("k_eps", True), ("k_eps", 2e-3), ("n_layer", True), ("n_embd", 2.5), ("ffn_pre", 1),
])
def test_bad_native_config_names_field_and_value(tmp_path, field, value):
    path = write_native_raw(tmp_path / "m.safetensors", native_arrays(), good_config(**{field: value}))
    with pytest.raises(rw.CheckpointError, match=rf"m.safetensors: (config field )?{field}="):
        rw.load(path)


@pytest.mark.parametrize("k_clamp,k_eps", [(None, 1e-8), (60.0, 1e-9), (88.0, 1e-3), (1, 1e-12)])
def test_good_native_config_loads(tmp_path, k_clamp, k_eps):
    path = write_native_raw(tmp_path / "m.safetensors", native_arrays(), good_config(k_clamp=k_clamp, k_eps=k_eps))
    config = rw.load(path).config
    assert (config.k_clamp, config.k_eps) == (k_clamp, k_eps)


def test_bad_config_overrides_are_refused(release_files):
    with pytest.raises(rw.CheckpointError, match=r"k_eps=1e\+300 must be a finite number in \(0, 0.001\]"):
        rw.load_torch(release_files["plain"], k_eps=1e300, verbose=False)
    with pytest.raises(rw.CheckpointError, match=r"k_clamp=True must be None or a finite number"):
        rw.load_torch(release_files["plain"], k_clamp=True, verbose=False)


# --- the format is read from the content ----------------------------------------------------


def test_format_is_read_from_content_in_every_loader(tmp_path, release_files):
    pth_named_st = tmp_path / "release.safetensors"
    pth_named_st.write_bytes(release_files["plain"].read_bytes())
    native_named_pth = tmp_path / "native.pth"
    rw.save(rw.load_torch(release_files["plain"], verbose=False), tmp_path / "n.safetensors")
    native_named_pth.write_bytes((tmp_path / "n.safetensors").read_bytes())
    want = rw.load_torch(release_files["plain"], verbose=False)
    args = argparse.Namespace(k_eps=None, wkv_impl="auto", dtype=None)
    for path in (pth_named_st, native_named_pth):
        for load in (rw.load, rw.load_any, lambda p: rw.load_torch(p, verbose=False),
                     lambda p: eval_cli.load_model(args, str(p))):
            got = load(path)
            assert got.config == want.config
            for a, b in zip(jax.tree.leaves(got.params), jax.tree.leaves(want.params)):
                assert np.array_equal(np.asarray(a), np.asarray(b))
    assert ckpt.checkpoint_format(pth_named_st) == "pth" and ckpt.checkpoint_format(native_named_pth) == "native"


def test_legacy_pickle_pth_loads(tmp_path, release_files):
    legacy = tmp_path / "legacy.bin"
    torch.save(release_sd(), legacy, _use_new_zipfile_serialization=False)
    assert ckpt.checkpoint_format(legacy) == "pth"
    assert rw.load_any(legacy, verbose=False).config.n_layer == SMALL["n_layer"]


def test_convert_reads_the_format_from_content(tmp_path, release_files, capsys):
    misnamed = tmp_path / "release.safetensors"
    misnamed.write_bytes(release_files["plain"].read_bytes())
    assert convert_main([str(misnamed), str(tmp_path / "out.safetensors")]) == 0
    assert "(native," in capsys.readouterr().out
    assert rw.load(tmp_path / "out.safetensors").config.n_layer == SMALL["n_layer"]


@pytest.mark.parametrize("content,what", [(b"", "an empty file"), (b"hello world, not a model", "first bytes")])
def test_unknown_content_is_one_line(tmp_path, capsys, content, what):
    path = tmp_path / "x.safetensors"
    path.write_bytes(content)
    with pytest.raises(rw.CheckpointError, match=rf"x.safetensors is neither a PyTorch checkpoint .* \({what}"):
        rw.load(path)
    one_line_error(capsys, convert_main([str(path), str(tmp_path / "o.pth")]), "neither a PyTorch checkpoint")


def test_a_directory_is_not_a_checkpoint(tmp_path):
    with pytest.raises(rw.CheckpointError, match="is a directory, not a checkpoint file"):
        rw.load_any(tmp_path)


# --- torch's advice to turn weights_only off is never passed on -----------------------------------


class Payload:
    def __reduce__(self):
        return (print, ("pwned",))


@pytest.mark.parametrize("protocol", [2, 4])
def test_refused_pickle_gives_our_message(tmp_path, capsys, protocol):
    path = tmp_path / "evil.pth"
    with open(path, "wb") as f:
        pickle.dump({"emb.weight": Payload()}, f, protocol=protocol)
    with pytest.raises(rw.CheckpointError) as info:
        rw.load_torch(path)
    msg = str(info.value)
    assert "evil.pth" in msg and "could run code" in msg
    assert "weights_only" not in msg and "False" not in msg and "\n" not in msg
    assert "pwned" not in capsys.readouterr().out
    zipped = tmp_path / "evil_zip.pth"
    torch.save({"emb.weight": np.zeros(3)}, zipped)  # a numpy array: refused by weights_only
    with pytest.raises(rw.CheckpointError) as info:
        rw.load_any(zipped)
    assert "weights_only" not in str(info.value) and "evil_zip.pth" in str(info.value)


# --- writes: atomic, one line, no leftovers, mode 0666 minus the umask ---------------------------


@pytest.fixture
def model(release_files):
    return rw.load_torch(release_files["plain"], verbose=False)


def test_writing_onto_a_directory_is_one_line(tmp_path, model):
    target = tmp_path / "out"
    target.mkdir()
    for save in (rw.save, rw.save_torch):
        with pytest.raises(rw.CheckpointError, match="out: it is a directory"):
            save(model, target)
    with pytest.raises(rw.CheckpointError, match="output folder does not exist"):
        rw.save(model, tmp_path / "missing" / "m.safetensors")
    assert not leftovers(tmp_path) and not any(target.iterdir())


def test_convert_force_onto_a_directory_is_one_line(tmp_path, release_files, capsys):
    target = tmp_path / "out"
    target.mkdir()
    one_line_error(capsys, convert_main([str(release_files["plain"]), str(target), "--force"]), "is a directory")
    assert target.is_dir() and not any(target.iterdir()) and not leftovers(tmp_path)


def test_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path, model, monkeypatch):
    path = rw.save(model, tmp_path / "m.safetensors")
    before = path.read_bytes()

    def disk_full(arrays, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(ckpt, "save_safetensors", disk_full)
    with pytest.raises(rw.CheckpointError, match=r"cannot write .*m.safetensors: No space left on device"):
        rw.save(model, path)
    assert path.read_bytes() == before and not leftovers(tmp_path)
    monkeypatch.setattr(torch, "save", lambda obj, f: (open(f, "wb").write(b"x"), 1 / 0))
    with pytest.raises(ZeroDivisionError):  # a bug, not a disk error: raised as is, still cleaned up
        rw.save_torch(model, tmp_path / "m.pth")
    assert not (tmp_path / "m.pth").exists() and not leftovers(tmp_path)


def test_read_only_folder_is_one_line(tmp_path, model, monkeypatch):
    folder = tmp_path / "ro"
    folder.mkdir()
    real_open = os.open

    def read_only(path, *args, **kwargs):  # as a read-only mount answers, for any user (root too)
        if str(path).startswith(str(folder)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(rw.CheckpointError, match=r"cannot write in .*ro: Read-only file system"):
        rw.save(model, folder / "m.safetensors")
    assert not any(folder.iterdir())


def test_failed_read_back_leaves_no_output(tmp_path, release_files, capsys, monkeypatch):
    real = ckpt.read_native

    def corrupt_temporary_files(path):
        arrays, config = real(path)
        if str(path).endswith(".tmp"):  # the written file, read back before it takes its name
            arrays["emb.weight"] = arrays["emb.weight"] + 1
        return arrays, config

    monkeypatch.setattr(ckpt, "read_native", corrupt_temporary_files)
    out = tmp_path / "o.safetensors"
    one_line_error(capsys, convert_main([str(release_files["plain"]), str(out)]),
                   "key 'emb.weight' differs when read back")
    assert not out.exists() and not leftovers(tmp_path)
    out.write_bytes(b"precious")  # --force onto an existing file: kept when the new one fails
    one_line_error(capsys, convert_main([str(release_files["plain"]), str(out), "--force"]), "differs")
    assert out.read_bytes() == b"precious" and not leftovers(tmp_path)


def test_failed_conversion_of_bad_weights_leaves_no_output(tmp_path, capsys):
    sd = release_sd()
    sd["blocks.2.ffn.value.weight"][0, 0] = float("nan")
    src = write_release_checkpoint(tmp_path / "nan.pth", sd)
    out = tmp_path / "o.safetensors"
    one_line_error(capsys, convert_main([str(src), str(out)]), "'blocks.2.ffn.value.weight' holds 1 non-finite")
    assert not out.exists() and not leftovers(tmp_path)
    assert convert_main([str(src), str(out), "--allow-nonfinite"]) == 0
    assert np.isnan(rw.load(out, allow_nonfinite=True).params["blocks_2"]["ffn"]["value"]["kernel"][0, 0])


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002], ids=oct)
def test_written_files_get_0666_minus_the_umask(tmp_path, model, release_files, umask):
    old = os.umask(umask)
    try:
        paths = [rw.save(model, tmp_path / "m.safetensors"), rw.save_torch(model, tmp_path / "m.pth"),
                 rw.save_state(tmp_path / "s.safetensors", model.init_state(1), model)]
        assert convert_main([str(release_files["plain"]), str(tmp_path / "c.safetensors")]) == 0
        paths.append(tmp_path / "c.safetensors")
    finally:
        os.umask(old)
    for path in paths:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path


def test_bfloat16_native_round_trip_keeps_bits(tmp_path, model):
    bf = rw.from_release_arrays({k: v.astype(ml_dtypes.bfloat16) for k, v in
                                 ckpt.params_to_release(model.params, model.config).items()}, verbose=False)
    back = rw.load(rw.save(bf, tmp_path / "b.safetensors"))
    for a, b in zip(jax.tree.leaves(bf.params), jax.tree.leaves(back.params)):
        assert a.dtype == b.dtype == ml_dtypes.bfloat16 and np.asarray(a).tobytes() == np.asarray(b).tobytes()
