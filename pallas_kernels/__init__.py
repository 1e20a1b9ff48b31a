"""Pallas GPU kernels (Triton lowering), each beside its plain-JAX reference; all run on CPU with interpret=True.

    pallas_kernels.wkv     the WKV operator: forward and backward, with and without state
    pallas_kernels.matvec  small-batch matrix-vector products of the decode step
    pallas_kernels.decode  the batch-1 decode step as four fused kernels per layer

Import the submodules; this package imports nothing from rwkv2_jax.
"""
