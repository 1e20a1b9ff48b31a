"""Block sizes for the Pallas WKV kernels when the interpreter runs them inside the model.

An interpreted kernel compiles its unrolled loop body on every new shape, so the shipped
16-step blocks cost seconds per model call on a CPU. Tests of the model, the trainer and
generation run the same loops with 2-step blocks; tests/test_wkv_kernel.py picks each
case's block sizes itself, and lowers the shipped ones to Triton IR.
"""

import pallas_kernels.wkv as wkv_kernels

SHORT_LOOPS = wkv_kernels.WKVBlockSizes(unroll=2, unroll_train=2)


def use_short_loops() -> None:
    """For a test subprocess: calls without block sizes run SHORT_LOOPS from now on."""
    wkv_kernels.DEFAULT_BLOCK_SIZES = SHORT_LOOPS
