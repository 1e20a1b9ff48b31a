"""`python -m convert IN OUT`: release `.pth` <-> native `.safetensors` (rwkv2_jax.cli.convert;
also `rwkv2-convert`)."""
