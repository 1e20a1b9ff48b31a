"""Sharding for training: one mesh with axes ("data", "fsdp"), a few placement rules, and the
Pallas WKV under `shard_map`.

* Parameters and optimizer state: each array's largest axis that divides by the fsdp size
  is split over "fsdp" (replicated over "data"); vectors and scalars are replicated. With
  fsdp = 1 this is plain data parallelism.
* Batches [A, B, T] (A micro-steps of B rows): rows split over ("data", "fsdp") together,
  so every device reads different rows, and B must divide by data * fsdp.
* XLA's SPMD partitioner handles everything else (gathers of fsdp-sharded weights before
  each matmul, the gradient reductions). The Pallas WKV is a custom call it cannot
  partition, so `ShardedWKV` runs it under `jax.shard_map` over the batch: each device runs
  the kernel on its own rows, nothing is gathered.

Multi-host: call `jax.distributed.initialize()` in every process before anything else
touches jax (train.py --distributed does); `jax.devices()` is then the global device list,
the mesh spans all hosts, and every process runs the same program. docs/training.md shows
the launch.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rwkv2_jax.wkv import BATCH_AXES  # batch rows are split over ("data", "fsdp")

MESH_AXES = ("data", "fsdp")
# Arrays smaller than this stay replicated under fsdp: gathering them costs more than it saves.
MIN_FSDP_SIZE = 1 << 14


class ShardingError(ValueError):
    """A mesh or batch size that cannot work; the message names the numbers."""


def make_mesh(data: Optional[int] = None, fsdp: int = 1, devices: Optional[Sequence] = None) -> Mesh:
    """Mesh of shape (data, fsdp) over `devices` (default: all, across hosts); data=None: the rest."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if fsdp < 1 or n % fsdp:
        raise ShardingError(f"fsdp={fsdp} must be a positive divisor of the {n} devices")
    if data is None:
        data = n // fsdp
    if data < 1 or data * fsdp > n:
        raise ShardingError(f"mesh data={data} x fsdp={fsdp} needs {data * fsdp} devices, {n} present")
    grid = np.array(devices[: data * fsdp], dtype=object).reshape(data, fsdp)
    return Mesh(grid, MESH_AXES)


def batch_size_error(batch_size: int, mesh: Mesh) -> Optional[str]:
    n = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch_size % n:
        return (f"batch size {batch_size} is not divisible by the data axis of the mesh: "
                f"data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']} = {n} devices each need "
                f"the same number of rows")
    return None


def param_spec(shape: Sequence[int], fsdp: int) -> P:
    """Split the largest axis that divides by `fsdp` over "fsdp"; replicate small arrays."""
    if fsdp == 1 or len(shape) < 2 or int(np.prod(shape)) < MIN_FSDP_SIZE:
        return P()
    for axis in sorted(range(len(shape)), key=lambda a: -shape[a]):
        if shape[axis] % fsdp == 0:
            spec = [None] * len(shape)
            spec[axis] = "fsdp"
            return P(*spec)
    return P()


def tree_shardings(tree, mesh: Mesh):
    """NamedShardings for every array of a pytree (params, optimizer state, train state)."""
    fsdp = mesh.shape["fsdp"]
    return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(np.shape(x), fsdp)), tree)


def batch_sharding(mesh: Mesh, ndim: int = 3, batch_axis: int = 1) -> NamedSharding:
    """Rows split over ("data", "fsdp"): [A, B, T] by default (axis 1 is B)."""
    spec = [None] * ndim
    spec[batch_axis] = BATCH_AXES
    return NamedSharding(mesh, P(*spec))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def host_to_global(batch: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from the same host batch on every process; each device gets its rows only."""
    return jax.make_array_from_callback(batch.shape, sharding, lambda index: batch[index])
