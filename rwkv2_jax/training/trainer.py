"""Training: config, optimizer, the train and eval steps, and `loss_and_grad`.

The recipe is the original trainer's (spec, "Original training recipe"): Adam with betas
0.9 / 0.99 and eps 1e-8, no weight decay, gradient clipping at global norm 1.0, the learning
rate moving from `lr_init` to `lr_final` (cosine or exponential) after an optional linear
warm-up, and random windows of ctx_len + 1 tokens.

Precision: parameters and optimizer state are float32; `dtype="bfloat16"` computes the
matmuls and the token-shift mixes that feed them in bfloat16 (the model's `dtype` and
`mix_dtype`); LayerNorm, the residual stream, the WKV and the loss are float32.

A step is a pure function of (state, windows): windows [A, B, T + 1] are A micro-batches of
B rows, whose gradients are averaged (gradient accumulation) before one optimizer update.
A step whose loss or gradient norm is not finite is skipped inside the jitted step: parameters
and optimizer state stay as they were, and the state counts it (`TrainState.skipped`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Dict, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rwkv2_jax import formats as ckpt
from rwkv2_jax.config import RWKVConfig
from rwkv2_jax.handle import check_tokens
from rwkv2_jax.model import RWKV, token_nll
from rwkv2_jax.training.sharding import batch_sharding, host_to_global, replicated, tree_shardings
from rwkv2_jax.wkv import WKV_IMPLS, ShardedWKV, resolve_wkv_impl
from rwkv2_jax.xla import TRAINING_COMPILER_OPTIONS, jit

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
      remat: recompute each block in the backward pass: less memory, more compute (the 430M
        model's bf16 step: half the memory at 0.77x the speed; docs/PERF.md, "Remat").
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
        if not (0 < self.lr_init < math.inf and 0 < self.lr_final < math.inf):
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
    """The whole state of a run; a checkpoint holds exactly this.

    step: steps done, applied or skipped (int32 scalar; step s reads the batch of s).
    params: float32 parameters. opt_state: optax state (it advances on applied steps only).
    skipped: steps skipped for a non-finite loss or gradient (int32 scalar), so the
      learning rate of step s is schedule(s - skipped), the optimizer's own count.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    skipped: jax.Array


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
    dtype = jnp.dtype(cfg.dtype)
    return RWKV(model_config, dtype=dtype, wkv_impl=impl, remat=cfg.remat, precision=precision, mix_dtype=dtype,
                head_multiple=8)


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean cross-entropy over every position: logits [..., V], targets [...] int."""
    return token_nll(logits, targets).mean()


def loss_fn(module: RWKV, params, inputs: jax.Array, targets: jax.Array) -> jax.Array:
    """GPT-mode mean cross-entropy of inputs [B, T] predicting targets [B, T]."""
    logits, _ = module.apply({"params": params}, inputs)  # [B, T, V] float32
    return cross_entropy(logits, targets)


def make_train_step(module: RWKV, optimizer: optax.GradientTransformation, schedule: optax.Schedule):
    """step(state, windows [A, B, T + 1] int32) -> (state, metrics {loss, grad_norm, lr, skipped}).

    A step whose loss or gradient norm is not finite leaves params and opt_state bit for bit
    as they were (its windows are dropped); step and skipped both advance, and
    metrics["skipped"] is True.
    """

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
        grad_norm = optax.tree_utils.tree_norm(grads)  # the norm that clip_by_global_norm clips
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        def applied(new, old):  # a select, not a branch: both sides exist anyway, and it shards
            return jnp.where(finite, new, old)

        params = jax.tree.map(applied, params, state.params)
        opt_state = jax.tree.map(applied, opt_state, state.opt_state)
        skipped = jnp.logical_not(finite)
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step - state.skipped),
                   "skipped": skipped}
        return TrainState(state.step + 1, params, opt_state, state.skipped + skipped.astype(jnp.int32)), metrics

    return step


def make_eval_step(module: RWKV):
    """eval(params, windows [B, T + 1]) -> summed cross-entropy over the B*T positions."""

    def evaluate(params, windows):
        logits, _ = module.apply({"params": params}, windows[:, :-1])
        return token_nll(logits, windows[:, 1:]).sum()

    return evaluate


def init_train_state(params, optimizer: optax.GradientTransformation) -> TrainState:
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    zero = jnp.zeros((), jnp.int32)
    return TrainState(zero, params, optimizer.init(params), zero)


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
    start_state: Any  # jitted params on the mesh -> a fresh TrainState

    def init_state(self, params) -> TrainState:
        """A fresh TrainState on the mesh from host (numpy) params, same on every process."""
        params = jax.tree.map(lambda x, s: host_to_global(np.asarray(x, np.float32), s),
                              params, self.state_shardings.params)
        return self.start_state(params)

    def put_batch(self, windows: np.ndarray) -> jax.Array:
        """Host windows [A, B, T + 1] (the same on every process) -> a global array on the mesh."""
        return host_to_global(windows, self.batch_sharding)


@functools.partial(jax.jit, static_argnums=0)
def _init_params(model_config: RWKVConfig, key):
    return RWKV(model_config).init(key, jnp.zeros((1, 1), jnp.int32))["params"]


def params_shape(model_config: RWKVConfig):
    """The float32 parameter tree of a model, as ShapeDtypeStructs (nothing allocated)."""
    return jax.eval_shape(_init_params, model_config, jax.random.PRNGKey(0))


def initial_params(model_config: RWKVConfig, seed: int = 0):
    """The original initialisation (spec) as host (numpy) arrays, computed in one jitted program
    (the model's initialisers run op by op otherwise, one compilation each)."""
    return jax.device_get(_init_params(model_config, jax.random.PRNGKey(seed)))


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
    train_step = jit(make_train_step(module, optimizer, schedule), options=TRAINING_COMPILER_OPTIONS,
                     in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, rep), donate_argnums=0)
    eval_step = jit(make_eval_step(module), in_shardings=(state_sh.params, eval_sh), out_shardings=rep)
    start_state = jit(functools.partial(init_train_state, optimizer=optimizer), out_shardings=state_sh)
    return Setup(module, schedule, optimizer, state_shape, state_sh, batch_sh, eval_sh, train_step, eval_step,
                 start_state)


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
    x, _ = check_tokens(inputs, model.config.vocab_size)
    y, _ = check_tokens(targets, model.config.vocab_size)
    if x.shape != y.shape:
        raise ValueError(f"inputs {list(x.shape)} and targets {list(y.shape)} must have the same shape")
    loss, grads = _loss_and_grad_fn(model.logits_module)(model.params, x, y)
    return float(loss), ckpt.params_to_release(jax.device_get(grads), model.config)
