"""`python sample.py ...`: the text generation CLI (rwkv2_jax.cli.sample; also `rwkv2-sample`)."""

import sys

from rwkv2_jax.cli.sample import main

if __name__ == "__main__":
    sys.exit(main())
