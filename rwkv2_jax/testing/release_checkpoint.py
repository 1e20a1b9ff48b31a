"""Small random RWKV-v2 checkpoints in the exact release format (a plain dict of tensors).

Key names and shapes follow the table in the spec (``rwkv-v2-spec.md``).  Values are
random but scaled so that the model is numerically "interesting":

* attention keys K = Wk xx have a spread of about ``k_scale`` (default 40), so some K exceed
  the clamp (60) and some are far below 0 (so the denominators get small enough for
  ``k_eps`` to matter);
* per-channel decays d = exp(-exp(time_decay)) span 0.05 .. 0.999;
* time_first = log(0.3) +- 1; time_mix uniform in [0, 1];
* LayerNorm weights 1 +- 0.1, biases ~0.1; other weights N(0, 1/sqrt(fan_in)), so logits
  are O(1).

Everything is drawn in float64 from a seeded ``torch.Generator`` (in a fixed order) and
then cast, so the values are deterministic from ``seed`` and equal across dtypes up to
rounding.
"""

from __future__ import annotations

import math
import pathlib

import torch

D_MIN, D_MAX = 0.05, 0.999  # range of per-channel decays d


def release_key_shapes(
    n_layer: int, n_embd: int, vocab_size: int, *, ffn_pre: bool = False
) -> dict[str, tuple[int, ...]]:
    """Release key -> shape, in the order the generator fills them."""
    C, V = n_embd, vocab_size
    shapes: dict[str, tuple[int, ...]] = {"emb.weight": (V, C)}

    def channel_mix(prefix: str) -> None:
        shapes[prefix + "time_mix"] = (1, 1, C)
        shapes[prefix + "key.weight"] = (4 * C, C)
        shapes[prefix + "receptance.weight"] = (C, C)
        shapes[prefix + "value.weight"] = (C, 4 * C)

    for i in range(n_layer):
        b = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            shapes[f"{b}{ln}.weight"] = (C,)
            shapes[f"{b}{ln}.bias"] = (C,)
        if ffn_pre and i == 0:
            channel_mix(b + "ffnPre.")
        else:
            a = b + "att."
            shapes[a + "time_decay"] = (C, 1)
            shapes[a + "time_first"] = (C, 1)
            shapes[a + "time_mix"] = (1, 1, C)
            for lin in ("key", "value", "receptance", "output"):
                shapes[f"{a}{lin}.weight"] = (C, C)
        channel_mix(b + "ffn.")
    shapes["ln_out.weight"] = (C,)
    shapes["ln_out.bias"] = (C,)
    shapes["head.weight"] = (V, C)
    return shapes


def make_release_state_dict(
    n_layer: int = 2,
    n_embd: int = 16,
    vocab_size: int = 53,
    *,
    seed: int = 0,
    ffn_pre: bool = False,
    k_scale: float = 40.0,
    dtype=torch.float32,
) -> dict[str, torch.Tensor]:
    """A random release-format state dict (see the module docstring for the value scales)."""
    gen = torch.Generator().manual_seed(seed)
    f64 = torch.float64

    def normal(shape, std: float) -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=f64) * std

    def uniform(shape, lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(shape, generator=gen, dtype=f64)

    # Attention key rows: xx = x*mix + x_prev*(1-mix) of two ~unit-variance LayerNorm
    # outputs has E|xx_j|^2 ~ E[mix^2 + (1-mix)^2] = 2/3 per component, so rows of
    # std k_scale / sqrt(2/3 * C) give K with a spread of about k_scale.
    k_std = k_scale / math.sqrt(2.0 / 3.0 * n_embd)
    # time_decay = log(-log d); spread evenly over [log(-log D_MAX), log(-log D_MIN)], shuffled.
    w_lo, w_hi = math.log(-math.log(D_MAX)), math.log(-math.log(D_MIN))

    sd: dict[str, torch.Tensor] = {}
    for name, shape in release_key_shapes(n_layer, n_embd, vocab_size, ffn_pre=ffn_pre).items():
        leaf = name.rsplit(".", 2)
        if name == "emb.weight":
            t = normal(shape, 1.0)
        elif name.endswith("time_decay"):
            grid = torch.linspace(w_lo, w_hi, shape[0], dtype=f64)
            t = grid[torch.randperm(shape[0], generator=gen)].reshape(shape)
        elif name.endswith("time_first"):
            t = math.log(0.3) + uniform(shape, -1.0, 1.0)
        elif name.endswith("time_mix"):
            t = uniform(shape, 0.0, 1.0)
        elif name.endswith("att.key.weight"):
            t = normal(shape, k_std)
        elif leaf[-2].startswith("ln") and leaf[-1] == "weight":
            t = 1.0 + normal(shape, 0.1)
        elif leaf[-2].startswith("ln") and leaf[-1] == "bias":
            t = normal(shape, 0.1)
        else:  # Linear weight [out, in]
            t = normal(shape, 1.0 / math.sqrt(shape[1]))
        sd[name] = t.to(dtype).contiguous()
    return sd


def write_release_checkpoint(path, state_dict) -> pathlib.Path:
    """torch.save(state_dict, path), exactly like the releases (a plain dict of tensors)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dict(state_dict), path)
    return path
