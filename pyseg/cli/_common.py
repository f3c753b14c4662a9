"""Argument parsing helpers shared by the commands."""
from __future__ import annotations

import argparse
import ast


def size_hw(s: str) -> tuple[int, int]:
    """'512x1024' (HxW) or '512' (square) -> (H, W)."""
    try:
        parts = [int(v) for v in s.lower().replace(",", "x").split("x")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HxW such as 512x1024, got {s!r}") from None
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) <= 0:
        raise argparse.ArgumentTypeError(f"expected HxW with positive sizes, got {s!r}")
    return parts[0], parts[1]


def float_list(s: str) -> list[float]:
    try:
        out = [float(v) for v in s.replace(" ", "").split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers such as 0.5,1.0,2.0, got {s!r}") from None
    if not out or min(out) <= 0:
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {s!r}")
    return out


def key_values(items) -> dict:
    """['a=1', 'b=none', 'c=[1,2]'] -> {'a': 1, 'b': 'none', 'c': [1, 2]} (Python literals, else strings)."""
    out = {}
    for it in items or ():
        if "=" not in it:
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {it!r}")
        k, v = it.split("=", 1)
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = v
    return out


def add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", required=required, help="registry name (pyseg.models.list_models())")
    g.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra keyword for create_model (Python literal), repeatable")
    g.add_argument("--num-classes", type=int, default=None, help="default: the dataset's class count")
    g.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE_OR_FILE",
                   help="import a module (dotted name) or a .py file first, e.g. one that registers extra models")


def add_data_args(p: argparse.ArgumentParser) -> None:
    from ..data import DATASETS

    g = p.add_argument_group("data")
    g.add_argument("--dataset", required=True, choices=sorted(DATASETS), help="dataset type (folder layouts: "
                   "see pyseg.data.datasets)")
    g.add_argument("--data-root", required=True, help="dataset root folder")
    g.add_argument("--dataset-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="extra dataset keyword, e.g. void_as_class=True (CamVid) or mask_dir=... (VOC)")
    g.add_argument("--workers", type=int, default=4, help="DataLoader worker processes per rank")
    g.add_argument("--size-divisor", type=int, default=1,
                   help="pad evaluation images to a multiple of this (HyperSeg: 64, VOC models: 128)")


def add_runtime_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runtime")
    g.add_argument("--device", default="auto", help="auto | cpu | cuda")
    g.add_argument("--amp", default="none", choices=("none", "bf16", "fp16"),
                   help="autocast dtype (fp16 only on CUDA, with a gradient scaler)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm bars")
    g.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads of torch's intra-op pool (torch.set_num_threads; default: torch's choice)")


def apply_threads(args) -> None:
    """``torch.set_num_threads(args.threads)`` when ``--threads`` was given."""
    n = getattr(args, "threads", None)
    if n is None:
        return
    if n < 1:
        raise SystemExit(f"--threads must be >= 1, got {n}")
    import torch

    torch.set_num_threads(n)
