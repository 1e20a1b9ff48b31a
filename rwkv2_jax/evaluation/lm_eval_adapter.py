"""RWKV-v2 as an lm-evaluation-harness model, registered as "rwkv2_jax".

    rwkv2-lm-eval --model rwkv2_jax \\
        --model_args checkpoint=20220615-10803.pth,tokenizer=20B_tokenizer.json --tasks lambada_openai

`rwkv2-lm-eval ARGS` (or `python -m rwkv2_jax.evaluation.lm_eval_adapter ARGS`) is the
`lm_eval` command line with this model registered: the harness finds models in its own
registry only, and importing this module is what adds "rwkv2_jax" to it. In Python,
`import rwkv2_jax.evaluation.lm_eval_adapter` before `lm_eval.simple_evaluate(model="rwkv2_jax", ...)`.
`rwkv2-lm-eval --help` prints USAGE below.

loglikelihood is `rwkv2_jax.evaluation.scoring.loglikelihood` on the harness's tokenization
(context and continuation split as lm_eval's TemplateLM does; an empty context becomes
the "\\n" prefix, or token 0 without it). loglikelihood_rolling uses the harness's
rolling windows of max_length tokens with one token of context, prefixed by token 0.
generate_until decodes batch_size requests at a time with `rwkv2_jax.generation.generator` (GPT-mode
prefill, then RNN mode; greedy unless the request samples), each row ending at token 0,
and cuts the text at the first `until` string.
"""

from __future__ import annotations

import logging
import multiprocessing
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import jax.numpy as jnp
from tqdm import tqdm  # plain text bars: tqdm.auto warns in a notebook without ipywidgets

try:
    import lm_eval.models  # noqa: F401  the harness's own models: get_model() loads them only into an empty registry
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window, simple_parse_args_string
except ModuleNotFoundError as err:
    if err.name is None or not err.name.startswith("lm_eval"):
        raise
    raise ModuleNotFoundError("rwkv2_jax.evaluation.lm_eval_adapter needs lm-evaluation-harness: "
                              "pip install -e '.[eval]' (or pip install 'lm_eval>=0.4.10')") from err

from rwkv2_jax.evaluation.scoring import EOT_ID, loglikelihood
from rwkv2_jax.formats import CheckpointError
from rwkv2_jax.generation.generator import generate
from rwkv2_jax.handle import load_any
from rwkv2_jax.tokenizer import TOKENIZER_NAMES, TokenizerError, as_tokenizer, find_tokenizer, tokenizer_file

log = logging.getLogger(__name__)
PROG = "rwkv2-lm-eval"
DEFAULT_BATCH_SIZE = 8
DEFAULT_MAX_GEN_TOKS = 256

USAGE = f"""\
usage: {PROG} --model rwkv2_jax --model_args checkpoint=PATH[,tokenizer=PATH,...] --tasks TASKS [lm_eval flags]

lm-evaluation-harness with RWKV-v2 registered as the model "rwkv2_jax".

model_args (comma-separated key=value):
  checkpoint=PATH       release .pth or native .safetensors (required)
  tokenizer=PATH        tokenizer JSON (default: {' or '.join(TOKENIZER_NAMES)} next to the checkpoint)
  newline_prefix=True   prefix every loglikelihood / generate_until context with the tokens of
                        "\\n", as the release's LAMBADA numbers were computed; False: the harness's
                        plain convention
  k_eps=, dtype=float32|bfloat16, wkv_impl=auto|reference|pallas
  max_length=N          window of loglikelihood_rolling (default: the model's ctx_len, 768 for a .pth)
  max_gen_toks=N        default generation length of generate_until (default {DEFAULT_MAX_GEN_TOKS})
--batch_size N is the harness's flag (an int; "auto" means {DEFAULT_BATCH_SIZE}).

examples:
  {PROG} --model rwkv2_jax --model_args checkpoint=20220615-10803.pth,tokenizer=20B_tokenizer.json \\
      --tasks lambada_openai --batch_size 8
  # offline, on the demo's model and the example task shipped in examples/lm_eval (run from the repo root):
  {PROG} --model rwkv2_jax --model_args checkpoint=demo_out/demo.pth \\
      --tasks lambada_offline --include_path examples/lm_eval

Process pools (lm_eval's bootstrap of perplexity's stderr) start with "forkserver", not
"fork": forking a process that runs JAX can deadlock, as JAX's warning says.
Every other flag is lm_eval's: `{PROG} run --help` lists them.
"""


class ModelArgsError(ValueError):
    """A model_args value that cannot work; the message names it."""


def _batch_size(value) -> int:
    if value is None:
        return DEFAULT_BATCH_SIZE
    if isinstance(value, str) and value.startswith("auto"):
        log.warning("rwkv2_jax: batch_size=%s is not supported; using %d", value, DEFAULT_BATCH_SIZE)
        return DEFAULT_BATCH_SIZE
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise ModelArgsError(f"batch_size must be a positive int, got {value!r}") from None
    if size < 1:
        raise ModelArgsError(f"batch_size must be a positive int, got {value!r}")
    return size


@register_model("rwkv2_jax")
class RWKV2LM(TemplateLM):
    """The lm-evaluation-harness interface to a `rwkv2_jax.Model` and its tokenizer."""

    def __init__(
        self,
        checkpoint=None,
        tokenizer=None,
        *,
        model=None,
        newline_prefix: bool = True,
        k_eps: Optional[float] = None,
        dtype: Optional[str] = None,
        wkv_impl: str = "auto",
        batch_size=None,
        max_length: Optional[int] = None,
        max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
        max_batch_size=None,  # passed by the harness; unused (no automatic batch size)
        device=None,  # passed by the harness; unused: JAX places arrays on its default device
        **unknown,
    ):
        super().__init__()
        if unknown:
            raise ModelArgsError(f"unknown model_args {sorted(unknown)} for rwkv2_jax; known: checkpoint, "
                                 "tokenizer, newline_prefix, k_eps, dtype, wkv_impl, max_length, max_gen_toks")
        if dtype is not None and str(dtype) not in ("float32", "bfloat16"):
            raise ModelArgsError(f"dtype must be float32 or bfloat16, got {dtype!r}")
        if model is None and checkpoint is None:  # model=: an already loaded rwkv2_jax.Model (Python use)
            raise ModelArgsError("model_args needs checkpoint=PATH (a release .pth or native .safetensors)")
        if tokenizer is None and checkpoint is None:
            raise ModelArgsError("model_args needs tokenizer=PATH when no checkpoint is given")

        # The tokenizer first: it is found and read in well under a second, the model may take a minute.
        path = None if checkpoint is None else Path(str(checkpoint))
        if path is not None and model is None:
            _checkpoint_file(path)
        if tokenizer is None:
            tokenizer = find_tokenizer(path)
        self.tokenizer = as_tokenizer(tokenizer)
        self._tokenizer_name = self.tokenizer.path.name if self.tokenizer.path else "tokenizers.Tokenizer"
        if model is None:
            kwargs = {"k_eps": None if k_eps is None else float(k_eps), "wkv_impl": str(wkv_impl)}
            if dtype is not None:
                kwargs["dtype"] = jnp.dtype(str(dtype))
            model = load_any(path, **kwargs)
        self.model = model
        self.tokenizer.check_fits(model.config.vocab_size)
        self.newline_prefix = bool(newline_prefix)
        self.batch_size = _batch_size(batch_size)
        self.max_length = int(max_length or model.config.ctx_len)
        self.max_gen_toks = int(max_gen_toks)
        if self.max_length < 1 or self.max_gen_toks < 1:
            raise ModelArgsError(f"max_length and max_gen_toks must be >= 1, got {self.max_length}, "
                             f"{self.max_gen_toks}")
        eot = self.tokenizer.token_to_id("<|endoftext|>")
        self._eot = EOT_ID if eot is None else int(eot)
        self._prefix = self.tok_encode("\n") if self.newline_prefix else []
        if device is not None:
            log.info("rwkv2_jax: ignoring device=%s (JAX uses its default device)", device)

    # -- tokenization ---------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def tokenizer_name(self) -> str:
        return self._tokenizer_name

    def tok_encode(self, string: str, add_special_tokens=None, **kwargs) -> List[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.tokenizer.decode(list(tokens))

    # -- scoring --------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> List[Tuple[float, bool]]:
        """requests [((context, continuation), context ids, continuation ids)] -> [(logprob, is_greedy)]."""
        pairs = []
        for (context, continuation), context_ids, continuation_ids in requests:
            if self.newline_prefix:
                if context == "":  # the harness put [eot] (or the first continuation token) here
                    context_ids, continuation_ids = [], self.tok_encode(continuation)
                context_ids = self._prefix + list(context_ids)
            pairs.append((context_ids, continuation_ids))
        results = loglikelihood(self.model, pairs, batch_size=self.batch_size, progress=not disable_tqdm)
        for (request, _, _), result in zip(requests, results):
            if request is not None:
                self.cache_hook.add_partial("loglikelihood", request, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> List[float]:
        """Summed log-probability of each whole string, over the harness's rolling windows."""
        windows, owners = [], []
        for i, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.eot_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((context, continuation))
                owners.append(i)
        results = loglikelihood(self.model, windows, batch_size=self.batch_size, progress=not disable_tqdm)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owners, results):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> List[str]:
        """Batched decoding with `rwkv2_jax.generation.generator` (greedy unless a request samples), each row
        ending at token 0; the text is cut at the first `until` string."""
        jobs = []  # (request index, prompt ids, until, (max_new, temperature, seed))
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", gen_kwargs.get("max_new_tokens", self.max_gen_toks)))
            temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0) if gen_kwargs.get("do_sample") else 0.0
            seed = int(gen_kwargs.get("seed", 0) or 0)
            prompt = self._prefix + self.tok_encode(context) or [self.eot_token_id]
            jobs.append((i, prompt, until, (max_new, temperature, seed)))
        out: List[Optional[str]] = [None] * len(requests)
        groups = {}
        for job in jobs:
            groups.setdefault(job[3], []).append(job)
        bar = tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm)
        for (max_new, temperature, seed), group in groups.items():
            for s in range(0, len(group), self.batch_size):
                batch = group[s:s + self.batch_size]
                tokens = generate(self.model, [prompt for _, prompt, _, _ in batch], max_new,
                                  temperature=temperature, ban_tokens=(), stop_tokens=(self.eot_token_id,),
                                  seed=seed)
                for (i, _, until, _), ids in zip(batch, tokens):
                    text = self.tok_decode(ids)
                    cut = min([text.find(stop) for stop in until if stop in text], default=len(text))
                    out[i] = text[:cut]
                    self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
                bar.update(len(batch))
        bar.close()
        return out


def _checkpoint_file(path) -> Path:
    path = Path(str(path))
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def _flag_values(argv: List[str], *flags: str) -> List[str]:
    """The values given to any of `flags` in argv: `--flag a b` and `--flag=a`."""
    values, taking = [], False
    for arg in argv:
        name, eq, value = arg.partition("=")
        if arg.startswith("-"):
            taking = arg in flags
            if eq and name in flags:
                values.append(value)
        elif taking:
            values.append(arg)
    return values


def _check_paths(argv: List[str]) -> None:
    """The checkpoint and tokenizer named in `--model_args`, checked before lm_eval indexes its
    tasks (~10 s): a mistyped path is one line at once. A form this does not read (JSON) is
    left to the model's own checks."""
    if "rwkv2_jax" not in _flag_values(argv, "--model"):
        return
    args = {}
    for value in _flag_values(argv, "--model_args", "-a"):
        if value.lstrip().startswith("{"):
            return
        args.update(simple_parse_args_string(value))
    if "checkpoint" not in args:
        return
    path = _checkpoint_file(args["checkpoint"])
    if "tokenizer" in args:
        tokenizer_file(args["tokenizer"])
    else:
        find_tokenizer(path)


def main(argv=None) -> int:
    """The lm_eval command line, with "rwkv2_jax" registered; `--help` prints USAGE."""
    from lm_eval.__main__ import cli_evaluate  # lm_eval (optional): its command line, used only here

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return 0
    try:
        _check_paths(argv)
    except (TokenizerError, CheckpointError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    if "forkserver" in multiprocessing.get_all_start_methods():
        # lm_eval's process pools would fork this process, whose JAX threads make a fork unsafe.
        multiprocessing.set_start_method("forkserver", force=True)
    sys.argv = [PROG, *argv]
    try:
        cli_evaluate()
    except (ModelArgsError, TokenizerError, CheckpointError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
