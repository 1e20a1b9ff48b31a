"""Training: config, optimizer, the train and eval steps, orbax checkpoints, and `loss_and_grad`.

The recipe is the original trainer's (spec, "Original training recipe"): Adam with betas
0.9 / 0.99 and eps 1e-8, no weight decay, gradient clipping at global norm 1.0, the learning
rate moving from `lr_init` to `lr_final` (cosine or exponential) after an optional linear
warm-up, and random windows of ctx_len + 1 tokens.

Precision: parameters and optimizer state are float32; `dtype="bfloat16"` computes the
matmuls in bfloat16 (the model's `dtype`); LayerNorm, the WKV and the loss are float32.

A step is a pure function of (state, windows): windows [A, B, T + 1] are A micro-batches of
B rows, whose gradients are averaged (gradient accumulation) before one optimizer update.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
from pathlib import Path
from typing import Any, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rwkv2_jax import formats as ckpt
from rwkv2_jax.config import RWKVConfig
from rwkv2_jax.model import RWKV
from rwkv2_jax.training.sharding import batch_sharding, host_to_global, replicated, tree_shardings
from rwkv2_jax.wkv import WKV_IMPLS, ShardedWKV, resolve_wkv_impl
from rwkv2_jax.xla import jit

SCHEDULES = ("cosine", "exponential")
DTYPES = ("bfloat16", "float32")
PRECISIONS = ("default", "highest", "float32", "tensorfloat32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the training trajectory (train.py fills it from its flags).

    A run resumed from a checkpoint must use the same values (`RESUME_FIELDS`) to reach
    exactly the parameters of an uninterrupted run.

    Attributes:
      ctx_len: tokens per training row T (windows are T + 1 tokens).
      batch_size: rows per micro-batch B (global, over all devices).
      grad_accum: micro-batches per optimizer step A.
      epochs, epoch_steps: the run is `epochs` mini-epochs of `epoch_steps` optimizer steps.
      lr_init, lr_final, lr_schedule: the learning rate moves from lr_init (after warm-up)
        to lr_final at the last step, along a cosine or an exponential.
      warmup_steps: linear warm-up from 0 to lr_init over this many steps.
      beta1, beta2, adam_eps: Adam. grad_clip: global-norm clipping threshold.
      dtype: matmul compute dtype, "bfloat16" or "float32" (parameters are float32 always).
      precision: matmul precision passed to the model (None/"default": JAX's default,
        TF32 for float32 on recent GPUs, as the original trainer; "highest": exact float32).
      wkv_impl: "auto" (Pallas kernel on GPU), "reference", "pallas", "pallas_interpret".
      remat: recompute each block in the backward pass (less memory, ~1/3 more compute).
      seed: the data order is a function of (seed, step).
    """

    ctx_len: int = 768
    batch_size: int = 8
    grad_accum: int = 1
    epochs: int = 10
    epoch_steps: int = 1000
    lr_init: float = 6e-4
    lr_final: float = 1e-5
    lr_schedule: str = "exponential"
    warmup_steps: int = 0
    beta1: float = 0.9
    beta2: float = 0.99
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    dtype: str = "bfloat16"
    precision: Optional[str] = None
    wkv_impl: str = "auto"
    remat: bool = False
    seed: int = 0

    def __post_init__(self):
        for name in ("ctx_len", "batch_size", "grad_accum", "epochs", "epoch_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {value!r}")
        if not (self.lr_init > 0 and self.lr_final > 0):
            raise ValueError(f"learning rates must be > 0, got lr_init={self.lr_init} lr_final={self.lr_final}")
        if self.lr_schedule not in SCHEDULES:
            raise ValueError(f"lr_schedule={self.lr_schedule!r} must be one of {SCHEDULES}")
        if not 0 <= self.warmup_steps < self.total_steps:
            raise ValueError(f"warmup_steps={self.warmup_steps} must be in [0, total steps {self.total_steps})")
        if not (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and self.adam_eps >= 0):
            raise ValueError(f"bad Adam settings beta1={self.beta1} beta2={self.beta2} eps={self.adam_eps}")
        if not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0, got {self.grad_clip}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} must be one of {DTYPES}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r} must be None or one of {PRECISIONS}")
        if self.wkv_impl not in WKV_IMPLS:
            raise ValueError(f"wkv_impl={self.wkv_impl!r} must be one of {WKV_IMPLS}")

    @property
    def total_steps(self) -> int:
        return self.epochs * self.epoch_steps

    @property
    def tokens_per_step(self) -> int:
        return self.grad_accum * self.batch_size * self.ctx_len

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# Fields that change the trajectory: a resumed run must match the checkpoint in all of them.
RESUME_FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))


# --- optimizer ------------------------------------------------------------------------


def make_schedule(cfg: TrainConfig) -> optax.Schedule:
    """lr(step): linear warm-up 0 -> lr_init, then lr_init -> lr_final at the last step."""
    decay_steps = max(cfg.total_steps - cfg.warmup_steps - 1, 1)  # the last step uses lr_final
    if cfg.lr_schedule == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr_init, decay_steps, alpha=cfg.lr_final / cfg.lr_init)
    else:
        decay = optax.exponential_decay(cfg.lr_init, decay_steps, cfg.lr_final / cfg.lr_init,
                                        end_value=cfg.lr_final)
    if cfg.warmup_steps == 0:
        return decay
    warmup = optax.linear_schedule(0.0, cfg.lr_init, cfg.warmup_steps)
    return optax.join_schedules([warmup, decay], [cfg.warmup_steps])


def make_optimizer(cfg: TrainConfig, schedule: Optional[optax.Schedule] = None) -> optax.GradientTransformation:
    """Global-norm clipping, then Adam (no weight decay) at the scheduled learning rate."""
    return optax.chain(
        optax.clip_by_global_norm(cfg.grad_clip),
        optax.adam(schedule or make_schedule(cfg), b1=cfg.beta1, b2=cfg.beta2, eps=cfg.adam_eps),
    )


class TrainState(NamedTuple):
    """step: optimizer steps done (int32 scalar); params (float32); opt_state (optax)."""

    step: jax.Array
    params: Any
    opt_state: Any


# --- model and loss -------------------------------------------------------------------


def make_module(model_config: RWKVConfig, cfg: TrainConfig, mesh=None) -> RWKV:
    """The training module: compute dtype, precision, remat, and a WKV that runs under `mesh`.

    The Pallas kernel runs per batch shard under shard_map (`ShardedWKV`), in its stateless
    form (training always starts from the empty state). The plain-JAX scan needs no wrapper:
    XLA partitions it along the batch like any elementwise code.
    """
    impl = resolve_wkv_impl(cfg.wkv_impl)
    if impl in ("pallas", "pallas_interpret"):
        use_mesh = mesh if mesh is not None and mesh.size > 1 else None
        impl = ShardedWKV(impl, use_mesh, from_zero_state=True)
    precision = None if cfg.precision in (None, "default") else cfg.precision
    return RWKV(model_config, dtype=jnp.dtype(cfg.dtype), wkv_impl=impl, remat=cfg.remat, precision=precision)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean cross-entropy over every position: logits [..., V] float32, targets [...] int."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets).mean()


def loss_fn(module: RWKV, params, inputs: jax.Array, targets: jax.Array) -> jax.Array:
    """GPT-mode mean cross-entropy of inputs [B, T] predicting targets [B, T]."""
    logits, _ = module.apply({"params": params}, inputs)  # [B, T, V] float32
    return cross_entropy(logits, targets)


def global_norm(tree) -> jax.Array:
    """sqrt of the sum of squares of every leaf (the norm that clip_by_global_norm clips)."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def make_train_step(module: RWKV, optimizer: optax.GradientTransformation, schedule: optax.Schedule):
    """step(state, windows [A, B, T + 1] int32) -> (state, metrics {loss, grad_norm, lr})."""

    grad_fn = jax.value_and_grad(lambda p, x, y: loss_fn(module, p, x, y))

    def step(state: TrainState, windows: jax.Array):
        inputs, targets = windows[..., :-1], windows[..., 1:]  # [A, B, T] each
        A = windows.shape[0]
        if A == 1:
            loss, grads = grad_fn(state.params, inputs[0], targets[0])
        else:
            def micro(carry, xy):  # sum the micro-batch losses and gradients
                loss_sum, grad_sum = carry
                loss, grads = grad_fn(state.params, *xy)
                return (loss_sum + loss, jax.tree.map(jnp.add, grad_sum, grads)), None

            zeros = jax.tree.map(jnp.zeros_like, state.params)
            (loss, grads), _ = jax.lax.scan(micro, (jnp.float32(0.0), zeros), (inputs, targets))
            loss = loss / A
            grads = jax.tree.map(lambda g: g / A, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {"loss": loss, "grad_norm": global_norm(grads), "lr": schedule(state.step)}
        return TrainState(state.step + 1, params, opt_state), metrics

    return step


def make_eval_step(module: RWKV):
    """eval(params, windows [B, T + 1]) -> summed cross-entropy over the B*T positions."""

    def evaluate(params, windows):
        logits, _ = module.apply({"params": params}, windows[:, :-1])
        nll = optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:])
        return nll.sum()

    return evaluate


def init_train_state(params, optimizer: optax.GradientTransformation) -> TrainState:
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    return TrainState(jnp.zeros((), jnp.int32), params, optimizer.init(params))


class Setup(NamedTuple):
    """Everything a training loop needs, placed on one mesh (see `setup`)."""

    module: RWKV
    schedule: optax.Schedule
    optimizer: optax.GradientTransformation
    state_shape: TrainState  # of jax.ShapeDtypeStruct
    state_shardings: TrainState  # of NamedSharding
    batch_sharding: Any  # windows [A, B, T + 1]: rows over ("data", "fsdp")
    eval_sharding: Any  # windows [B, T + 1]
    train_step: Any  # jitted (state, windows) -> (state, metrics); donates the state
    eval_step: Any  # jitted (params, windows) -> summed cross-entropy

    def init_state(self, params) -> TrainState:
        """A fresh TrainState on the mesh from host (numpy) params, same on every process."""
        params = jax.tree.map(lambda x, s: host_to_global(np.asarray(x, np.float32), s),
                              params, self.state_shardings.params)
        return jit(lambda p: init_train_state(p, self.optimizer), out_shardings=self.state_shardings)(params)

    def put_batch(self, windows: np.ndarray) -> jax.Array:
        """Host windows [A, B, T + 1] (the same on every process) -> a global array on the mesh."""
        return host_to_global(windows, self.batch_sharding)


def params_shape(model_config: RWKVConfig):
    """The float32 parameter tree of a model, as ShapeDtypeStructs (nothing allocated)."""
    return jax.eval_shape(
        lambda: RWKV(model_config).init(jax.random.PRNGKey(0), jnp.zeros((1, 1), jnp.int32))["params"])


@functools.lru_cache(maxsize=4)
def setup(model_config: RWKVConfig, cfg: TrainConfig, mesh) -> Setup:
    """Module, optimizer, shardings and the jitted steps of a run of `cfg` on `mesh`.

    Cached on its (hashable) arguments, so a run resumed in the same process (a notebook,
    the tests) reuses the compiled steps.
    """
    module = make_module(model_config, cfg, mesh)
    schedule = make_schedule(cfg)
    optimizer = make_optimizer(cfg, schedule)
    state_shape = jax.eval_shape(lambda p: init_train_state(p, optimizer), params_shape(model_config))
    state_sh = tree_shardings(state_shape, mesh)
    batch_sh = batch_sharding(mesh, 3, 1)
    eval_sh = batch_sharding(mesh, 2, 0)
    rep = replicated(mesh)
    train_step = jit(make_train_step(module, optimizer, schedule), in_shardings=(state_sh, batch_sh),
                     out_shardings=(state_sh, rep), donate_argnums=0)
    eval_step = jit(make_eval_step(module), in_shardings=(state_sh.params, eval_sh), out_shardings=rep)
    return Setup(module, schedule, optimizer, state_shape, state_sh, batch_sh, eval_sh, train_step, eval_step)


# --- the notebook API: rw.loss_and_grad -----------------------------------------------


@functools.lru_cache(maxsize=8)
def _loss_and_grad_fn(module: RWKV):
    return jit(jax.value_and_grad(lambda p, x, y: loss_fn(module, p, x, y)))


def loss_and_grad(model, inputs, targets) -> Tuple[float, Dict[str, np.ndarray]]:
    """Mean cross-entropy of `model` (an `rw.Model`) over every position, and its gradient.

    inputs, targets: int [B, T] (or [T]). Returns (loss, grads) where grads maps each
    release key ("blocks.1.att.key.weight") to a numpy array in the release shape, in the
    parameters' dtype. Uses the model's compute dtype, precision and WKV implementation.
    """
    from rwkv2_jax.handle import check_tokens

    x, _ = check_tokens(inputs, model.config.vocab_size)
    y, _ = check_tokens(targets, model.config.vocab_size)
    if x.shape != y.shape:
        raise ValueError(f"inputs {list(x.shape)} and targets {list(y.shape)} must have the same shape")
    loss, grads = _loss_and_grad_fn(model.logits_module)(model.params, x, y)
    return float(loss), ckpt.params_to_release(jax.device_get(grads), model.config)


# --- orbax checkpoints ----------------------------------------------------------------


class TrainCheckpointError(ValueError):
    """A checkpoint folder that cannot be resumed; the message names the folder and step."""


def _silence_failed_restore(folder: Path) -> None:
    """Drop the noise a failed orbax restore leaves behind, and only that noise.

    Its pending tensorstore reads complete later, on other threads, into an event loop
    orbax has closed ("Event loop is closed", reported through sys.unraisablehook) and as
    asyncio futures nobody awaits ("Future exception was never retrieved", logged with the
    checkpoint's path). The one-line error we raise already says what failed.
    """
    import logging

    class _Filter(logging.Filter):
        def filter(self, record):
            return str(folder) not in record.getMessage()

    logging.getLogger("asyncio").addFilter(_Filter())
    previous = sys.unraisablehook
    if getattr(previous, "_rwkv2_jax_quiet", False):
        return

    def hook(unraisable):
        exc = unraisable.exc_value
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed":
            return
        previous(unraisable)

    hook._rwkv2_jax_quiet = True
    sys.unraisablehook = hook


def _one_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else type(err).__name__


class Checkpoints:
    """Orbax CheckpointManager over `directory`: async saves, the last `keep` kept.

    Each step folder holds the TrainState ("state") and a JSON record ("meta": the model
    and train configs). Nothing here deletes a step except orbax's keep-last-k rotation
    after a *successful* save; a step that fails to restore is left as it is.
    """

    def __init__(self, directory, keep: int = 3, async_save: bool = True):
        import orbax.checkpoint as ocp

        self.directory = Path(directory).absolute()
        if self.directory.exists() and not self.directory.is_dir():
            raise TrainCheckpointError(f"checkpoint path {self.directory} exists and is not a folder")
        self._ocp = ocp
        try:
            self.manager = ocp.CheckpointManager(
                self.directory,
                options=ocp.CheckpointManagerOptions(
                    max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
                ),
            )
        except Exception as err:
            raise TrainCheckpointError(f"cannot open checkpoint folder {self.directory}: {_one_line(err)}") from None

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def all_steps(self):
        return list(self.manager.all_steps())

    def save(self, step: int, state: TrainState, meta: dict) -> None:
        ocp = self._ocp
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

    def read_meta(self, step: int) -> dict:
        ocp = self._ocp
        try:
            return dict(self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta)
        except Exception as err:
            failure = _one_line(err)
        self._failed("read", step, failure)

    def _failed(self, what: str, step: int, failure: str):
        _silence_failed_restore(self.directory / str(step))
        raise TrainCheckpointError(f"cannot {what} checkpoint {self.directory / str(step)}: {failure} "
                                   "(move that folder away to resume from an earlier step)")

    def restore(self, step: int, target: TrainState, shardings) -> TrainState:
        """The state of `step`, placed with `shardings`; `target` gives structure, shapes, dtypes."""
        ocp = self._ocp
        abstract = jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(np.shape(x), x.dtype, sharding=s), target, shardings)
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract))).state
            leaves = jax.tree.leaves(restored)
            treedef = jax.tree.structure(abstract)
            if len(leaves) != treedef.num_leaves:
                raise ValueError(f"{len(leaves)} arrays stored, {treedef.num_leaves} expected")
            for got, want in zip(leaves, jax.tree.leaves(abstract)):
                if got.shape != want.shape or got.dtype != want.dtype:
                    raise ValueError(f"array {got.shape} {got.dtype} stored where {want.shape} "
                                     f"{want.dtype} is expected")
        except Exception as err:
            failure = _one_line(err)
        else:
            return jax.tree.unflatten(treedef, leaves)  # optax NamedTuples come back as tuples
        self._failed("restore", step, failure)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def save_metadata(model_config: RWKVConfig, cfg: TrainConfig, extra: Optional[dict] = None) -> dict:
    return {"model_config": model_config.to_dict(), "train_config": cfg.to_dict(), **(extra or {})}


def config_mismatch(saved: dict, cfg: TrainConfig) -> Optional[str]:
    """The first trajectory field where a checkpoint's TrainConfig differs from `cfg`."""
    for name in RESUME_FIELDS:
        if name in saved and saved[name] != getattr(cfg, name):
            return f"{name}={saved[name]!r} in the checkpoint, {getattr(cfg, name)!r} now"
    return None


def tokens_per_second(n_tokens: int, seconds: float) -> float:
    return n_tokens / seconds if seconds > 0 else math.nan


def write_jsonl(path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
