"""Shared fixtures: the per-test random seed, small random checkpoints in the exact release format."""

import os
from pathlib import Path

import jax
import numpy as np
import pytest

import pallas_kernels.wkv as wkv_kernels
from rwkv2_jax.cli.demo import DEMO_TEXT, char_tokenizer
from rwkv2_jax.testing.release_checkpoint import make_release_state_dict, write_release_checkpoint
from tests.interpret import SHORT_LOOPS

REPO = Path(__file__).resolve().parents[1]
SHARED_TOKENIZER = REPO.parent / "shared" / "data" / "20B_tokenizer.json"

# Small, but with everything that matters: several layers, C not a power of two.
SMALL = dict(n_layer=3, n_embd=24, vocab_size=67)


@pytest.fixture(scope="session", autouse=True)
def short_wkv_loops():
    """The WKV kernels' loops in 2-step blocks wherever a call passes no block sizes
    (see tests/interpret.py)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(wkv_kernels, "DEFAULT_BLOCK_SIZES", SHORT_LOOPS)
        yield


@pytest.fixture(scope="session")
def release_files(tmp_path_factory):
    """{variant: path} of release-format .pth files (variants "plain" and "ffn_pre")."""
    root = tmp_path_factory.mktemp("release")
    return {
        "plain": write_release_checkpoint(root / "plain.pth", make_release_state_dict(**SMALL, seed=1)),
        "ffn_pre": write_release_checkpoint(
            root / "ffnpre.pth", make_release_state_dict(**SMALL, seed=2, ffn_pre=True)
        ),
    }


@pytest.fixture(scope="session")
def char_release(tmp_path_factory):
    """(release checkpoint, tokenizer.json, its state dict): a random L2-D16 model whose vocab
    is the demo text's character tokenizer, for the sample CLI's tests."""
    root = tmp_path_factory.mktemp("char_release")
    tok = char_tokenizer(DEMO_TEXT)
    tok.save(str(root / "tokenizer.json"))
    sd = make_release_state_dict(n_layer=2, n_embd=16, vocab_size=tok.get_vocab_size(), seed=3)
    return write_release_checkpoint(root / "model.pth", sd), root / "tokenizer.json", sd


def replay_seed() -> int | None:
    """RWKV2_TEST_SEED as an int, or None when it is unset or empty."""
    value = os.environ.get("RWKV2_TEST_SEED", "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise pytest.UsageError(f"RWKV2_TEST_SEED must be an integer, got {value!r}") from None


def pytest_configure(config):
    replay_seed()  # a bad RWKV2_TEST_SEED stops the run with one line, before any test
    # The suite's programs are small and each runs a few times, so compiling them is most of
    # its CPU time: XLA's optimisation passes are off (the whole suite: 22 -> 16 CPU minutes on
    # 2 cores). They move bf16 rounding slightly (tests/test_generate.py's bf16 check), no
    # test's verdict. Inherited by workers and subprocesses; JAX_DISABLE_MOST_OPTIMIZATIONS=0
    # turns them back on.
    os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
    jax.config.update("jax_disable_most_optimizations", os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] == "1")


@pytest.fixture
def xla_optimized():
    """XLA's optimisation passes on for one test, for the few whose programs run long enough
    that running them costs more than compiling them."""
    jax.config.update("jax_disable_most_optimizations", False)
    yield
    jax.config.update("jax_disable_most_optimizations", os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] == "1")


# The longest files, longest first: whole-suite time per file with two pytest processes on the
# 2-core box (`python -m pytest -q -n 2 --dist loadfile --durations=0`, 2026-12-06).
LONGEST_FILES = ("test_wkv_kernel.py", "test_train.py", "test_decode_step.py", "test_notebooks.py",
                 "test_bench.py", "test_multiprocess.py", "test_generate.py", "test_eval.py", "test_cli.py",
                 "test_decode_kernel.py")


def pytest_collection_modifyitems(config, items):
    """The longest files first: `-n 2 --dist loadfile` hands out whole files in this order, and
    a long file handed out last would leave the other process idle while it runs."""
    rank = {name: i for i, name in enumerate(LONGEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture
def seed() -> int:
    """A fresh seed per test, printed (pytest shows it with a failure); RWKV2_TEST_SEED=<seed> replays it."""
    s = replay_seed()
    if s is None:
        s = int(np.random.SeedSequence().entropy % 2**31)
    print(f"seed={s}")
    return s


@pytest.fixture
def rng(seed) -> np.random.Generator:
    """A numpy Generator from the test's `seed`."""
    return np.random.default_rng(seed)


def real_tokenizer_path() -> Path:
    """The real 20B tokenizer from ../shared, or skip (a user's clone has no ../shared)."""
    if not SHARED_TOKENIZER.is_file():
        pytest.skip(f"real tokenizer not available at {SHARED_TOKENIZER} (only in the dev checkout)")
    return SHARED_TOKENIZER


def one_line_error(capsys, code, pattern):
    """A CLI failed as it should: exit status 2, exactly one ': error: ' line naming `pattern`,
    no traceback (notices such as the k_eps choice or a progress bar may precede it)."""
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if ": error: " in line]
    assert len(lines) == 1, err
    assert pattern in lines[0], lines[0]
