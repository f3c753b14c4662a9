"""``pyseg-export``: export a registry model or a ``pyseg-train`` checkpoint to ONNX or an AOTInductor
package, then check the file against eager PyTorch on a random input.

    pyseg-export --model hyperseg-m --format onnx --output hyperseg-m.onnx
    pyseg-export --checkpoint runs/tiny/best.pt --format pt2 --output tiny.pt2 --height 128 --width 256
    pyseg-export --model hmsa-hyperseg-m --scales 0.5,1 --labels --format onnx --output msa.onnx

Exit status: 0 exported and within tolerance; 1 export failed or the check exceeded ``--tolerance``;
2 bad usage (unknown model, unsupported option). Errors are one line on stderr.
"""
from __future__ import annotations

import argparse
import sys
import time

from ._common import float_list, key_values

PROG = "pyseg-export"


class UsageError(Exception):
    """Bad input: exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    from ..export import DTYPES, FORMATS

    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="registry name (pyseg.models.list_models()); random weights")
    src.add_argument("--checkpoint", help="a pyseg-train checkpoint (its metadata names the model)")
    p.add_argument("--format", required=True, choices=FORMATS, help="onnx: standard ONNX ops (opset 18), "
                   "ONNX Runtime/TensorRT; pt2: torch.export + AOTInductor package for the CPU")
    p.add_argument("--output", required=True, help="file to write (written atomically)")
    p.add_argument("--height", type=int, default=None, help="input height (default: the model's config size)")
    p.add_argument("--width", type=int, default=None, help="input width (default: the model's config size)")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    p.add_argument("--scales", type=float_list, default=None,
                   help="HMSA models (hmsa-*): inference scales, comma separated, containing 1")
    p.add_argument("--labels", action="store_true",
                   help="output int64 labels (B, H, W) (HMSA: fused argmax) instead of logits")
    p.add_argument("--static-batch", action="store_true", help="fixed batch 1 (default: dynamic batch)")
    p.add_argument("--num-classes", type=int, default=None)
    p.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra keyword for create_model (Python literal), repeatable")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE_OR_FILE",
                   help="import a module or .py file first (e.g. one that registers extra models)")
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the comparison with eager")
    p.add_argument("--tolerance", type=float, default=None,
                   help="largest allowed |exported - eager| / max |eager| (default 1e-4 fp32, 1e-2 fp16); "
                        "with --labels the smallest allowed fraction of equal labels is 1 - 1e-3")
    return p


def _build(args):
    from ..models import create_model, list_models

    kwargs = key_values(args.model_arg)
    if args.checkpoint:
        from ._load import load_model_from_args

        args.device, args.model_kwargs, args.model = "cpu", kwargs, None
        model, _, _ = load_model_from_args(args)
        return model
    from ..engine.trainer import import_extra

    import_extra(args.imports)
    names = list_models()
    if args.model not in names:
        raise UsageError(f"unknown model {args.model!r}; supported: {', '.join(names)}")
    return create_model(args.model, num_classes=args.num_classes, **kwargs)


def run(args) -> int:
    from ..export import check_export, export_model

    model = _build(args)
    if args.scales is not None:
        if not callable(getattr(model, "set_scales", None)):
            raise UsageError(f"--scales needs a multi-scale attention model (hmsa-*), not "
                             f"{type(model).__name__}")
        try:
            model.set_scales(args.scales)
        except (TypeError, ValueError) as e:
            raise UsageError(f"--scales: {e}") from None
    if args.dtype == "fp16" and args.format == "pt2":
        raise UsageError("--dtype fp16 is supported for --format onnx only (the pt2 package runs on the CPU)")
    model = model.cpu().eval()
    try:  # sizes the model cannot take are usage errors
        from ..export import example_input

        example_input(model, args.height, args.width)
    except ValueError as e:
        raise UsageError(str(e)) from None
    kw = dict(height=args.height, width=args.width, dtype=args.dtype, labels=args.labels)
    t0 = time.perf_counter()
    path = export_model(model, args.output, format=args.format, dynamic_batch=not args.static_batch, **kw)
    print(f"wrote {path} ({args.format}, {args.dtype}, {'static' if args.static_batch else 'dynamic'} batch) "
          f"in {time.perf_counter() - t0:.1f} s")
    if not args.check:
        return 0
    batch = 1 if args.static_batch else 2
    res = check_export(model, path, batch=batch, **kw)
    if args.labels:
        tol = 1e-3 if args.tolerance is None else args.tolerance
        ok = res["label_agreement"] >= 1 - tol
        print(f"check vs eager (random input, batch {batch}): labels agree on {100 * res['label_agreement']:.3f}% "
              f"of {res['pixels']} pixels")
    else:
        tol = args.tolerance if args.tolerance is not None else (1e-4 if args.dtype == "fp32" else 1e-2)
        ok = res["max_rel_diff"] <= tol
        print(f"check vs eager (random input, batch {batch}): max |diff| = {res['max_abs_diff']:.3g} "
              f"(max |eager| = {res['max_abs_eager']:.3g}, relative {res['max_rel_diff']:.3g}, tolerance {tol:g})")
    if not ok:
        print(f"{PROG}: error: the exported file differs from eager beyond the tolerance", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code = run(args)
    except UsageError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        code = 2
    except (ImportError, FileNotFoundError, ValueError, RuntimeError, OSError) as e:
        print(f"{PROG}: error: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}", file=sys.stderr)
        code = 1
    return code


if __name__ == "__main__":
    sys.exit(main())
