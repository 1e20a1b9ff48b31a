"""The documentation runs as written: quickstart.ipynb on a CPU with no downloads,
release_checkpoint.ipynb without the weights (every cell skips, saying why) and on stand-in
files with the release's names and shapes, and the README's Python snippets and commands.
The committed notebooks carry their outputs."""

import importlib
import json
import re
import shlex
import shutil
import string
import tomllib

import nbformat
import pytest
from nbclient import NotebookClient

from rwkv2_jax.cli.demo import char_tokenizer
from tests.conftest import REPO, SHARED_TOKENIZER, real_tokenizer_path
from rwkv2_jax.testing.release_checkpoint import make_release_state_dict, write_release_checkpoint

NOTEBOOKS = REPO / "notebooks"
README = (REPO / "README.md").read_text(encoding="utf-8")


def execute(name, cwd, monkeypatch, **env):
    """Run a notebook in a fresh kernel (this checkout's package first on its path); any error fails."""
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", coalesce_streams=True,
                   resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def text_of(nb) -> str:
    """Every stream and plain-text output, in order."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            parts.append(out.get("text") or out.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def images_of(nb) -> int:
    return sum("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))


@pytest.mark.parametrize("name", ["quickstart.ipynb", "release_checkpoint.ipynb"])
def test_committed_notebooks_carry_their_outputs(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert [c.execution_count for c in code] == list(range(1, len(code) + 1))  # one run, top to bottom
    assert all(c.outputs for c in code)
    assert not any(out.output_type == "error" for c in code for out in c.outputs)
    if name == "quickstart.ipynb":
        assert images_of(nb) == 3


@pytest.mark.slow
def test_quickstart_runs_on_a_cpu_without_downloads(tmp_path, monkeypatch):
    nb = execute("quickstart.ipynb", tmp_path, monkeypatch, JAX_PLATFORMS="cpu")
    text = text_of(nb)
    assert images_of(nb) == 3  # loss by position, the decay heatmap, the fine-tuning loss
    diffs = [float(x) for x in re.findall(r"max \|(?:GPT - RNN|GPT - prefill\+RNN|state difference)\| += (\S+)", text)]
    assert len(diffs) == 3 and max(diffs) < 1e-4
    assert "the same as reading the whole text again: True" in text
    assert (tmp_path / "demo_out" / "demo.pth").is_file()
    losses = [float(x) for x in re.findall(r"step +\d+ +loss (\S+)", text)]
    assert losses[-1] < losses[0] / 3


@pytest.mark.slow
def test_release_notebook_skips_each_step_without_the_weights(tmp_path, monkeypatch):
    nb = execute("release_checkpoint.ipynb", tmp_path, monkeypatch, RWKV2_WEIGHTS=str(tmp_path))
    text = text_of(nb)
    for step in ("loading the model", "the k_eps comparison", "generation", "LAMBADA"):
        assert f"skipped {step}: 20220615-10803.pth and 20B_tokenizer.json not found in {tmp_path}" in text


@pytest.mark.slow
def test_release_notebook_runs_on_stand_in_files(tmp_path, monkeypatch):
    """A random model of the release's vocabulary under the release's file name: every cell
    takes its real branch (k_eps from the name, generation, LAMBADA)."""
    shutil.copy(real_tokenizer_path(), tmp_path / "20B_tokenizer.json")
    sd = make_release_state_dict(n_layer=1, n_embd=8, vocab_size=50277, seed=0)
    write_release_checkpoint(tmp_path / "20220615-10803.pth", sd)
    docs = ["He looked at the small brass key", "She said it was the end of the story", "They walked home"]
    (tmp_path / "lambada_test.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    nb = execute("release_checkpoint.ipynb", tmp_path, monkeypatch, RWKV2_WEIGHTS=str(tmp_path),
                 JAX_PLATFORMS="cpu")
    text = text_of(nb)
    assert "skipped" not in text and "weights found" in text
    assert "k_eps=1e-08 (release table entry matched by '20220615-10803.pth'" in text
    assert re.search(r"k_eps 1e-08 vs 1e-9: max \|logit difference\| = \S+ over \d+ tokens", text)
    assert re.search(r"first 3 documents: ppl \S+, accuracy \S+%", text)


# --- the README ------------------------------------------------------------------------------


def readme_blocks(lang: str):
    """(heading, code) of each ```lang block of the README."""
    blocks, heading = [], ""
    for part in re.split(r"(^## [^\n]*$|^```\w*\n.*?^```$)", README, flags=re.M | re.S):
        if part.startswith("## "):
            heading = part[3:].strip()
        elif part.startswith(f"```{lang}\n"):
            blocks.append((heading, part[len(lang) + 4:-3]))
    return blocks


PYTHON_BLOCKS = readme_blocks("python")


@pytest.fixture(scope="module")
def release_stand_ins(tmp_path_factory):
    """A folder with the README's file names: a random L1-D8 model as 20220615-10803.pth and the
    20B tokenizer (or, where it is absent, a character tokenizer under its name)."""
    root = tmp_path_factory.mktemp("readme")
    if SHARED_TOKENIZER.is_file():
        shutil.copy(SHARED_TOKENIZER, root / "20B_tokenizer.json")
        vocab_size = 50277
    else:
        tok = char_tokenizer(string.printable)
        tok.save(str(root / "20B_tokenizer.json"))
        vocab_size = tok.get_vocab_size()
    write_release_checkpoint(root / "20220615-10803.pth",
                             make_release_state_dict(n_layer=1, n_embd=8, vocab_size=vocab_size, seed=0))
    return root


def test_readme_has_python_snippets_that_start_from_text():
    headings = [h for h, _ in PYTHON_BLOCKS]
    assert {"Text in, text out", "In a notebook", "Generation", "Training"} <= set(headings)
    for heading, code in PYTHON_BLOCKS:  # each stands alone: imports, loads, and encodes its own text
        assert code.startswith("import ") and "rw.load_torch(" in code, heading


@pytest.mark.slow
@pytest.mark.parametrize("heading, code", PYTHON_BLOCKS, ids=[h for h, _ in PYTHON_BLOCKS])
def test_readme_python_snippet_runs_as_written(heading, code, release_stand_ins, monkeypatch, capsys, xla_optimized):
    monkeypatch.chdir(release_stand_ins)
    exec(compile(code, f"README.md ({heading})", "exec"), {"__name__": "__readme__"})


def readme_commands():
    """Each command line of the README's bash blocks, continuation lines joined, comments dropped."""
    lines = []
    for _, code in readme_blocks("bash"):
        for line in code.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                lines.append(words)
    return lines


def test_readme_commands_are_entry_points_with_those_flags():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    used = set()
    for words in readme_commands():
        if not words[0].startswith("rwkv2-"):
            continue
        assert words[0] in scripts, words
        used.add(words[0])
        module = importlib.import_module(scripts[words[0]].split(":")[0])
        if hasattr(module, "parse_args"):  # the flags exist and their values parse
            module.parse_args(words[1:])
    assert used == set(scripts)  # the README shows every entry point
