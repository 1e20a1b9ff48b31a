"""Sharded training steps vs the single-device step, on 8 virtual CPU devices.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m tests.sharded_check

jax fixes the device count when it starts, and the test suite starts it with one device,
so tests/test_train.py runs this in a subprocess and checks the JSON it prints:
on a data x fsdp = 2 x 4 mesh, for each WKV implementation, the largest differences of the
per-step loss and gradient norm and of the parameters after the steps, relative to one
device, and the partition specs the parameters actually had.
"""

from __future__ import annotations

import json
import sys

import jax
import numpy as np

import rwkv2_jax as rw
from rwkv2_jax.testing.release_checkpoint import make_release_state_dict
from rwkv2_jax.training import sharding as shd
from rwkv2_jax.training import trainer as tr
from tests.interpret import use_short_loops

# Big enough that some weights pass sharding.MIN_FSDP_SIZE (ffn.key is [C, 4C] = 16384 floats).
CONFIG = dict(n_layer=2, n_embd=64, vocab_size=67)
STEPS = 2


def run(mesh, model_config, params, cfg, windows):
    s = tr.setup(model_config, cfg, mesh)
    state = s.init_state(params)
    losses, norms = [], []
    for w in windows:
        state, m = s.train_step(state, s.put_batch(w))
        losses.append(float(m["loss"]))
        norms.append(float(m["grad_norm"]))
    specs = {
        "ffn.key": str(state.params["blocks_1"]["ffn"]["key"]["kernel"].sharding.spec),
        "att.time_decay": str(state.params["blocks_1"]["att"]["time_decay"].sharding.spec),
        "adam_mu.ffn.key": str(state.opt_state[1][0].mu["blocks_1"]["ffn"]["key"]["kernel"].sharding.spec),
    }
    shard_shape = state.params["blocks_1"]["ffn"]["key"]["kernel"].addressable_shards[0].data.shape
    # Gradients of the first micro-batch, with the step's shardings: per-leaf, not only their norm
    # (Adam's update is nearly invariant to a wrong gradient scale, so parameters alone can hide one).
    grad = jax.jit(jax.grad(lambda p, w: tr.loss_fn(s.module, p, w[:, :-1], w[:, 1:])),
                   in_shardings=(s.state_shardings.params, s.eval_sharding),
                   out_shardings=s.state_shardings.params)
    params0 = s.init_state(params).params
    grads = grad(params0, jax.make_array_from_callback(windows[0][0].shape, s.eval_sharding,
                                                       lambda i: windows[0][0][i]))
    return (np.array(losses), np.array(norms), jax.device_get(state.params), specs, list(shard_shape),
            jax.device_get(grads))


def main() -> int:
    devices = jax.devices()
    if len(devices) != 8:
        print(f"needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8), got {len(devices)}",
              file=sys.stderr)
        return 2
    use_short_loops()
    sd = make_release_state_dict(**CONFIG, seed=7, k_scale=20.0)
    model = rw.from_release_arrays({k: v.numpy() for k, v in sd.items()}, wkv_impl="reference")
    params = jax.device_get(model.params)
    rng = np.random.default_rng(0)
    results = []
    # Each WKV impl on a 2 x 4 mesh, 2 micro-batches a step, compared to the single-device step
    # with the plain-JAX WKV. The Pallas kernel (interpreted on CPU) runs under shard_map per batch
    # shard; its own tests pin it to the reference, so a difference here is the sharding's.
    cfg = tr.TrainConfig(ctx_len=16, batch_size=8, grad_accum=2, epochs=1, epoch_steps=STEPS,
                         lr_init=1e-3, lr_final=1e-4, dtype="float32", precision="highest", wkv_impl="reference")
    windows = [rng.integers(0, CONFIG["vocab_size"], (cfg.grad_accum, cfg.batch_size, cfg.ctx_len + 1))
               .astype(np.int32) for _ in range(STEPS)]
    base = run(shd.make_mesh(1, 1, devices[:1]), model.config, params, cfg, windows)
    data, fsdp = 2, 4  # both axes at once: batch rows over 8 devices, big weights over 4
    for impl in ("reference", "pallas_interpret"):
        got = run(shd.make_mesh(data, fsdp), model.config, params, cfg.replace(wkv_impl=impl), windows)
        param_diff = max(float(np.abs(a - b).max()) for a, b in
                         zip(jax.tree.leaves(base[2]), jax.tree.leaves(got[2])))
        grad_rel = max(float(np.abs(a - b).max() / np.abs(a).max()) for a, b in
                       zip(jax.tree.leaves(base[5]), jax.tree.leaves(got[5])))
        results.append({
            "impl": impl, "data": data, "fsdp": fsdp, "grad_accum": cfg.grad_accum,
            "loss": base[0].tolist(),
            "loss_rel": float(np.max(np.abs(got[0] - base[0]) / np.abs(base[0]))),
            "grad_norm_rel": float(np.max(np.abs(got[1] - base[1]) / np.abs(base[1]))),
            "grad_rel": grad_rel,
            "param_max_abs": param_diff, "lr_init": cfg.lr_init,
            "specs": got[3], "ffn_key_shard_shape": got[4],
        })
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
