"""The RNN step used for decoding: the model at T = 1 on transposed, merged matrices.

At T = 1 every matrix product is a vector times a matrix. `decode_params(model)` stores the
matrices [out, in] (Flax keeps [in, out]), so that each product reduces along contiguous
memory and fuses with the elementwise code around it, reading its weights once; products
that share an input are merged (time-mix K/V/R into [3C, C], channel-mix K/R into [5C, C]).
`rnn_step(spec, dparams, token, state)` is the same function as
`model.module.apply({"params": params}, token[:, None], state)` (tests/test_decode_step.py)
and is what `rw.generate` runs per token.

With Pallas kernels (`wkv_impl` "pallas", or "auto" on a GPU) a step of at most
`DecodeOptions.fused_max_batch` rows runs each layer as four fused kernels
(`pallas_kernels.decode`); larger batches run the per-operation step, whose products with
more inputs than outputs go through `pallas_kernels.matvec`. `DecodeOptions` holds these
choices, with defaults per backend; `spec_of(model, options)` makes the step's static part.
"""

from __future__ import annotations

import dataclasses
import math
import weakref
from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels import decode as decode_kernels
from pallas_kernels.decode import DecodeBlockSizes, LayerBlockSizes
from pallas_kernels.matvec import MAX_BATCH as MATVEC_MAX_BATCH
from pallas_kernels.matvec import MatvecBlockSizes, matvec as pallas_matvec
from rwkv2_jax.config import LN_EPS, RWKVConfig
from rwkv2_jax.model import State
from rwkv2_jax.wkv import WKVState, resolve_wkv_impl, wkv_step

# The largest batch whose step runs the fused kernels by default: faster than the
# per-operation step at 1 and 2 rows, slower from 3 (their per-row accumulators stop fitting
# in the registers). `bench/decode.py --sweep-batches 1,2,3,4` on an H200 (bf16, L24-D1024).
FUSED_MAX_BATCH = 2
# The fused step's time-mix output matrices of the first layers that fit in this many bytes
# load without the L2 hint, so they stay in the L2 between tokens: a third of the ~50 MB L2 of
# an H100/H200, leaving room for what every kernel reads again. `bench/decode.py --sweep-fused`
# (its "no resident output matrices" row) on an H200.
RESIDENT_OUT_BYTES = 16 << 20
# Per backend: batches of lo..hi rows run the per-operation step as `to` rows (the extra rows
# copies of the last, their outputs dropped): ((lo, hi, to), ...). XLA's GPU products of 5-8
# rows take longer than of 16 (`bench/decode.py --sweep-batches 5,8,12,16 --sweep-variants
# ops,pad16` on an H200); elsewhere (CPU) padding would only add work.
PAD_ROWS = {"gpu": ((5, 8, 16),)}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class DecodeOptions:
    """How the decode step runs with Pallas kernels (on a GPU, or wkv_impl "pallas_interpret");
    without them only pad_rows applies.

    `rw.generate`, `rw.stream`, `rw.stream_batch` and `rw.prompt_logits` take one as
    `decode_options=` (None: these defaults).

    fused:              run a step of at most fused_max_batch rows as four fused kernels per
                        layer (pallas_kernels.decode); False: the per-operation step always.
    fused_max_batch:    see `fused` (FUSED_MAX_BATCH; the kernels take up to 16 rows).
    fused_blocks:       the fused kernels' launch sizes: a pallas_kernels.decode LayerBlockSizes
                        (per kernel) or DecodeBlockSizes (all four); None: their defaults.
    stream_weights:     the fused step loads every matrix with the "evict_first" L2 hint (the
                        head then runs on pallas_kernels.matvec), so that the weights streamed per
                        token leave the vectors and the state in the L2 between tokens.
    resident_out_bytes: with stream_weights, the time-mix output matrices of the first layers
                        that fit in this many bytes load without the hint and stay in the L2
                        (RESIDENT_OUT_BYTES, for the ~50 MB L2 of an H100/H200; 0 on a card with
                        a much smaller L2).
    matvec_blocks:      pallas_kernels.matvec.MatvecBlockSizes of the per-operation step's
                        products on that kernel; None: its defaults.
    pad_rows:           ((lo, hi, to), ...): the per-operation step runs a batch of lo..hi rows
                        as `to` rows; None: the backend's (PAD_ROWS); (): never.
    """

    fused: bool = True
    fused_max_batch: int = FUSED_MAX_BATCH
    fused_blocks: Optional[object] = None
    stream_weights: bool = True
    resident_out_bytes: int = RESIDENT_OUT_BYTES
    matvec_blocks: Optional[MatvecBlockSizes] = None
    pad_rows: Optional[Tuple[Tuple[int, int, int], ...]] = None

    def __post_init__(self):
        for name in ("fused", "stream_weights"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"DecodeOptions: {name}={getattr(self, name)!r} must be True or False")
        if not _is_int(self.fused_max_batch) or self.fused_max_batch < 0:
            raise ValueError(f"DecodeOptions: fused_max_batch={self.fused_max_batch!r} must be an int >= 0")
        if self.fused_blocks is not None and not isinstance(self.fused_blocks, (DecodeBlockSizes, LayerBlockSizes)):
            raise ValueError(f"DecodeOptions: fused_blocks must be a DecodeBlockSizes, a LayerBlockSizes or None, "
                             f"got {type(self.fused_blocks).__name__}")
        if not _is_int(self.resident_out_bytes) or self.resident_out_bytes < 0:
            raise ValueError(f"DecodeOptions: resident_out_bytes={self.resident_out_bytes!r} must be an int >= 0")
        if self.matvec_blocks is not None and not isinstance(self.matvec_blocks, MatvecBlockSizes):
            raise ValueError(f"DecodeOptions: matvec_blocks must be a MatvecBlockSizes or None, "
                             f"got {type(self.matvec_blocks).__name__}")
        ok = self.pad_rows is None or isinstance(self.pad_rows, tuple) and all(
            isinstance(r, tuple) and len(r) == 3 and all(_is_int(v) for v in r) and 1 <= r[0] <= r[1] < r[2]
            for r in self.pad_rows)
        if not ok:
            raise ValueError(f"DecodeOptions: pad_rows={self.pad_rows!r} must be None or a tuple of (lo, hi, to) "
                             "int triples with 1 <= lo <= hi < to")

    def for_backend(self, backend: str) -> "DecodeOptions":
        """These options with pad_rows=None replaced by the backend's (PAD_ROWS)."""
        if self.pad_rows is not None:
            return self
        return dataclasses.replace(self, pad_rows=PAD_ROWS.get(backend, ()))

    def padded_rows(self, batch_size: int) -> int:
        """The rows the per-operation step runs for batch_size rows (pad_rows; None: none)."""
        return next((to for lo, hi, to in self.pad_rows or () if lo <= batch_size <= hi), batch_size)


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """The static part of a decode step (hashable: a jit static argument)."""

    config: RWKVConfig
    dtype: jnp.dtype  # matmul compute dtype, as Model.dtype
    precision: Optional[str]
    matvec: str = "xla"  # "xla", "pallas" or "pallas_interpret": who runs the small-batch products
    options: DecodeOptions = DecodeOptions()


def spec_of(model, options: Optional[DecodeOptions] = None) -> StepSpec:
    """The StepSpec of `model`'s decode step with `options` (None: DecodeOptions()), pad_rows
    resolved for the default backend."""
    if options is None:
        options = DecodeOptions()
    elif not isinstance(options, DecodeOptions):
        raise ValueError(f"decode_options must be a rwkv2_jax.generation.step.DecodeOptions or None, "
                         f"got {type(options).__name__}")
    impl = resolve_wkv_impl(model.wkv_impl)
    matvec = impl if impl in ("pallas", "pallas_interpret") else "xla"
    return StepSpec(model.config, jnp.dtype(model.dtype), model.precision, matvec,
                    options.for_backend(jax.default_backend()))


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


# Built decode params per Model (weakly: they go with the model), with the params object they
# were built from (a new params object rebuilds them).
_DECODE_PARAMS = weakref.WeakKeyDictionary()


def decode_params(model):
    """The decode layout of model.params (built once per params object)."""
    cached = _DECODE_PARAMS.get(model)
    if cached is not None and cached[0] is model.params:
        return cached[1]
    built = _build(model.params)
    _DECODE_PARAMS[model] = (model.params, built)
    return built


def _matvec(spec: StepSpec, x, w_t, head: bool = False, stream: bool = False):
    """x [B, in] @ w_t[out, in]^T -> [B, out], with Flax Dense's dtype rules (inputs and output
    in spec.dtype). With Pallas kernels, products with more inputs than outputs run on
    pallas_kernels.matvec, and so does the head with `stream` (the "evict_first" L2 hint on its
    weight loads; DecodeOptions.stream_weights), whose kernel rounds the logits to spec.dtype and
    stores them float32 (no convert after it)."""
    chosen = stream if head else w_t.shape[1] > w_t.shape[0]
    if spec.matvec != "xla" and w_t.dtype == spec.dtype and chosen and x.shape[0] <= MATVEC_MAX_BATCH:
        dtypes = dict(out_dtype=jnp.float32, round_dtype=spec.dtype) if head else dict(out_dtype=spec.dtype)
        blocks = spec.options.matvec_blocks
        if stream:  # whole rows of up to 1,024 columns per block: `bench/matvec.py --sweep` on an H200
            blocks = dataclasses.replace(blocks or MatvecBlockSizes(block_in=1024), eviction_policy="evict_first")
        return pallas_matvec(x, w_t, block_sizes=blocks, interpret=spec.matvec == "pallas_interpret", **dtypes)
    x = x.astype(spec.dtype)
    return lax.dot_general(x, w_t.astype(spec.dtype), (((1,), (1,)), ((), ())), precision=spec.precision)


def _log_eps(cfg: RWKVConfig) -> Optional[float]:
    return math.log(cfg.k_eps) if cfg.k_eps > 0 else None


# The model's LayerNorm (rwkv2_jax.model: float32, epsilon LN_EPS), applied to its params.
_LN = nn.LayerNorm(epsilon=LN_EPS, dtype=jnp.float32)


def _layer_norm(x, p):
    return _LN.apply({"params": p}, x)


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
    opts = spec.options
    if spec.matvec == "xla" or not opts.fused:
        return False
    w = dparams["blocks"][0]["ffn"]["value_t"]  # all matrices share the dtype (_build)
    blocks = LayerBlockSizes.of(opts.fused_blocks, B)
    return w.dtype == spec.dtype and B <= opts.fused_max_batch and decode_kernels.supported(B, spec.config.n_embd, blocks)


def _layer_four_kernels(cfg, blk, x, prev_att, prev_ffn, wkv, layer, blocks: LayerBlockSizes, interpret,
                        token=None):
    """One layer as four kernels -> (x after it, ln1's output, ln2's output [B, C] (the layer's
    next token-shift vectors), WKV state (aa, bb, pp)). prev_att, prev_ffn: [L*B, C] token-shift
    vectors of every layer. token [B]: x is the embedding table, whose rows token[b] the
    time-mix kernel reads itself (a time-mix layer only)."""
    ln1, ln2, log_eps = blk["ln1"], blk["ln2"], _log_eps(cfg)
    ffn = blk["ffn"]
    cm = dict(blocks=blocks.channel_mix_in, interpret=interpret)
    fo = dict(blocks=blocks.ffn_out, interpret=interpret)
    if "pre" in blk:  # ffnPre: a channel mix in place of the time mix
        assert token is None, "the embedding rows are read by a time-mix kernel only"
        p = blk["pre"]
        x_ln, ksq, r = decode_kernels.channel_mix_in(x, ln1["scale"], ln1["bias"], prev_att, p["time_mix"],
                                                     p["kr_t"], layer, ln_eps=LN_EPS, **cm)
        x = decode_kernels.mix_out(ksq, p["value_t"], x_ln, r, **fo)
    else:
        p = blk["att"]
        x_ln, rwkv, *wkv = decode_kernels.time_mix_in(
            x, ln1["scale"], ln1["bias"], prev_att, p["time_mix"], p["kvr_t"], *wkv,
            p["w_log"], p["u_log"], layer, k_clamp=cfg.k_clamp, log_eps=log_eps, ln_eps=LN_EPS,
            blocks=blocks.time_mix_in, interpret=interpret, token=token)
        x = decode_kernels.mix_out(rwkv, p["output_t"], x_ln, blocks=blocks.att_out, interpret=interpret)
    x_ln2, ksq, r = decode_kernels.channel_mix_in(x, ln2["scale"], ln2["bias"], prev_ffn, ffn["time_mix"],
                                                  ffn["kr_t"], layer, ln_eps=LN_EPS, **cm)
    x = decode_kernels.mix_out(ksq, ffn["value_t"], x_ln2, r, **fo)
    return x, x_ln, x_ln2, tuple(wkv)


def _head(spec: StepSpec, dparams, x, fused: bool = False):
    """The final LayerNorm and the head -> logits [B, V] float32 (rounded to spec.dtype).
    fused: the LayerNorm as one Pallas kernel (pallas_kernels.decode.layer_norm), not XLA's two,
    and with DecodeOptions.stream_weights the head on the Pallas kernel with the L2 hint."""
    if fused:
        x = decode_kernels.layer_norm(x, dparams["ln_out"]["scale"], dparams["ln_out"]["bias"], ln_eps=LN_EPS,
                                      out_dtype=spec.dtype, interpret=spec.matvec == "pallas_interpret")
    else:
        x = _layer_norm(x, dparams["ln_out"])
    stream = fused and spec.options.stream_weights
    return _matvec(spec, x, dparams["head_t"], head=True, stream=stream).astype(jnp.float32)


def _rnn_step_fused(spec: StepSpec, dparams, token: jax.Array, state: State) -> Tuple[jax.Array, State]:
    """rnn_step as four Pallas kernels per layer (pallas_kernels.decode): the same function."""
    opts = spec.options
    L, B, C = state.aa.shape
    sizes, interpret = LayerBlockSizes.of(opts.fused_blocks, B), spec.matvec == "pallas_interpret"
    resident = 0
    if opts.stream_weights:
        sizes = sizes.with_eviction_policy("evict_first")
        out_bytes = C * C * jnp.dtype(spec.dtype).itemsize  # a time-mix output matrix
        resident = opts.resident_out_bytes // out_bytes
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
        x, att, ffn, wkv = _layer_four_kernels(spec.config, blk, x, prev_att, prev_ffn, wkv, layer,
                                               kept if i < resident else sizes, interpret,
                                               token=token if i == 0 and from_table else None)
        new_att.append(att)
        new_ffn.append(ffn)
    logits = _head(spec, dparams, x, fused=True)
    aa, bb, pp = (a.reshape(L, B, C) for a in wkv)
    return logits, State(jnp.stack(new_att), jnp.stack(new_ffn), aa, bb, pp)


def rnn_step(spec: StepSpec, dparams, token: jax.Array, state: State) -> Tuple[jax.Array, State]:
    """One token per row: token [B] int -> (logits [B, V] float32, state after it)."""
    B = token.shape[0]
    if _fused_ok(spec, dparams, B):
        return _rnn_step_fused(spec, dparams, token, state)
    rows = spec.options.padded_rows(B) - B
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
