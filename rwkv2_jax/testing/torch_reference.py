"""Independent PyTorch reference implementation of RWKV-v2 (BlinkDL's 2022 "RWKV-v2-RNN").

Written from the RWKV-v2 spec (``rwkv-v2-spec.md``) alone and sharing no code with the JAX
port: it is the oracle the port is tested against.

* GPT mode computes the WKV the way the original trainer does: it builds the lag weights
  ``u, 1, d, d^2, ...`` for lags ``0..T-1`` and evaluates num/den as an O(T^2) causal
  convolution (a Toeplitz matrix product), with no ctx_len cap.
* RNN mode is a plain python loop over time, one token at a time, with the spec's
  *unscaled* state ``(x_att, x_ffn, aa, bb)`` per layer.

Shapes: ``B`` batch, ``T`` time, ``C`` n_embd, ``V`` vocab_size.
"""

from __future__ import annotations

import re

import numpy as np
import torch
import torch.nn.functional as F

LN_EPS = 1e-5  # torch's LayerNorm default, as in the releases


# ----------------------------------------------------------------------------------------
# Building blocks (pure functions of tensors, so they can be tested on their own)
# ----------------------------------------------------------------------------------------


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the last axis, eps 1e-5.  x: [..., C]."""
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps=LN_EPS)


def token_shift(x: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
    """shift(x)_t = x_{t-1}; x_{-1} = prev (zeros if None).  x: [B, T, C] -> [B, T, C]."""
    if prev is None:
        prev = torch.zeros_like(x[:, 0])  # [B, C]
    return torch.cat([prev[:, None, :], x[:, :-1, :]], dim=1)


def clamped_exp(K: torch.Tensor, k_clamp: float | None) -> torch.Tensor:
    """k = exp(min(K, k_clamp)) (no clamp when k_clamp is None)."""
    if k_clamp is not None:
        K = torch.clamp(K, max=k_clamp)
    return torch.exp(K)


def lag_weights(time_first: torch.Tensor, time_decay: torch.Tensor, T: int) -> torch.Tensor:
    """Weights of lags 0..T-1: lag 0 -> u = exp(time_first), lag 1 -> 1, lag j -> d^(j-1).

    time_first, time_decay: [C]  ->  [C, T]
    with d = exp(-exp(time_decay)), i.e. d^(j-1) = exp(-(j-1) * exp(time_decay)).
    """
    lags = torch.arange(T, dtype=time_first.dtype, device=time_first.device)  # [T]
    log_w = -torch.exp(time_decay)[:, None] * (lags - 1)[None, :]  # [C, T]
    log_w = torch.where(lags[None, :] == 0, time_first[:, None], log_w)  # lag 0 -> time_first
    return torch.exp(log_w)  # [C, T]


def wkv_num_den(
    K: torch.Tensor,
    V: torch.Tensor,
    time_first: torch.Tensor,
    time_decay: torch.Tensor,
    *,
    k_eps: float,
    k_clamp: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPT-mode WKV numerator and denominator as an O(T^2) causal convolution.

    K, V: [B, T, C]; time_first, time_decay: [C].  Returns (num, den), each [B, T, C]:
        num_t = sum_{i<=t} w[t-i] * k_i * v_i
        den_t = sum_{i<=t} w[t-i] * k_i + k_eps
    with w the lag weights (u, 1, d, d^2, ...).
    """
    T = K.shape[1]
    k = clamped_exp(K, k_clamp)  # [B, T, C]
    kv = k * V  # [B, T, C]
    w = lag_weights(time_first, time_decay, T)  # [C, T]
    t_idx = torch.arange(T, device=K.device)
    lag = t_idx[:, None] - t_idx[None, :]  # [T(t), T(i)]  lag = t - i
    causal = (lag >= 0).to(K.dtype)  # [T, T]
    W = w[:, lag.clamp(min=0)] * causal  # [C, T, T]  W[c, t, i] = w[c, t-i] (i <= t)
    num = torch.einsum("cti,bic->btc", W, kv)  # [B, T, C]
    den = torch.einsum("cti,bic->btc", W, k) + k_eps  # [B, T, C]
    return num, den


# ----------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------


class TorchRWKV2:
    """RWKV-v2 from a release state dict (keys/shapes of the spec's table).

    Parameters live in ``self.params`` (a dict keyed by release key names, release shapes,
    converted to ``dtype``).  ``k_eps`` is 1e-9 for most releases, 1e-8 for 20220615-10803;
    ``k_clamp`` is 60 for all releases (None: no clamp).
    """

    def __init__(
        self,
        state_dict: dict[str, torch.Tensor],
        *,
        k_eps: float,
        k_clamp: float | None = 60.0,
        dtype=torch.float32,
    ):
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype must be float32 or float64, got {dtype}")
        self.dtype = dtype
        self.k_eps = float(k_eps)
        self.k_clamp = None if k_clamp is None else float(k_clamp)
        self.params: dict[str, torch.Tensor] = {
            name: torch.as_tensor(t).detach().to(device="cpu", dtype=dtype).clone()
            for name, t in state_dict.items()
        }
        self.vocab_size, self.n_embd = self.params["emb.weight"].shape
        layer_ids = {
            int(m.group(1)) for name in self.params if (m := re.match(r"blocks\.(\d+)\.", name))
        }
        self.n_layer = len(layer_ids)
        if layer_ids != set(range(self.n_layer)):
            raise ValueError(f"non-contiguous block indices: {sorted(layer_ids)}")
        self.ffn_pre = any(name.startswith("blocks.0.ffnPre.") for name in self.params)

    # --- helpers -------------------------------------------------------------------------

    def _uses_ffn_pre(self, i: int) -> bool:
        return self.ffn_pre and i == 0

    def _tokens(self, tokens) -> torch.Tensor:
        tokens = torch.as_tensor(np.asarray(tokens) if not torch.is_tensor(tokens) else tokens)
        tokens = tokens.to(torch.long)
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [B, T], got shape {tuple(tokens.shape)}")
        return tokens

    @staticmethod
    def _mix(x: torch.Tensor, x_prev: torch.Tensor, time_mix: torch.Tensor) -> torch.Tensor:
        """xx = x * mix + x_prev * (1 - mix).  x, x_prev: [..., C]; time_mix: [1, 1, C]."""
        mix = time_mix.reshape(-1)  # [C]
        return x * mix + x_prev * (1 - mix)

    @staticmethod
    def _channel_mix(p: dict, prefix: str, xx: torch.Tensor) -> torch.Tensor:
        """ChannelMix on already-mixed input xx: [..., C] -> [..., C]."""
        k = torch.square(torch.relu(xx @ p[prefix + "key.weight"].T))  # [..., 4C]
        kv = k @ p[prefix + "value.weight"].T  # [..., C]
        return torch.sigmoid(xx @ p[prefix + "receptance.weight"].T) * kv

    # --- GPT mode ------------------------------------------------------------------------

    def _forward(self, p: dict, tokens: torch.Tensor, record_keys: list | None = None) -> torch.Tensor:
        """GPT-mode logits with parameters ``p``.  tokens [B, T] -> [B, T, V]."""
        x = p["emb.weight"][tokens]  # [B, T, C]
        for i in range(self.n_layer):
            b = f"blocks.{i}."
            x = layer_norm(x, p[b + "ln1.weight"], p[b + "ln1.bias"])  # [B, T, C]
            if self._uses_ffn_pre(i):
                xx = self._mix(x, token_shift(x), p[b + "ffnPre.time_mix"])
                x = x + self._channel_mix(p, b + "ffnPre.", xx)
            else:
                a = b + "att."
                xx = self._mix(x, token_shift(x), p[a + "time_mix"])  # [B, T, C]
                K = xx @ p[a + "key.weight"].T  # [B, T, C]
                V = xx @ p[a + "value.weight"].T  # [B, T, C]
                R = xx @ p[a + "receptance.weight"].T  # [B, T, C]
                if record_keys is not None:
                    record_keys.append(K.detach())
                num, den = wkv_num_den(
                    K,
                    V,
                    p[a + "time_first"].reshape(-1),  # [C]
                    p[a + "time_decay"].reshape(-1),  # [C]
                    k_eps=self.k_eps,
                    k_clamp=self.k_clamp,
                )
                x = x + (torch.sigmoid(R) * num / den) @ p[a + "output.weight"].T
            x = layer_norm(x, p[b + "ln2.weight"], p[b + "ln2.bias"])
            xx = self._mix(x, token_shift(x), p[b + "ffn.time_mix"])
            x = x + self._channel_mix(p, b + "ffn.", xx)
        x = layer_norm(x, p["ln_out.weight"], p["ln_out.bias"])
        return x @ p["head.weight"].T  # [B, T, V]

    def forward(self, tokens) -> torch.Tensor:
        """GPT mode: tokens [B, T] -> logits [B, T, V] (any T)."""
        with torch.no_grad():
            return self._forward(self.params, self._tokens(tokens))

    __call__ = forward

    def attention_keys(self, tokens) -> list[torch.Tensor]:
        """Pre-clamp attention keys K = Wk xx of every TimeMix layer, each [B, T, C] (GPT mode).

        Not part of the required API; used by the tests to check that generated models
        exercise the k_clamp.  (ffnPre block 0 has no TimeMix and contributes nothing.)
        """
        keys: list[torch.Tensor] = []
        with torch.no_grad():
            self._forward(self.params, self._tokens(tokens), record_keys=keys)
        return keys

    # --- RNN mode ------------------------------------------------------------------------

    def init_state(self, batch_size: int) -> list:
        """Per layer (x_att, x_ffn, aa, bb), each [B, C] zeros (unscaled accumulators).

        x_att is the previous LN1 output (for ffnPre block 0 it feeds ChannelMixPre's shift,
        and aa/bb of that block stay zero), x_ffn the previous LN2 output.
        """
        z = lambda: torch.zeros(batch_size, self.n_embd, dtype=self.dtype)  # noqa: E731
        return [(z(), z(), z(), z()) for _ in range(self.n_layer)]

    def rnn(self, tokens, state=None) -> tuple[torch.Tensor, list]:
        """RNN mode: tokens [B, T] -> (logits [B, T, V], final state). ``state`` is not mutated."""
        tokens = self._tokens(tokens)
        B, T = tokens.shape
        p = self.params
        if state is None:
            state = self.init_state(B)
        state = [tuple(s.to(self.dtype).clone() for s in layer) for layer in state]
        logits = []
        with torch.no_grad():
            for t in range(T):
                x = p["emb.weight"][tokens[:, t]]  # [B, C]
                for i in range(self.n_layer):
                    b = f"blocks.{i}."
                    x_att, x_ffn, aa, bb = state[i]  # each [B, C]
                    x = layer_norm(x, p[b + "ln1.weight"], p[b + "ln1.bias"])  # [B, C]
                    if self._uses_ffn_pre(i):
                        xx = self._mix(x, x_att, p[b + "ffnPre.time_mix"])
                        out = self._channel_mix(p, b + "ffnPre.", xx)
                    else:
                        a = b + "att."
                        xx = self._mix(x, x_att, p[a + "time_mix"])  # [B, C]
                        k = clamped_exp(xx @ p[a + "key.weight"].T, self.k_clamp)  # [B, C]
                        v = xx @ p[a + "value.weight"].T  # [B, C]
                        r = torch.sigmoid(xx @ p[a + "receptance.weight"].T)  # [B, C]
                        u = torch.exp(p[a + "time_first"].reshape(-1))  # [C]
                        d = torch.exp(-torch.exp(p[a + "time_decay"].reshape(-1)))  # [C]
                        num = aa + u * k * v
                        den = bb + u * k
                        out = (r * num / (den + self.k_eps)) @ p[a + "output.weight"].T
                        aa = d * aa + k * v
                        bb = d * bb + k
                    x_att = x
                    x = x + out
                    x = layer_norm(x, p[b + "ln2.weight"], p[b + "ln2.bias"])
                    xx = self._mix(x, x_ffn, p[b + "ffn.time_mix"])
                    x_ffn = x
                    x = x + self._channel_mix(p, b + "ffn.", xx)
                    state[i] = (x_att, x_ffn, aa, bb)
                x = layer_norm(x, p["ln_out.weight"], p["ln_out.bias"])
                logits.append(x @ p["head.weight"].T)  # [B, V]
        if T == 0:
            return torch.zeros(B, 0, self.vocab_size, dtype=self.dtype), state
        return torch.stack(logits, dim=1), state  # [B, T, V]

    # --- training ------------------------------------------------------------------------

    def _loss(self, p: dict, tokens, targets) -> torch.Tensor:
        tokens = self._tokens(tokens)
        targets = self._tokens(targets)
        logits = self._forward(p, tokens)  # [B, T, V]
        return F.cross_entropy(logits.reshape(-1, self.vocab_size), targets.reshape(-1))

    def loss(self, tokens, targets) -> torch.Tensor:
        """Mean cross-entropy over all B*T positions of the GPT-mode logits (scalar tensor)."""
        with torch.no_grad():
            return self._loss(self.params, tokens, targets)

    def loss_and_grad(self, tokens, targets) -> tuple[float, dict[str, np.ndarray]]:
        """(loss, {release key: d loss / d param as a numpy array in the release shape})."""
        p = {name: t.detach().clone().requires_grad_(True) for name, t in self.params.items()}
        with torch.enable_grad():
            loss = self._loss(p, tokens, targets)
            names = list(p)
            grads = torch.autograd.grad(loss, [p[n] for n in names], allow_unused=True)
        out = {}
        for name, g in zip(names, grads):
            out[name] = (torch.zeros_like(p[name]) if g is None else g).detach().numpy()
        return float(loss.detach()), out
