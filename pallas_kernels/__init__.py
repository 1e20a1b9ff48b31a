"""Pallas GPU kernels (Triton lowering) for rwkv2_jax; each runs on CPU with interpret=True."""

from pallas_kernels.matvec import MatvecBlockSizes, matvec, matvec_reference
from pallas_kernels.wkv import WKVBlockSizes, wkv, wkv_with_state

__all__ = ["MatvecBlockSizes", "WKVBlockSizes", "matvec", "matvec_reference", "wkv", "wkv_with_state"]
