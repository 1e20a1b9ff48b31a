"""The RNN step used for decoding: the model at T = 1 on transposed, merged matrices.

`RWKV` (rwkv2_jax.model) keeps Flax's [in, out] kernels. At T = 1 every matrix product is a
vector times a matrix, and XLA's GPU backend computes x[1, in] @ W[in, out] as an
elementwise product followed by a reduction over `in`, the strided axis: for several of the
layer's matrices it writes the whole [in, out] product to memory and reads it back
(bench/profile.py decode: ~1.4 ms per token at L24-D1024, batch 1, 60% of it in these
reductions). With the matrices stored [out, in] the reduction runs along contiguous memory,
fuses with the elementwise code that produces its input (token-shift mix, sigmoid(r) * wkv),
and costs one read of the weights. Products that share an input are merged into one matrix:
time-mix key/value/receptance ([3C, C]) and channel-mix key/receptance ([5C, C]).

`decode_params(model)` builds that layout once (a second copy of the matrices, in the
params' dtype); `rnn_step` is the same function as `model.module.apply(params, token[:, None],
state)` (tests/test_generate.py checks logits and state against it), and is what
`rw.generate` runs per token.

Where the model runs Pallas kernels (`wkv_impl` "pallas", or "auto" on a GPU) and a step has
at most FUSED_MAX_BATCH (2) rows, `rnn_step` runs each layer as four fused kernels
(`pallas_kernels.decode`: the LayerNorms, token-shift mixes, WKV step, gates and residuals
folded into the products): ~100 kernels per token instead of ~280 (H200, bf16, batch 1: 0.41
instead of 0.60 ms per step; batch 2: 0.58 instead of 0.84). The kernels take up to 16 rows,
but at 8 rows they were twice as slow as the per-operation step (2.30 vs 1.10 ms per step;
their per-row accumulators no longer fit in the registers), so larger batches run the
per-operation step (docs/PERF.md, session 12). The fused step loads its matrices with the
"evict_first" L2 hint, the head on the Pallas matvec kernel for that (StepSpec.stream_weights,
from Model(stream_weights=, resident_out_bytes=)): batch 1 at 0.397 ms per token (2,521
tokens/s) instead of 0.413 (docs/PERF.md, session 17). `Model(fused_decode=False)` keeps the per-operation step below, where the products
with more inputs than outputs (the channel-mix value matrix, [C, 4C]) of batches up to
`pallas_kernels.matvec.MAX_BATCH` rows go through the Pallas matrix-vector kernel
(`pallas_kernels.matvec`, which splits the long input over programs): 6.3 us instead of XLA's
10.0 us per [1024, 4096] bf16 product on an H200. For the other shapes the kernel was no faster
than XLA (bench/matvec.py, docs/PERF.md): at batch 1 each of these products takes ~4-10 us,
far more than reading its 2-10 MB, so the step is bound by per-kernel latency, not bandwidth.
With all four products of every layer on the kernel (`StepSpec.pallas_products="all"`) the
per-operation step was slower from 4 rows on (4/8/16 rows: 0.95/1.47/1.10 ms per step against
0.81/1.00/0.82; H200, bf16, docs/PERF.md session 15), though the kernel alone beat XLA on
several of these shapes at 4-16 rows (bench/matvec.py); not profiled (XLA may fuse the
elementwise code around its products). On a GPU the per-operation step runs 5-8 rows padded
to 16 (PAD_ROWS): XLA's products took 1.01 ms per step at 8 rows, 0.82 at 16 (session 16).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from rwkv2_jax.config import LN_EPS, RWKVConfig
from rwkv2_jax.model import State
from rwkv2_jax.model import _layer_norm as model_layer_norm
from rwkv2_jax.wkv import WKVState, resolve_wkv_impl, wkv_step


# The largest batch whose step runs the fused kernels by default: measured faster than the
# per-operation step at 1 and 2 rows, slower at 3 (7%), 4 (41%) and 8 (2x) (H200, bf16,
# L24-D1024, `bench/decode.py --sweep-batches`, docs/PERF.md sessions 12 and 13).
FUSED_MAX_BATCH = 2
# Per backend: batches of lo..hi rows run the per-operation step as `to` rows (the extra rows
# copies of the last, their outputs dropped): ((lo, hi, to), ...). On an H200 with XLA's GEMMs
# (bf16, L24-D1024, bench/decode.py --sweep-batches, docs/PERF.md session 16) the step took
# 1.010 ms at 8 rows and 0.820 padded to 16; 0.855 and 0.817 at 5; at 12 rows padding lost
# (0.805 vs 0.827), so only 5-8 rows are padded. Elsewhere (CPU) padding would only add work.
PAD_ROWS = {"gpu": ((5, 8, 16),)}


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """The static part of a decode step (hashable: a jit static argument)."""

    config: RWKVConfig
    dtype: jnp.dtype  # matmul compute dtype, as Model.dtype
    precision: Optional[str]
    matvec: str = "xla"  # "xla", "pallas" or "pallas_interpret": who runs small-batch products
    # With Pallas kernels (matvec != "xla"): run the step of up to fused_max_batch rows as four
    # fused kernels per layer (pallas_kernels.decode) where the width allows.
    fused: bool = True
    fused_max_batch: int = FUSED_MAX_BATCH  # the kernels take up to pallas_kernels.decode.MAX_BATCH
    # pallas_kernels.decode.LayerBlockSizes (per kernel) or DecodeBlockSizes (all four); None: defaults
    fused_blocks: Optional[object] = None
    # Fused step only: the output-product kernels write each layer's LayerNorm outputs into the
    # token-shift state in place, instead of stacking the layers' vectors after the step
    # (measured 2% slower at batch 1 on an H200: bench/step_bound.py, docs/PERF.md session 13).
    shift_in_place: bool = False
    # The head product through pallas_kernels.matvec (logits rounded to the weights' dtype in
    # the kernel, stored float32) instead of XLA's product and a convert: measured no faster
    # for the fused step at batch 1 on an H200, where XLA's head already reads at ~4 TB/s in
    # the loop of steps (docs/PERF.md, sessions 11 and 13), and 2-4x slower than XLA's from 4
    # rows on (bench/matvec.py, session 15).
    pallas_head: bool = False
    # Fused step: every matrix is loaded with the "evict_first" L2 hint (the layer kernels'
    # weights, and the head, which then runs on pallas_kernels.matvec), so that the ~0.9 GB
    # streamed per token no longer evicts what each kernel reads again every token: the
    # LayerNorm and mix vectors, the state, the activations. H200, bf16, batch 1: 0.409 against
    # 0.427 ms per step; the hint on the layers alone, with XLA's head, no faster (docs/PERF.md,
    # session 17).
    stream_weights: bool = True
    # With stream_weights: the time-mix output matrices of the first layers, as many as fit in
    # this many bytes, load without the hint, so they stay in the L2 from one token to the next
    # (H200, L24-D1024, bf16, batch 1: ~1.85 instead of ~2.15 us per such kernel with 16 MB; all
    # 24 layers' 48 MB no longer fit and slowed every kernel: docs/PERF.md, session 17). 0: none.
    resident_out_bytes: int = 16 << 20
    # Per-operation step with Pallas kernels (matvec != "xla"), batches of up to
    # pallas_kernels.matvec.MAX_BATCH rows: which of the layers' products run on
    # pallas_kernels.matvec (the head: pallas_head). "wide": those with more inputs than
    # outputs (the channel-mix value matrix), where it beat XLA at batch 1; "all": all four
    # per layer.
    pallas_products: str = "wide"
    matvec_blocks: Optional[object] = None  # pallas_kernels.matvec.MatvecBlockSizes; None: its defaults
    # Per-operation step: ((lo, hi, to), ...): a batch of lo..hi rows runs padded to `to` rows
    # (the last row repeated; the extra rows' outputs dropped). spec_of takes PAD_ROWS's for the
    # backend; () never pads.
    pad_rows: Tuple[Tuple[int, int, int], ...] = ()

    def __post_init__(self):
        if isinstance(self.resident_out_bytes, bool) or not isinstance(self.resident_out_bytes, int) \
                or self.resident_out_bytes < 0:
            raise ValueError(f"StepSpec: resident_out_bytes={self.resident_out_bytes!r} must be an int >= 0")
        if self.pallas_products not in ("wide", "all"):
            raise ValueError(f"StepSpec: pallas_products={self.pallas_products!r} must be 'wide' or 'all'")
        ok = isinstance(self.pad_rows, tuple) and all(
            isinstance(r, tuple) and len(r) == 3 and all(isinstance(v, int) for v in r) and 1 <= r[0] <= r[1] < r[2]
            for r in self.pad_rows)
        if not ok:
            raise ValueError(f"StepSpec: pad_rows={self.pad_rows!r} must be a tuple of (lo, hi, to) int "
                             "triples with 1 <= lo <= hi < to")

    def padded_rows(self, batch_size: int) -> int:
        """The rows the per-operation step runs for batch_size rows (pad_rows)."""
        return next((to for lo, hi, to in self.pad_rows if lo <= batch_size <= hi), batch_size)


def spec_of(model) -> StepSpec:
    impl = resolve_wkv_impl(model.wkv_impl)
    matvec = impl if impl in ("pallas", "pallas_interpret") else "xla"
    return StepSpec(model.config, jnp.dtype(model.dtype), model.precision, matvec,
                    fused=model.fused_decode, pad_rows=PAD_ROWS.get(jax.default_backend(), ()),
                    stream_weights=model.stream_weights, resident_out_bytes=model.resident_out_bytes)


def _t(w):  # Flax kernel [in, out] -> [out, in]
    return jnp.swapaxes(w, 0, 1)


@jax.jit
def _build(params):
    """Flax params -> decode params: {"emb", "ln_out", "head_t", "blocks": [per layer]}."""
    blocks = []
    i = 0
    while f"blocks_{i}" in params:
        p = params[f"blocks_{i}"]
        blk = {"ln1": p["ln1"], "ln2": p["ln2"]}
        if "ffnPre" in p:
            pre = p["ffnPre"]
            blk["pre"] = {
                "time_mix": pre["time_mix"],
                "kr_t": jnp.concatenate([_t(pre["key"]["kernel"]), _t(pre["receptance"]["kernel"])], 0),
                "value_t": _t(pre["value"]["kernel"]),
            }
        else:
            att = p["att"]
            blk["att"] = {
                "time_mix": att["time_mix"],
                "w_log": -jnp.exp(att["time_decay"].astype(jnp.float32)),
                "u_log": att["time_first"].astype(jnp.float32),
                "kvr_t": jnp.concatenate(
                    [_t(att[n]["kernel"]) for n in ("key", "value", "receptance")], 0),
                "output_t": _t(att["output"]["kernel"]),
            }
        ffn = p["ffn"]
        blk["ffn"] = {
            "time_mix": ffn["time_mix"],
            "kr_t": jnp.concatenate([_t(ffn["key"]["kernel"]), _t(ffn["receptance"]["kernel"])], 0),
            "value_t": _t(ffn["value"]["kernel"]),
        }
        blocks.append(blk)
        i += 1
    return {"emb": params["emb"]["embedding"], "ln_out": params["ln_out"],
            "head_t": _t(params["head"]["kernel"]), "blocks": blocks}


def decode_params(model):
    """The decode layout of model.params (built once per params object, then cached on the model)."""
    cached = getattr(model, "_decode_cache", None)
    if cached is not None and cached[0] is model.params:
        return cached[1]
    built = _build(model.params)
    model._decode_cache = (model.params, built)
    return built


def _matvec(spec: StepSpec, x, w_t, head: bool = False, stream: bool = False):
    """x [B, in] @ w_t[out, in]^T -> [B, out], with Flax Dense's dtype rules (inputs and output
    in spec.dtype). head: w_t is the head, on the Pallas kernel with spec.pallas_head or stream,
    whose kernel rounds the logits to spec.dtype and stores them float32 (no convert after it).
    stream: the Pallas kernel's weight loads carry the "evict_first" L2 hint (StepSpec.stream_weights)."""
    chosen = (spec.pallas_head or stream) if head else (w_t.shape[1] > w_t.shape[0] or spec.pallas_products == "all")
    if spec.matvec != "xla" and w_t.dtype == spec.dtype and chosen:
        from pallas_kernels import matvec  # imported on use: CPU-only users never load Pallas
        from pallas_kernels.matvec import MAX_BATCH, MatvecBlockSizes

        if x.shape[0] <= MAX_BATCH:
            dtypes = dict(out_dtype=jnp.float32, round_dtype=spec.dtype) if head else dict(out_dtype=spec.dtype)
            blocks = spec.matvec_blocks
            if stream:  # the head of the fused step: whole rows of up to 1,024 columns per block
                # (H200, L24-D1024, bf16: 25.0 against 26.1 us with the default 512; session 17)
                blocks = dataclasses.replace(blocks or MatvecBlockSizes(block_in=1024), eviction_policy="evict_first")
            return matvec(x, w_t, block_sizes=blocks, interpret=spec.matvec == "pallas_interpret", **dtypes)
    x = x.astype(spec.dtype)
    return lax.dot_general(x, w_t.astype(spec.dtype), (((1,), (1,)), ((), ())), precision=spec.precision)


def _log_eps(cfg: RWKVConfig) -> Optional[float]:
    return math.log(cfg.k_eps) if cfg.k_eps > 0 else None


def _layer_norm(x, p):
    """The model's LayerNorm (rwkv2_jax.model), applied to its params p {"scale", "bias"}."""
    return model_layer_norm("ln").apply({"params": p}, x)


def _mix(x, prev, time_mix):
    time_mix = time_mix.astype(jnp.float32)
    return x * time_mix + prev * (1.0 - time_mix)


def _channel_mix(spec: StepSpec, p, x, prev):
    C = spec.config.n_embd
    kr = _matvec(spec, _mix(x, prev, p["time_mix"]), p["kr_t"])  # [B, 5C]
    k, r = kr[:, : 4 * C], kr[:, 4 * C:]
    kv = _matvec(spec, jnp.square(jax.nn.relu(k)), p["value_t"])
    return jax.nn.sigmoid(r.astype(jnp.float32)) * kv.astype(jnp.float32)


def _time_mix(spec: StepSpec, p, x, prev, wkv_state: WKVState):
    cfg = spec.config
    C = cfg.n_embd
    kvr = _matvec(spec, _mix(x, prev, p["time_mix"]), p["kvr_t"])  # [B, 3C]
    k = kvr[:, :C].astype(jnp.float32)
    if cfg.k_clamp is not None:
        k = jnp.minimum(k, cfg.k_clamp)
    v, r = kvr[:, C: 2 * C].astype(jnp.float32), kvr[:, 2 * C:]
    log_eps = _log_eps(cfg)
    wkv_state, wkv = wkv_step(wkv_state, k, v, p["w_log"], p["u_log"], log_eps)
    out = _matvec(spec, jax.nn.sigmoid(r.astype(jnp.float32)) * wkv, p["output_t"])
    return out.astype(jnp.float32), wkv_state


def _fused_ok(spec: StepSpec, dparams, B: int) -> bool:
    if spec.matvec == "xla" or not spec.fused:
        return False
    from pallas_kernels import decode  # imported on use: CPU-only users never load Pallas

    w = dparams["blocks"][0]["ffn"]["value_t"]  # all matrices share the dtype (_build)
    blocks = decode.LayerBlockSizes.of(spec.fused_blocks, B)
    return w.dtype == spec.dtype and B <= spec.fused_max_batch and decode.supported(B, spec.config.n_embd, blocks)


def _layer_four_kernels(decode, cfg, blk, x, prev_att, prev_ffn, wkv, layer, blocks, interpret, in_place,
                        token=None):
    """One layer as four kernels -> (x after it, prev_att, prev_ffn, WKV state (aa, bb, pp)).
    prev_att, prev_ffn: [L*B, C] token-shift vectors of every layer. in_place: the output
    kernels write this layer's LayerNorm outputs into them; else they are returned as [B, C]
    arrays (ln1's, ln2's) for the caller to stack. blocks: a LayerBlockSizes. token [B]: x
    is the embedding table, whose rows token[b] the time-mix kernel reads itself (a time-mix
    layer only)."""
    ln1, ln2, log_eps = blk["ln1"], blk["ln2"], _log_eps(cfg)
    ffn = blk["ffn"]
    cm = dict(blocks=blocks.channel_mix_in, interpret=interpret)
    fo = dict(blocks=blocks.ffn_out, interpret=interpret)

    def out(*args, state, **kw):  # -> (x, the new token-shift state or this layer's vectors)
        if in_place:
            return decode.mix_out(*args, state=state, layer=layer, **kw)
        return decode.mix_out(*args, **kw), args[2]

    if "pre" in blk:  # ffnPre: a channel mix in place of the time mix
        assert token is None, "the embedding rows are read by a time-mix kernel only"
        p = blk["pre"]
        x_ln, ksq, r = decode.channel_mix_in(x, ln1["scale"], ln1["bias"], prev_att, p["time_mix"],
                                             p["kr_t"], layer, ln_eps=LN_EPS, **cm)
        x, prev_att = out(ksq, p["value_t"], x_ln, r, state=prev_att, **fo)
    else:
        p = blk["att"]
        x_ln, rwkv, *wkv = decode.time_mix_in(
            x, ln1["scale"], ln1["bias"], prev_att, p["time_mix"], p["kvr_t"], *wkv,
            p["w_log"], p["u_log"], layer, k_clamp=cfg.k_clamp, log_eps=log_eps, ln_eps=LN_EPS,
            blocks=blocks.time_mix_in, interpret=interpret, token=token)
        x, prev_att = out(rwkv, p["output_t"], x_ln, state=prev_att, blocks=blocks.att_out, interpret=interpret)
    x_ln2, ksq, r = decode.channel_mix_in(x, ln2["scale"], ln2["bias"], prev_ffn, ffn["time_mix"],
                                          ffn["kr_t"], layer, ln_eps=LN_EPS, **cm)
    x, prev_ffn = out(ksq, ffn["value_t"], x_ln2, r, state=prev_ffn, **fo)
    return x, prev_att, prev_ffn, tuple(wkv)


def _head(spec: StepSpec, dparams, x, fused: bool = False):
    """The final LayerNorm and the head -> logits [B, V] float32 (rounded to spec.dtype).
    fused: the LayerNorm as one Pallas kernel (pallas_kernels.decode.layer_norm), not XLA's two,
    and with spec.stream_weights the head on the Pallas kernel with the "evict_first" hint."""
    if fused:
        from pallas_kernels import decode

        x = decode.layer_norm(x, dparams["ln_out"]["scale"], dparams["ln_out"]["bias"], ln_eps=LN_EPS,
                              out_dtype=spec.dtype, interpret=spec.matvec == "pallas_interpret")
    else:
        x = _layer_norm(x, dparams["ln_out"])
    return _matvec(spec, x, dparams["head_t"], head=True, stream=fused and spec.stream_weights).astype(jnp.float32)


def _rnn_step_fused(spec: StepSpec, dparams, token: jax.Array, state: State) -> Tuple[jax.Array, State]:
    """rnn_step as four Pallas kernels per layer (pallas_kernels.decode): the same function."""
    from pallas_kernels import decode

    L, B, C = state.aa.shape
    sizes, interpret = decode.LayerBlockSizes.of(spec.fused_blocks, B), spec.matvec == "pallas_interpret"
    resident = 0
    if spec.stream_weights:
        sizes = sizes.with_eviction_policy("evict_first")
        out_bytes = C * C * jnp.dtype(spec.dtype).itemsize  # a time-mix output matrix
        resident = spec.resident_out_bytes // out_bytes
    kept = dataclasses.replace(sizes, att_out=dataclasses.replace(sizes.att_out, eviction_policy=None))
    flat = lambda a: a.astype(jnp.float32).reshape(L * B, C)  # noqa: E731 - a reshape, no copy
    prev_att, prev_ffn = flat(state.x_att), flat(state.x_ffn)
    wkv = (flat(state.aa), flat(state.bb), flat(state.pp))  # updated in place, layer by layer
    # A first time-mix layer reads its rows of the embedding table itself (one XLA gather
    # kernel less per step); an ffnPre first layer takes them gathered.
    from_table = "att" in dparams["blocks"][0]
    x = dparams["emb"] if from_table else jnp.take(dparams["emb"], token, axis=0).astype(jnp.float32)
    new_att, new_ffn = [], []
    for i, blk in enumerate(dparams["blocks"]):
        layer = jnp.full((1,), i, jnp.int32)
        x, att, ffn, wkv = _layer_four_kernels(decode, spec.config, blk, x, prev_att, prev_ffn, wkv, layer,
                                               kept if i < resident else sizes, interpret, spec.shift_in_place,
                                               token=token if i == 0 and from_table else None)
        if spec.shift_in_place:
            prev_att, prev_ffn = att, ffn
        else:
            new_att.append(att)
            new_ffn.append(ffn)
    if spec.shift_in_place:
        x_att, x_ffn = prev_att.reshape(L, B, C), prev_ffn.reshape(L, B, C)
    else:
        x_att, x_ffn = jnp.stack(new_att), jnp.stack(new_ffn)
    logits = _head(spec, dparams, x, fused=True)
    aa, bb, pp = (a.reshape(L, B, C) for a in wkv)
    return logits, State(x_att, x_ffn, aa, bb, pp)


def rnn_step(spec: StepSpec, dparams, token: jax.Array, state: State) -> Tuple[jax.Array, State]:
    """One token per row: token [B] int -> (logits [B, V] float32, state after it)."""
    B = token.shape[0]
    if _fused_ok(spec, dparams, B):
        return _rnn_step_fused(spec, dparams, token, state)
    rows = spec.padded_rows(B) - B
    if rows > 0:  # rows are independent: pad with copies of the last, drop their outputs
        token = jnp.pad(token, (0, rows), mode="edge")
        state = State(*(jnp.pad(a, ((0, 0), (0, rows), (0, 0)), mode="edge") for a in state))
        logits, state = _rnn_step_ops(spec, dparams, token, state)
        return logits[:B], State(*(a[:, :B] for a in state))
    return _rnn_step_ops(spec, dparams, token, state)


def _rnn_step_ops(spec: StepSpec, dparams, token: jax.Array, state: State) -> Tuple[jax.Array, State]:
    """rnn_step as the per-operation step (the module docstring)."""
    x = jnp.take(dparams["emb"], token, axis=0).astype(jnp.float32)  # [B, C]
    new = []
    for i, blk in enumerate(dparams["blocks"]):
        wkv_state = WKVState(state.aa[i], state.bb[i], state.pp[i])
        x = _layer_norm(x, blk["ln1"])
        x_att = x
        if "pre" in blk:
            dx = _channel_mix(spec, blk["pre"], x, state.x_att[i])
        else:
            dx, wkv_state = _time_mix(spec, blk["att"], x, state.x_att[i], wkv_state)
        x = _layer_norm(x + dx, blk["ln2"])
        x_ffn = x
        x = x + _channel_mix(spec, blk["ffn"], x, state.x_ffn[i])
        new.append((x_att, x_ffn, *wkv_state))
    logits = _head(spec, dparams, x)
    return logits, State(*(jnp.stack(f).astype(jnp.float32) for f in zip(*new)))
