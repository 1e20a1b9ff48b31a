import sys

from rwkv2_jax.cli.convert import main

sys.exit(main())
