"""Which WKV runs: the plain-JAX scan, the Pallas kernel, or the kernel per batch shard.

The function itself, its plain-JAX reference and its kernels live in `pallas_kernels.wkv`;
this module picks one for the model (`wkv_impl`) and wraps the kernel in `shard_map` for a
device mesh (`ShardedWKV`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from pallas_kernels.wkv import (
    EMPTY_EXP,
    WKVState,
    wkv_reference,
    wkv_step,
    wkv_with_state_reference as wkv_with_state,
)
from pallas_kernels.wkv import wkv as kernel_wkv
from pallas_kernels.wkv import wkv_with_state as kernel_wkv_with_state

__all__ = ["EMPTY_EXP", "WKV_IMPLS", "ShardedWKV", "WKVState", "default_wkv_impl", "resolve_wkv_impl",
           "wkv_dispatch", "wkv_reference", "wkv_step", "wkv_with_state"]

WKV_IMPLS = ("auto", "reference", "pallas", "pallas_interpret")
BATCH_AXES = ("data", "fsdp")  # a mesh's batch rows are split over both axes


def default_wkv_impl() -> str:
    """The Pallas kernel on GPU, the plain-JAX scan elsewhere."""
    return "pallas" if jax.default_backend() == "gpu" else "reference"


def resolve_wkv_impl(impl):
    """A wkv_impl with "auto" replaced by the backend's default (others unchanged)."""
    return default_wkv_impl() if impl == "auto" else impl


def wkv_dispatch(impl, k, v, time_decay, time_first, state, *, k_clamp, k_eps, lengths=None):
    """Run the WKV with the chosen implementation; T = 1 is always a single plain step.

    `impl` is one of WKV_IMPLS or a callable with the signature of
    `wkv_with_state(k, v, time_decay, time_first, state, *, k_clamp, k_eps) -> (out, state)`.

    With `lengths` (right-padded rows) padded steps leave the state unchanged: the Pallas
    kernel with K masked (`pallas_kernels.wkv_with_state(lengths=)`), else the plain-JAX
    scan; a callable impl is not given lengths (the plain-JAX scan runs).
    """
    impl = resolve_wkv_impl(impl)
    if lengths is not None:
        if impl in ("pallas", "pallas_interpret") and k.shape[1] > 1:
            return kernel_wkv_with_state(
                k, v, time_decay, time_first, state, k_clamp=k_clamp, k_eps=k_eps,
                interpret=impl == "pallas_interpret", lengths=lengths,
            )
        return wkv_with_state(k, v, time_decay, time_first, state,
                              k_clamp=k_clamp, k_eps=k_eps, lengths=lengths)
    if k.shape[1] == 1:
        k1 = k[:, 0].astype(jnp.float32)
        if k_clamp is not None:
            k1 = jnp.minimum(k1, k_clamp)
        log_eps = math.log(k_eps) if k_eps > 0 else None
        w_log = -jnp.exp(time_decay.astype(jnp.float32))
        state, out = wkv_step(
            state, k1, v[:, 0].astype(jnp.float32), w_log, time_first.astype(jnp.float32), log_eps
        )
        return out[:, None], state
    if callable(impl):  # a custom WKV, e.g. ShardedWKV
        return impl(k, v, time_decay, time_first, state, k_clamp=k_clamp, k_eps=k_eps)
    if impl == "reference":
        return wkv_with_state(k, v, time_decay, time_first, state, k_clamp=k_clamp, k_eps=k_eps)
    if impl in ("pallas", "pallas_interpret"):
        return kernel_wkv_with_state(
            k, v, time_decay, time_first, state,
            k_clamp=k_clamp, k_eps=k_eps, interpret=impl == "pallas_interpret",
        )
    raise ValueError(f"unknown wkv_impl={impl!r}; choose one of {WKV_IMPLS}")


@dataclasses.dataclass(frozen=True)
class ShardedWKV:
    """The WKV as a callable `wkv_impl` of `rwkv2_jax.model.RWKV`, run per batch shard.

    impl: "pallas" | "pallas_interpret" | "reference" (the kernel or the plain-JAX scan).
    mesh: shard_map over its ("data", "fsdp") axes along the batch; None: no shard_map.
    from_zero_state: for training, where every sequence starts from the empty state. The
      kernel then runs in its fast stateless form (`pallas_kernels.wkv`) and the WKV state
      returned is the input state unchanged: use this only where the state after the
      sequence is not needed (the loss).
    """

    impl: str = "pallas"
    mesh: Optional[Mesh] = None
    from_zero_state: bool = False

    def _local(self, k, v, time_decay, time_first, state, *, k_clamp, k_eps):
        if self.impl == "reference":
            if self.from_zero_state:
                return wkv_with_state(k, v, time_decay, time_first, None, k_clamp=k_clamp, k_eps=k_eps)[0], state
            return wkv_with_state(k, v, time_decay, time_first, state, k_clamp=k_clamp, k_eps=k_eps)
        interpret = self.impl == "pallas_interpret"
        if self.from_zero_state:
            out = kernel_wkv(k, v, time_decay, time_first, k_clamp=k_clamp, k_eps=k_eps,
                                     interpret=interpret)
            return out, state
        return kernel_wkv_with_state(k, v, time_decay, time_first, state, k_clamp=k_clamp,
                                             k_eps=k_eps, interpret=interpret)

    def __call__(self, k, v, time_decay, time_first, state, *, k_clamp, k_eps):
        # k, v [B, T, C]; time_decay, time_first [C]; state: WKVState of [B, C] arrays.
        def local(k, v, time_decay, time_first, state):
            return self._local(k, v, time_decay, time_first, state, k_clamp=k_clamp, k_eps=k_eps)

        if self.mesh is None:
            return local(k, v, time_decay, time_first, state)
        rows = P(BATCH_AXES)  # [B, ...] split over data x fsdp, the rest whole
        fn = jax.shard_map(
            local, mesh=self.mesh,
            in_specs=(rows, rows, P(), P(), rows),
            out_specs=(rows, rows),
            check_vma=False,  # the Pallas call has no replication rule
        )
        return fn(k, v, time_decay.astype(jnp.float32), time_first.astype(jnp.float32), state)
