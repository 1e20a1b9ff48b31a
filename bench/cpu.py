"""CPU throughput, side by side in one run: our GPT mode and RNN mode vs the PyTorch reference.

    python bench/cpu.py [--layers 6 --width 512 --vocab 50277 --gpt-len 256 --decode 64]

Both run the same random release-format weights in float32 on this machine's CPU.
The reference is tests/torch_reference.py (an O(T^2) GPT mode as the original code,
and a token-by-token RNN loop), so it is what a user of the original would run.
Timings: median of --repeats runs after one warm-up (compile) run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


from bench.timing import median_time  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--vocab", type=int, default=50277)
    p.add_argument("--gpt-len", type=int, default=256, help="T for GPT mode (B=1)")
    p.add_argument("--decode", type=int, default=64, help="tokens decoded one at a time (B=1)")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    import jax
    import numpy as np
    import torch

    import rwkv2_jax as rw
    from rwkv2_jax.testing.release_checkpoint import make_release_state_dict
    from rwkv2_jax.testing.torch_reference import TorchRWKV2

    sd = make_release_state_dict(args.layers, args.width, args.vocab, seed=0)
    model = rw.from_release_arrays({k: v.numpy() for k, v in sd.items()}, wkv_impl="reference")
    ref = TorchRWKV2(sd, k_eps=1e-9)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, args.vocab, (1, args.gpt_len))
    decode = rng.integers(0, args.vocab, (1, args.decode))

    # Our RNN decode as a user runs it: one jitted step per token from Python.
    step = jax.jit(lambda p, s, t: model.module.apply({"params": p}, t, s))

    def ours_decode():
        state = model.init_state(1)
        for t in range(args.decode):
            logits, state = step(model.params, state, decode[:, t : t + 1])
        logits.block_until_ready()

    def ours_scan():
        model.rnn(decode)[0].block_until_ready()

    def ours_gpt():
        model(tokens).block_until_ready()

    def ref_decode():
        ref.rnn(torch.as_tensor(decode))

    def ref_gpt():
        ref.forward(torch.as_tensor(tokens))

    print(f"# {time.strftime('%Y-%m-%d')}  CPU: {os.cpu_count()} cores, jax {jax.__version__} "
          f"({jax.devices()[0].platform}), torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"# model L{args.layers}-D{args.width}, V={args.vocab}, float32, B=1")
    rows = [
        ("RNN decode, jitted step per token", "ours", ours_decode, args.decode),
        ("RNN decode, lax.scan over tokens", "ours", ours_scan, args.decode),
        ("RNN decode, token loop", "PyTorch reference", ref_decode, args.decode),
        (f"GPT mode, T={args.gpt_len}", "ours", ours_gpt, args.gpt_len),
        (f"GPT mode, T={args.gpt_len}", "PyTorch reference", ref_gpt, args.gpt_len),
    ]
    print(f"| {'what':38s} | {'implementation':18s} | {'tokens/s':>10s} |")
    print(f"|{'-' * 40}|{'-' * 20}|{'-' * 12}|")
    for what, who, fn, n in rows:
        sec = median_time(fn, args.repeats)
        print(f"| {what:38s} | {who:18s} | {n / sec:10.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
