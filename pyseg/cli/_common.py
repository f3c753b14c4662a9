"""Shared by the commands: the console-script wrapper (exit statuses, one-line errors) and argument helpers.

Every command module defines ``run(argv=None)`` (the Python API: parses ``argv``, does the work, returns a
summary, raises on failure) and ``main = console_main(run, "pyseg-<name>")``, the console-script entry point.
"""
from __future__ import annotations

import argparse
import ast
import functools
import os
import sys
from pathlib import Path

#: set to 1 to let a failing command raise (full traceback) instead of printing one line
TRACEBACK_ENV = "PYSEG_TRACEBACK"


class CommandError(Exception):
    """A failure a command reports as one line (``prog: error: message``, exit status 1), e.g. a missing file."""


# Errors whose message already says what is wrong; anything else gets its type name in front.
_PLAIN_ERRORS = (CommandError, OSError, ValueError, TypeError, KeyError, LookupError)


def error_line(exc: BaseException) -> str:
    """``exc`` as one line: its message with line breaks joined; the type name first for unexpected errors."""
    from ..data.datasets import DatasetError

    msg = "; ".join(part.strip() for part in str(exc).splitlines() if part.strip())
    if isinstance(exc, KeyError) and len(exc.args) == 1:
        msg = str(exc.args[0])
    if not isinstance(exc, _PLAIN_ERRORS + (DatasetError,)):
        msg = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return msg or type(exc).__name__


def console_main(run, prog: str):
    """Console-script entry point around ``run(argv) -> summary``: returns the exit status instead of the summary.

    0 on success; 2 for usage errors (argparse exits itself, printing usage); 1 on any other failure, printed to
    stderr as one line ``prog: error: message`` (no traceback; ``PYSEG_TRACEBACK=1`` re-raises instead);
    130 on Ctrl-C. ``raise SystemExit("message")`` inside ``run`` is reported like an error. Usage::

        def run(argv=None) -> dict: ...
        main = console_main(run, "pyseg-foo")          # [project.scripts] pyseg-foo = "pyseg.cli.foo:main"
    """

    @functools.wraps(run)
    def main(argv=None) -> int:
        try:
            run(argv)
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                return e.code or 0
            print(f"{prog}: error: {error_line(CommandError(e.code))}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr)
            return 130
        except Exception as e:
            if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
                raise
            print(f"{prog}: error: {error_line(e)}", file=sys.stderr)
            return 1
        return 0

    main.__doc__ = f"``{prog}`` console entry point: runs ``{run.__module__}.{run.__name__}``, returns the exit status."
    main.run = run
    return main


def require_file(path, what: str) -> Path:
    """``Path(path)`` if it is an existing file, else :class:`CommandError` ``"<what> not found: <path>"``."""
    p = Path(path)
    if not p.is_file():
        raise CommandError(f"{what} not found: {path}" if not p.exists() else f"{what} is not a file: {path}")
    return p


def require_dir(path, what: str) -> Path:
    """``Path(path)`` if it is an existing folder, else :class:`CommandError` ``"<what> not found: <path>"``."""
    p = Path(path)
    if not p.is_dir():
        raise CommandError(f"{what} not found: {path}" if not p.exists() else f"{what} is not a folder: {path}")
    return p


def positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _unit_interval(closed: bool):
    """An argparse type: a number in (0, 1], or in (0, 1) when not ``closed``."""
    label = "(0, 1]" if closed else "(0, 1)"

    def parse(s: str) -> float:
        try:
            v = float(s)
        except ValueError:
            v = float("nan")
        if not (0.0 < v < 1.0 or (closed and v == 1.0)):
            raise argparse.ArgumentTypeError(f"expected a number in {label}, got {s!r}")
        return v

    parse.__name__ = "number in " + label  # argparse names the type by it in errors
    return parse


#: a share such as a sampling weight, in (0, 1)
open_unit_float = _unit_interval(closed=False)
#: a confidence threshold, in (0, 1]
probability_threshold = _unit_interval(closed=True)


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
    g.add_argument("--progress", choices=("auto", "bar", "log", "none"), default="auto",
                   help="auto: live tqdm bars on a terminal, else (pipe, file) a plain line at most every "
                   "PYSEG_PROGRESS_INTERVAL seconds (default 60); bar | log | none force one")
    g.add_argument("--no-progress", dest="progress", action="store_const", const="none", help="= --progress none")
    g.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="CPU threads of torch's intra-op pool (torch.set_num_threads; default: torch's choice)")


def apply_threads(args) -> None:
    """``torch.set_num_threads(args.threads)`` when ``--threads`` was given."""
    n = getattr(args, "threads", None)
    if n is None:
        return
    if n < 1:
        raise ValueError(f"--threads must be >= 1, got {n}")
    import torch

    torch.set_num_threads(n)
