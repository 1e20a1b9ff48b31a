"""Convert RWKV-v2 checkpoints between the release `.pth` and the native `.safetensors`.

    python -m convert 20220615-10803.pth rwkv2-430m.safetensors     # release -> native
    python -m convert rwkv2-430m.safetensors out.pth                # native  -> release

The input format is read off the file's content, whatever its name; the output format
is the other one unless --to says otherwise. Every key and shape is checked against the
release layout (missing or unexpected keys are errors that name the key), L, C, V and
the ffnPre variant are read off the shapes, every tensor must be floating point and
finite, and the written file is read back and compared bit for bit with what was read
before it takes the output's name: a conversion that fails leaves no output file.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import ml_dtypes
import numpy as np

from rwkv2_jax import formats as ckpt
from rwkv2_jax.config import K_CLAMP, K_EPS, release_k_eps


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("input", help="a release .pth or a native .safetensors checkpoint")
    p.add_argument("output", help="where to write the converted checkpoint")
    p.add_argument("--to", choices=("native", "pth"), default=None,
                   help="output format (default: the other format than the input's)")
    p.add_argument("--k-eps", type=float, default=None,
                   help="k_eps stored in a native file (default: from the release name, else 1e-9)")
    p.add_argument("--no-clamp", action="store_true",
                   help="store k_clamp=None in a native file (models trained without the clamp)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"), default=None,
                   help="cast the weights (default: keep the input's dtype)")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="convert weights holding NaN or inf (refused by default)")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    return p.parse_args(argv)


def _read(path: Path, fmt: str):
    """-> release arrays of the file at path, in format fmt."""
    return ckpt.read_native(path)[0] if fmt == "native" else ckpt.read_pth(path)


def convert(args) -> str:
    src, dst = Path(args.input), Path(args.output)
    if not src.is_file():
        raise ckpt.CheckpointError(f"input not found: {src}")
    if dst.is_dir():
        raise ckpt.CheckpointError(f"output {dst} is a directory (give a file path)")
    if dst.exists() and not args.force:
        raise ckpt.CheckpointError(f"output exists: {dst} (pass --force to overwrite)")
    if dst.exists() and src.resolve() == dst.resolve():
        raise ckpt.CheckpointError(f"input and output are the same file: {src}")
    fmt = ckpt.checkpoint_format(src)
    to = args.to or ("pth" if fmt == "native" else "native")

    if fmt == "native":
        arrays, config = ckpt.read_native(src)
        if args.k_eps is not None:
            config = config.replace(k_eps=args.k_eps)
        eps_note = f"k_eps={config.k_eps:g} ({'--k-eps' if args.k_eps is not None else 'stored in ' + src.name})"
    else:
        arrays = ckpt.read_pth(src)
        k_eps = args.k_eps if args.k_eps is not None else release_k_eps(src.name)
        eps_note = (f"k_eps={args.k_eps:g} (--k-eps)" if args.k_eps is not None else
                    f"k_eps={k_eps:g} (release name)" if k_eps is not None else
                    f"k_eps={K_EPS:g} (default: no release name in the file name)")
        config = ckpt.config_from_shapes({k: v.shape for k, v in arrays.items()},
                                         k_eps=K_EPS if k_eps is None else k_eps, k_clamp=K_CLAMP)
    if args.no_clamp:
        config = config.replace(k_clamp=None)
    ckpt.check_config(config, str(src))
    ckpt.check_keys({k: v.shape for k, v in arrays.items()}, config, str(src))
    ckpt.check_arrays(arrays, str(src), allow_nonfinite=args.allow_nonfinite)

    cast_note = ""
    if args.dtype is not None:
        target = ml_dtypes.bfloat16 if args.dtype == "bfloat16" else np.dtype(args.dtype)
        before = "/".join(sorted({a.dtype.name for a in arrays.values()}))
        arrays = {k: v.astype(target) for k, v in arrays.items()}
        cast_note = f" (cast from {before} by --dtype)" if before != np.dtype(target).name else ""
    ordered = {e.key: arrays[e.key] for e in ckpt.release_layout(config)}

    def verify(tmp: Path) -> None:  # the written file holds exactly what we meant, or it never takes dst's name
        back = _read(tmp, to)
        for key, a in ordered.items():
            b = back.get(key)
            if b is None or a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
                raise ckpt.CheckpointError(f"{dst}: key {key!r} differs when read back (disk full?); "
                                           "nothing was written")

    if to == "native":
        ckpt.write_native(ordered, config, dst, check=verify)
    else:
        ckpt.write_pth(ordered, dst, check=verify)
    dtypes = "/".join(sorted({a.dtype.name for a in ordered.values()}))
    size = dst.stat().st_size / 1e6
    return (f"{src} -> {dst} ({to}, {size:.1f} MB): L{config.n_layer}-D{config.n_embd}, "
            f"vocab_size={config.vocab_size}, ffn_pre={config.ffn_pre}, {dtypes}{cast_note}, {eps_note}; "
            f"{len(ordered)} keys verified bit-exact")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        print(convert(args))
    except (ValueError, ImportError) as err:  # CheckpointError is a ValueError
        print(f"convert: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
