"""Model configuration: one frozen dataclass, presets, and a rebuild from checkpoint shapes.

Shapes in this package use the legend
    B batch, T time (tokens), C n_embd, V vocab_size, L n_layer.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

# e^60 ≈ 1.1e26: every release clamps K here so that float32 sums of exp(K) stay finite.
K_CLAMP = 60.0
# Added to the WKV denominator. 1e-9 for every release except 20220615-10803 (1e-8).
K_EPS = 1e-9
# torch.nn.LayerNorm's default epsilon, used by the original code.
LN_EPS = 1e-5

# Release name -> k_eps it needs (spec, "Released checkpoints").
RELEASE_K_EPS: Mapping[str, float] = {
    "20220615-10803": 1e-8,
    "20220605-7663": 1e-8,
    "20220524-4006": 1e-9,
    "20220501-6548": 1e-9,
}


@dataclasses.dataclass(frozen=True)
class RWKVConfig:
    """Everything that defines an RWKV-v2 network.

    Attributes:
      n_layer: number of blocks L.
      n_embd: width C.
      vocab_size: V (50277 for the 20B tokenizer).
      ctx_len: the context the model was trained at. Informational: GPT mode and
        RNN mode both accept any length.
      k_clamp: K is clamped to this before exp (60.0 in every release); None
        disables the clamp (the WKV carries a running exponent, so it stays finite).
      k_eps: added to the WKV denominator.
      ffn_pre: the "RWKV-ffnPre" variant (block 0 has a second channel-mix instead of
        a time-mix).
    """

    n_layer: int
    n_embd: int
    vocab_size: int = 50277
    ctx_len: int = 768
    k_clamp: Optional[float] = K_CLAMP
    k_eps: float = K_EPS
    ffn_pre: bool = False

    def __post_init__(self):
        for name in ("n_layer", "n_embd", "vocab_size", "ctx_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"RWKVConfig.{name} must be a positive int, got {value!r}")
        if self.k_clamp is not None and not isinstance(self.k_clamp, (int, float)):
            raise ValueError(f"RWKVConfig.k_clamp must be a float or None, got {self.k_clamp!r}")
        if not self.k_eps >= 0:
            raise ValueError(f"RWKVConfig.k_eps must be >= 0, got {self.k_eps!r}")

    def replace(self, **changes) -> "RWKVConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "RWKVConfig":
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"unknown RWKVConfig fields: {sorted(unknown)}")
        return cls(**d)

    @property
    def n_params(self) -> int:
        """Parameter count of the release format for this config."""
        C, V, L = self.n_embd, self.vocab_size, self.n_layer
        att = 2 * C + C + 4 * C * C  # time_decay, time_first, time_mix, key/value/receptance/output
        ffn = C + 4 * C * C + C * C + 4 * C * C  # time_mix, key, receptance, value
        block = 4 * C + att + ffn  # + ln1, ln2
        return 2 * V * C + L * block + 2 * C


# The released sizes (spec, "Released checkpoints").
PRESETS: Mapping[str, RWKVConfig] = {
    "L24-D1024": RWKVConfig(n_layer=24, n_embd=1024),
    "L12-D768": RWKVConfig(n_layer=12, n_embd=768),
}


def release_k_eps(name: str) -> Optional[float]:
    """k_eps of a release, looked up by a file name that contains its release name."""
    for release, eps in RELEASE_K_EPS.items():
        if release in name:
            return eps
    return None
