"""``pyseg-export``: export a registry model or a ``pyseg-train`` checkpoint to ONNX or an AOTInductor
package, then check the file against eager PyTorch on a random input.

    pyseg-export --model hyperseg-m --format onnx --output hyperseg-m.onnx
    pyseg-export --checkpoint runs/tiny/best.pt --format pt2 --output tiny.pt2 --height 128 --width 256
    pyseg-export --model hmsa-hyperseg-m --scales 0.5,1 --labels --format onnx --output msa.onnx

Exit status (pyseg.cli._common.console_main): 0 exported and within tolerance; 2 bad usage (unknown
model, unsupported option or size: argparse's usage message, the last line names what is supported); 1 the
export failed or the check exceeded ``--tolerance`` (one line on stderr).
"""
from __future__ import annotations

import argparse
import sys
import time

from ._common import CommandError, console_main, float_list, key_values

PROG = "pyseg-export"


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


def _build(args, parser):
    from ..models import create_model, list_models

    kwargs = key_values(args.model_arg)
    if args.checkpoint:
        from ._common import require_file
        from ._load import load_model_from_args

        require_file(args.checkpoint, "checkpoint")
        args.device, args.model_kwargs, args.model = "cpu", kwargs, None
        model, _, _ = load_model_from_args(args)
        return model
    from ..engine.trainer import import_extra

    import_extra(args.imports)
    names = list_models()
    if args.model not in names:
        parser.error(f"unknown model {args.model!r}; supported: {', '.join(names)}")
    return create_model(args.model, num_classes=args.num_classes, **kwargs)


def run(argv=None) -> dict:
    """Parse ``argv``, export, check; returns a summary dict (raises on failure)."""
    from ..export import check_export, example_input, export_model

    parser = build_parser()
    args = parser.parse_args(argv)
    if args.dtype == "fp16" and args.format == "pt2":
        parser.error("--dtype fp16 is supported for --format onnx only (the pt2 package runs on the CPU in fp32)")
    model = _build(args, parser)
    if args.scales is not None:
        if not callable(getattr(model, "set_scales", None)):
            parser.error(f"--scales needs a multi-scale attention model (hmsa-*), not {type(model).__name__}")
        try:
            model.set_scales(args.scales)
        except (TypeError, ValueError) as e:
            parser.error(f"--scales: {e}")
    model = model.cpu().eval()
    try:  # sizes the model cannot take are usage errors
        example_input(model, args.height, args.width)
    except ValueError as e:
        parser.error(str(e))
    kw = dict(height=args.height, width=args.width, dtype=args.dtype, labels=args.labels)
    t0 = time.perf_counter()
    try:
        path = export_model(model, args.output, format=args.format, dynamic_batch=not args.static_batch, **kw)
    except (FileNotFoundError, ImportError) as e:
        raise CommandError(str(e)) from None
    except Exception as e:  # torch's export errors span pages: keep the first line
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise CommandError(f"{args.format} export failed: {type(e).__name__}: {first} "
                           f"(PYSEG_TRACEBACK=1 shows the traceback)") from e
    summary = {"output": str(path), "format": args.format, "dtype": args.dtype,
               "export_s": time.perf_counter() - t0}
    print(f"wrote {path} ({args.format}, {args.dtype}, {'static' if args.static_batch else 'dynamic'} batch) "
          f"in {summary['export_s']:.1f} s")
    if not args.check:
        return summary
    batch = 1 if args.static_batch else 2
    res = check_export(model, path, batch=batch, **kw)
    summary.update(res)
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
        raise CommandError(f"{path} differs from eager beyond the tolerance {tol:g}")
    return summary


main = console_main(run, PROG)


if __name__ == "__main__":
    sys.exit(main())
