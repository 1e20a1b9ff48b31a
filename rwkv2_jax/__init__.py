"""rwkv2_jax: RWKV-v2 ("RWKV-v2-RNN", BlinkDL 2022) in JAX/Flax.

The package reads like the model: config -> wkv -> model (time-mix, channel-mix,
block, RNN state) -> checkpoint formats -> handle (the notebook `Model`), then
generation, training and evaluation on top; `Pipeline` and `load_tokenizer` take text.
Importing it runs nothing.
"""

from rwkv2_jax.config import K_CLAMP, K_EPS, PRESETS, RELEASE_K_EPS, RWKVConfig
from rwkv2_jax.wkv import WKVState, wkv_reference, wkv_with_state
from rwkv2_jax.model import RWKV, State, init_state
from rwkv2_jax.formats import CheckpointError
from rwkv2_jax.handle import (
    Model,
    check_tokens,
    from_release_arrays,
    init,
    load,
    load_any,
    load_torch,
    save,
    save_torch,
)
from rwkv2_jax.tokenizer import Tokenizer, TokenizerError, find_tokenizer, load_tokenizer
from rwkv2_jax.generation.sampling import SamplingParams
from rwkv2_jax.generation.step import DecodeOptions
from rwkv2_jax.generation.generator import generate, prompt_logits, stream, stream_batch, with_weight_dtype
from rwkv2_jax.generation.state_file import load_state, save_state
from rwkv2_jax.generation.pipeline import Pipeline
from rwkv2_jax.training.trainer import TrainConfig, loss_and_grad
from rwkv2_jax.evaluation.scoring import loglikelihood

__all__ = [
    "CheckpointError", "DecodeOptions", "K_CLAMP", "K_EPS", "Model", "PRESETS", "Pipeline", "RELEASE_K_EPS",
    "RWKV", "RWKVConfig", "SamplingParams", "State", "Tokenizer", "TokenizerError", "TrainConfig", "WKVState",
    "check_tokens", "find_tokenizer", "from_release_arrays", "generate", "init", "init_state", "load",
    "load_any", "load_state", "load_tokenizer", "load_torch", "loglikelihood", "loss_and_grad",
    "prompt_logits", "save", "save_state", "save_torch", "stream", "stream_batch",
    "with_weight_dtype", "wkv_reference", "wkv_with_state",
]
