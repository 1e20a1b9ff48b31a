"""`python train.py ...`: the training CLI (rwkv2_jax.cli.train; also `rwkv2-train`)."""

import sys

from rwkv2_jax.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
