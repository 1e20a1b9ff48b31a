"""Train or fine-tune RWKV-v2 on a token file, on one device, many, or many hosts.

    # fine-tune a release (k_eps from the release name) at its context length
    python train.py --init 20220615-10803.pth --data train.npy --out-dir runs/ft \\
        --lr-init 1e-5 --lr-final 1e-5 --epochs 4 --epoch-steps 500
    # extend the context: train the 768 model at 1536
    python train.py --init 20220615-10803.pth --data train.npy --ctx-len 1536 --out-dir runs/ctx1536
    # from scratch with the original initialisation
    python train.py --scratch --n-layer 12 --n-embd 768 --data train.npy --out-dir runs/l12

Data: a .npy of token ids (python -m rwkv2_jax.cli.prepare_data makes one); every step
reads batch_size x grad_accum random windows of ctx_len + 1 tokens, drawn from
(--seed, step) alone. Checkpoints (orbax, async, the last --keep kept) go to
OUT_DIR/checkpoints; running the same command again resumes from the latest one and
reaches exactly the parameters of an uninterrupted run. At the end: OUT_DIR/final.pth
(release format), OUT_DIR/final.safetensors (native), OUT_DIR/metrics.jsonl and
OUT_DIR/loss.png. Several GPUs: data parallel over all of them by default; --fsdp N
also shards parameters and optimizer state over groups of N devices.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

PROG = "train.py"


class UsageError(Exception):
    """Bad input: printed as one line, exit status 2."""


def parse_args(argv=None) -> argparse.Namespace:
    from rwkv2_jax.config import PRESETS
    from rwkv2_jax.wkv import WKV_IMPLS
    from rwkv2_jax.training.trainer import DTYPES, PRECISIONS, SCHEDULES, TrainConfig

    d = TrainConfig()
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--init", default=None, help="start from this checkpoint: a release .pth or a native .safetensors")
    src.add_argument("--scratch", action="store_true", help="start from the original initialisation (spec)")
    g.add_argument("--preset", choices=sorted(PRESETS), default=None, help="--scratch: a released size")
    g.add_argument("--n-layer", type=int, default=None, help="--scratch: layers L")
    g.add_argument("--n-embd", type=int, default=None, help="--scratch: width C")
    g.add_argument("--vocab-size", type=int, default=50277, help="--scratch: vocabulary V (default 50277, the 20B tokenizer)")
    g.add_argument("--ffn-pre", action="store_true", help="--scratch: the RWKV-ffnPre variant")
    g.add_argument("--k-eps", type=float, default=None,
                   help="WKV epsilon (default: --init's release name or file, else 1e-9)")
    g.add_argument("--k-clamp", default=None,
                   help="clamp of K before exp: a number or 'none' (default: the checkpoint's, 60 for --scratch)")

    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, help="training token file (.npy of ids)")
    g.add_argument("--eval-data", default=None, help="held-out token file, evaluated every --eval-every steps")
    g.add_argument("--eval-every", type=int, default=None, help="steps between evaluations (default: --epoch-steps)")
    g.add_argument("--eval-windows", type=int, default=64,
                   help="consecutive windows from the start of --eval-data per evaluation (default 64)")
    g.add_argument("--ctx-len", type=int, default=d.ctx_len,
                   help=f"tokens per row T (default {d.ctx_len}); above the checkpoint's trains a longer context")
    g.add_argument("--seed", type=int, default=d.seed, help=f"data-order seed (default {d.seed})")

    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help=f"rows per micro-batch, all devices together (default {d.batch_size})")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, help=f"micro-batches per optimizer step (default {d.grad_accum})")
    g.add_argument("--epochs", type=int, default=d.epochs, help=f"mini-epochs (default {d.epochs})")
    g.add_argument("--epoch-steps", type=int, default=d.epoch_steps, help=f"optimizer steps per mini-epoch (default {d.epoch_steps})")
    g.add_argument("--lr-init", type=float, default=d.lr_init, help=f"learning rate after warm-up (default {d.lr_init:g})")
    g.add_argument("--lr-final", type=float, default=d.lr_final, help=f"learning rate at the last step (default {d.lr_final:g})")
    g.add_argument("--lr-schedule", choices=SCHEDULES, default=d.lr_schedule, help=f"lr_init -> lr_final curve (default {d.lr_schedule})")
    g.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warm-up steps from 0 (default 0)")
    g.add_argument("--beta1", type=float, default=d.beta1, help=f"Adam beta1 (default {d.beta1})")
    g.add_argument("--beta2", type=float, default=d.beta2, help=f"Adam beta2 (default {d.beta2})")
    g.add_argument("--adam-eps", type=float, default=d.adam_eps, help=f"Adam epsilon (default {d.adam_eps:g})")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, help=f"global-norm gradient clipping (default {d.grad_clip})")
    g.add_argument("--dtype", choices=DTYPES, default=d.dtype,
                   help="matmul compute dtype (default bfloat16); parameters, optimizer state, LayerNorm and WKV are float32")
    g.add_argument("--precision", choices=PRECISIONS, default="default",
                   help="matmul precision (default: JAX's, TF32 for float32 on recent GPUs; 'highest': exact float32)")
    g.add_argument("--wkv-impl", choices=WKV_IMPLS, default=d.wkv_impl, help="WKV implementation (default auto: Pallas on GPU)")
    g.add_argument("--remat", action="store_true", help="recompute blocks in the backward pass (less memory)")

    g = p.add_argument_group("devices")
    g.add_argument("--data-parallel", type=int, default=None, help="data axis of the mesh (default: devices / fsdp)")
    g.add_argument("--fsdp", type=int, default=1, help="fsdp axis: shard parameters and optimizer state over this many devices (default 1)")
    g.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=True,
                   help="GPU: XLA's deterministic ops (--xla_gpu_deterministic_ops), so a step is a pure function "
                        "of (state, batch) and a resumed run is bit-exact (default on; without them, repeated "
                        "steps on an H200 differed in the last bits; they cost ~7%% of the bf16 step of L24-D1024 there)")
    g.add_argument("--distributed", action="store_true",
                   help="multi-host: call jax.distributed.initialize() first; under Slurm, Open MPI or Kubernetes "
                        "it finds the coordinator itself, elsewhere give the three flags below")
    g.add_argument("--coordinator-address", default=None,
                   help="--distributed: host:port of process 0 (default: $JAX_COORDINATOR_ADDRESS or auto-detected)")
    g.add_argument("--num-processes", type=int, default=None, help="--distributed: number of processes (hosts)")
    g.add_argument("--process-id", type=int, default=None, help="--distributed: this process's index, 0 .. N-1")

    g = p.add_argument_group("output")
    g.add_argument("--out-dir", required=True, help="folder for checkpoints/, metrics.jsonl, loss.png and the exports")
    g.add_argument("--save-every", type=int, default=None, help="steps between checkpoints (default: --epoch-steps); one is always written at the end")
    g.add_argument("--keep", type=int, default=3, help="checkpoints kept (default 3)")
    g.add_argument("--no-resume", action="store_true", help="refuse to start if OUT_DIR/checkpoints has checkpoints (default: resume from the latest)")
    g.add_argument("--stop-at-step", type=int, default=None,
                   help="stop after this step with a checkpoint, as if interrupted (e.g. a time-limited job); rerun to continue")
    g.add_argument("--export", choices=("both", "pth", "safetensors", "none"), default="both",
                   help="final model files: release .pth and/or native .safetensors (default both)")
    g.add_argument("--log-every", type=int, default=10, help="steps between metric fetches, log lines and progress updates (default 10)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)

    for name in ("eval_every", "eval_windows", "save_every", "keep", "log_every", "fsdp", "data_parallel", "stop_at_step"):
        value = getattr(args, name)
        if value is not None and value < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    if args.init is None and not args.scratch:
        p.error("give --init CHECKPOINT or --scratch")
    if args.scratch and args.preset is None and (args.n_layer is None or args.n_embd is None):
        p.error("--scratch needs --preset or both --n-layer and --n-embd")
    if not args.scratch and (args.preset or args.n_layer or args.n_embd or args.ffn_pre):
        p.error("--preset/--n-layer/--n-embd/--ffn-pre only apply with --scratch")
    return args


def train_config(args):
    from rwkv2_jax.training.trainer import TrainConfig

    try:
        return TrainConfig(
            ctx_len=args.ctx_len, batch_size=args.batch_size, grad_accum=args.grad_accum, epochs=args.epochs,
            epoch_steps=args.epoch_steps, lr_init=args.lr_init, lr_final=args.lr_final,
            lr_schedule=args.lr_schedule, warmup_steps=args.warmup_steps, beta1=args.beta1, beta2=args.beta2,
            adam_eps=args.adam_eps, grad_clip=args.grad_clip, dtype=args.dtype,
            precision=None if args.precision == "default" else args.precision, wkv_impl=args.wkv_impl,
            remat=args.remat, seed=args.seed,
        )
    except ValueError as err:
        raise UsageError(str(err)) from None


def _k_clamp(text):
    if text is None:
        return None
    if text.lower() == "none":
        return "none"
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"--k-clamp must be a number or 'none', got {text!r}") from None


def initial_model(args, cfg):
    """(RWKVConfig, numpy params) of the starting point: a checkpoint or the original initialisation."""
    import jax

    import rwkv2_jax as rw
    from rwkv2_jax.config import K_CLAMP, K_EPS, PRESETS, RWKVConfig

    clamp = _k_clamp(args.k_clamp)
    if args.scratch:
        base = PRESETS[args.preset] if args.preset else RWKVConfig(n_layer=args.n_layer, n_embd=args.n_embd)
        try:
            config = base.replace(
                n_layer=args.n_layer or base.n_layer, n_embd=args.n_embd or base.n_embd,
                vocab_size=args.vocab_size, ffn_pre=args.ffn_pre, ctx_len=cfg.ctx_len,
                k_eps=K_EPS if args.k_eps is None else args.k_eps,
                k_clamp=K_CLAMP if clamp is None else (None if clamp == "none" else clamp),
            )
        except ValueError as err:
            raise UsageError(str(err)) from None
        model = rw.init(config, seed=cfg.seed, wkv_impl="reference")
        return config, jax.device_get(model.params)
    path = Path(args.init)
    if not path.is_file():
        raise UsageError(f"--init checkpoint not found: {path}")
    kwargs = {"k_eps": args.k_eps, "ctx_len": cfg.ctx_len, "wkv_impl": "reference"}
    if clamp is not None:
        kwargs["k_clamp"] = None if clamp == "none" else clamp
    model = rw.load_any(path, **kwargs)
    config = model.config.replace(ctx_len=cfg.ctx_len)
    return config, jax.tree.map(lambda x: jax.device_get(x).astype("float32"), model.params)


def plot_losses(metrics_path: Path, out_png: Path) -> None:
    """Training loss per step (and held-out loss where present) from metrics.jsonl."""
    from matplotlib.figure import Figure  # no pyplot: no global backend, Agg by default

    steps, losses, eval_steps, eval_losses = [], [], [], []
    for line in metrics_path.read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            steps.append(rec["step"])
            losses.append(rec["loss"])
        if "eval_loss" in rec:
            eval_steps.append(rec["step"])
            eval_losses.append(rec["eval_loss"])
    fig = Figure(figsize=(8, 4.5))
    ax = fig.add_subplot()
    ax.plot(steps, losses, lw=0.8, label="train loss")
    if eval_steps:
        ax.plot(eval_steps, eval_losses, "o-", label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records past the resumed step (steps that ran after the last checkpoint)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= last_step]
    path.write_text("".join(line + "\n" for line in keep))


def run(args) -> int:
    import os

    flags = os.environ.get("XLA_FLAGS", "")
    if args.deterministic and "xla_gpu_deterministic_ops" not in flags:  # read when the backend starts, below
        os.environ["XLA_FLAGS"] = f"{flags} --xla_gpu_deterministic_ops=true".strip()
    import jax

    if args.distributed:
        try:
            jax.distributed.initialize(coordinator_address=args.coordinator_address,
                                       num_processes=args.num_processes, process_id=args.process_id)
        except (RuntimeError, ValueError) as err:
            raise UsageError(f"jax.distributed.initialize failed: {str(err).strip().splitlines()[0]}") from None
    elif args.coordinator_address or args.num_processes is not None or args.process_id is not None:
        raise UsageError("--coordinator-address/--num-processes/--process-id need --distributed")

    from rwkv2_jax.training import sharding as shd
    from rwkv2_jax.training import trainer as tr

    cfg = train_config(args)
    out_dir = Path(args.out_dir)
    data_path = Path(args.data)
    if not data_path.is_file():
        raise UsageError(f"--data token file not found: {data_path}")
    if args.eval_data and not Path(args.eval_data).is_file():
        raise UsageError(f"--eval-data token file not found: {args.eval_data}")
    if args.export in ("both", "pth"):
        try:
            import torch  # noqa: F401
        except ImportError:
            raise UsageError("--export pth needs torch (pip install 'rwkv2-jax[torch]'); "
                             "or pass --export safetensors") from None

    # Devices first: a batch that cannot be split fails before any file is read or written.
    try:
        mesh = shd.make_mesh(args.data_parallel, args.fsdp)
    except shd.ShardingError as err:
        raise UsageError(str(err)) from None
    bad = shd.batch_size_error(cfg.batch_size, mesh)
    if bad:
        raise UsageError(bad)

    out_dir.mkdir(parents=True, exist_ok=True)
    ckpts = tr.Checkpoints(out_dir / "checkpoints", keep=args.keep)
    try:
        return _train(args, cfg, mesh, ckpts, out_dir, is_main=jax.process_index() == 0)
    finally:
        ckpts.wait()  # an async save in flight completes before we exit, whatever happened
        ckpts.close()


def _train(args, cfg, mesh, ckpts, out_dir: Path, is_main: bool) -> int:
    import jax
    import numpy as np
    from tqdm import tqdm

    from rwkv2_jax import formats as ckpt
    from rwkv2_jax.training import trainer as tr
    from rwkv2_jax.config import RWKVConfig
    from rwkv2_jax.training.data import TokenFile, WindowSampler, eval_windows

    latest = ckpts.latest_step()
    if latest is not None and args.no_resume:
        raise UsageError(f"{ckpts.directory} already holds checkpoints (latest step {latest}); "
                         "drop --no-resume to continue that run, or choose another --out-dir")
    if latest is not None:
        meta = ckpts.read_meta(latest)
        try:
            model_config = RWKVConfig.from_dict(meta["model_config"])
        except (KeyError, TypeError, ValueError) as err:
            raise tr.TrainCheckpointError(f"checkpoint {ckpts.directory / str(latest)}: bad metadata ({err})") from None
        diff = tr.config_mismatch(meta.get("train_config", {}), cfg)
        if diff:
            raise UsageError(f"cannot resume {ckpts.directory} (step {latest}) with different settings: {diff}; "
                             "use the same flags or another --out-dir")
        init_params = None
    else:
        model_config, init_params = initial_model(args, cfg)

    data = TokenFile(args.data, model_config.vocab_size, cfg.ctx_len + 1, what="--data")
    sampler = WindowSampler(data.tokens, cfg.ctx_len, cfg.seed)
    eval_set = None
    if args.eval_data:
        held = TokenFile(args.eval_data, model_config.vocab_size, cfg.ctx_len + 1, what="--eval-data")
        n = min(args.eval_windows, (len(held) - 1) // cfg.ctx_len) // cfg.batch_size * cfg.batch_size
        if n == 0:
            raise UsageError(f"--eval-data {args.eval_data} has {len(held)} tokens; one evaluation batch needs "
                             f"batch_size x ctx_len + 1 = {cfg.batch_size * cfg.ctx_len + 1}")
        eval_set = eval_windows(held.tokens, cfg.ctx_len, n).reshape(-1, cfg.batch_size, cfg.ctx_len + 1)

    run = tr.setup(model_config, cfg, mesh)
    if latest is not None:
        state = ckpts.restore(latest, run.state_shape, run.state_shardings)
        start = int(jax.device_get(state.step))
        if start != latest:
            raise tr.TrainCheckpointError(f"checkpoint {ckpts.directory / str(latest)} holds step {start}")
        if is_main:
            print(f"{PROG}: resuming from {ckpts.directory / str(latest)} (step {start} of {cfg.total_steps})",
                  file=sys.stderr)
    else:
        state = run.init_state(init_params)
        start = 0
    meta = tr.save_metadata(model_config, cfg, {"init": args.init, "data": str(args.data)})

    metrics_path = out_dir / "metrics.jsonl"
    if is_main:
        _truncate_metrics(metrics_path, start)
    total = cfg.total_steps
    stop = min(total, args.stop_at_step) if args.stop_at_step else total
    save_every = args.save_every or cfg.epoch_steps
    eval_every = args.eval_every or cfg.epoch_steps
    if is_main:
        n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(run.state_shape.params))
        print(f"{PROG}: L{model_config.n_layer}-D{model_config.n_embd} V={model_config.vocab_size} "
              f"({n_params / 1e6:.1f}M params), {len(data):,} tokens in {args.data}; "
              f"mesh data={mesh.shape['data']} x fsdp={mesh.shape['fsdp']}; "
              f"{cfg.tokens_per_step:,} tokens/step, steps {start}..{stop} of {total}", file=sys.stderr)

    def evaluate(params) -> float:
        total_nll = 0.0
        for windows in eval_set:
            total_nll += float(run.eval_step(params, jax.make_array_from_callback(
                windows.shape, run.eval_sharding, lambda index: windows[index])))
        return total_nll / (eval_set.shape[0] * eval_set.shape[1] * cfg.ctx_len)

    bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
               disable=args.no_progress or not is_main)
    pending = []  # (step, metrics on device) not yet logged
    t_last, step_last = time.perf_counter(), start

    def flush_metrics(step):
        nonlocal pending, t_last, step_last
        if not pending:
            return
        fetched = jax.device_get([m for _, m in pending])
        now = time.perf_counter()
        rate = tr.tokens_per_second(cfg.tokens_per_step * (step - step_last), now - t_last)
        t_last, step_last = now, step
        if is_main:
            for (s, _), m in zip(pending, fetched):
                rec = {"step": s, "loss": float(m["loss"]), "ppl": math.exp(min(float(m["loss"]), 50.0)),
                       "lr": float(m["lr"]), "grad_norm": float(m["grad_norm"]),
                       "tokens": s * cfg.tokens_per_step, "tokens_per_s": rate}
                tr.write_jsonl(metrics_path, rec)
            bar.set_postfix(loss=f"{rec['loss']:.4f}", ppl=f"{rec['ppl']:.2f}", lr=f"{rec['lr']:.2e}",
                            tok_s=f"{rate:,.0f}", refresh=False)
        pending = []

    step = start
    try:
        while step < stop:
            windows = run.put_batch(sampler.batch(step, cfg.grad_accum, cfg.batch_size))
            state, metrics = run.train_step(state, windows)
            step += 1
            pending.append((step, metrics))
            bar.update(1)
            last = step == stop
            if step % args.log_every == 0 or last:
                flush_metrics(step)
            if step % save_every == 0 or last:
                ckpts.save(step, state, meta)
            if eval_set is not None and (step % eval_every == 0 or step == total):
                flush_metrics(step)
                eval_loss = evaluate(state.params)
                if is_main:
                    tr.write_jsonl(metrics_path, {"step": step, "eval_loss": eval_loss,
                                                  "eval_ppl": math.exp(min(eval_loss, 50.0))})
                    bar.write(f"step {step}: held-out loss {eval_loss:.4f} (ppl {math.exp(min(eval_loss, 50.0)):.2f})")
                t_last = time.perf_counter()  # keep evaluation time out of tokens/s
            if step % cfg.epoch_steps == 0 and is_main:
                bar.write(f"mini-epoch {step // cfg.epoch_steps}/{cfg.epochs} done (step {step})")
    except KeyboardInterrupt:
        bar.close()
        latest = ckpts.latest_step()
        print(f"{PROG}: interrupted at step {step}; rerun the same command to resume from the last "
              f"checkpoint (step {latest})", file=sys.stderr)
        return 130
    bar.close()
    ckpts.wait()

    if step < total:
        if is_main:
            print(f"{PROG}: stopped at step {step} (--stop-at-step); checkpoint in {ckpts.directory / str(step)}; "
                  "rerun without --stop-at-step to continue", file=sys.stderr)
        return 0

    # Exports: float32 parameters in the release layout.
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        params = multihost_utils.process_allgather(state.params, tiled=True)
    else:
        params = jax.device_get(state.params)
    if is_main:
        arrays = ckpt.params_to_release(params, model_config)
        written = []
        if args.export in ("both", "pth"):
            written.append(ckpt.write_pth(arrays, out_dir / "final.pth"))
        if args.export in ("both", "safetensors"):
            written.append(ckpt.write_native(arrays, model_config, out_dir / "final.safetensors"))
        if metrics_path.exists():
            plot_losses(metrics_path, out_dir / "loss.png")
            written.append(out_dir / "loss.png")
        print(f"{PROG}: done ({total} steps); wrote {', '.join(str(w) for w in written)}", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    from rwkv2_jax.training.data import DataError

    try:
        return run(args)
    except (UsageError, DataError, ValueError, OSError) as err:
        # ValueError covers CheckpointError, TrainCheckpointError, ShardingError and config checks.
        print(f"{PROG}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
