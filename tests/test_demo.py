"""The README demo: its commands (read from README.md, sizes scaled down) through the console entry points, a
rerun giving the same trajectory."""
import json
import re
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pyseg.cli import eval as eval_cli
from pyseg.cli import predict as predict_cli
from pyseg.cli import train as train_cli
from pyseg.data import synthetic
from pyseg.data.datasets import read_mask
from pyseg.metrics import ConfusionMatrix
from pyseg.models import create_model, get_config

ROOT = Path(__file__).resolve().parents[1]


def test_hyperseg_tiny_config():
    cfg = get_config("hyperseg-tiny")
    assert cfg["num_classes"] == len(synthetic.SYNTHETIC_CLASSES) and cfg["public_params"] is None
    m = create_model("hyperseg-tiny").eval()
    assert [(b.in_channels, b.out_channels, b.kernel_size) for b in m.decoder] == [
        (162, 32, 1), (82, 16, 1), (34, 16, 1), (34, 8, 3), (18, 4, 3)]
    assert m.input_multiple == 64 and m.output_stride == 2
    with torch.no_grad():
        assert m(torch.randn(1, 3, 64, 128)).shape == (1, 4, 64, 128)


def _majority_miou(root: Path) -> float:
    """mIoU of always predicting the most frequent training class, on the val split."""
    counts = np.zeros(256, np.int64)
    for f in sorted((root / "masks/train").glob("*.png")):
        counts += np.bincount(read_mask(f).ravel(), minlength=256)
    majority = int(counts[:4].argmax())
    cm = ConfusionMatrix(4)
    for f in sorted((root / "masks/val").glob("*.png")):
        t = torch.from_numpy(read_mask(f).astype(np.int64))
        cm.update(torch.full_like(t, majority), t)
    return cm.compute()["miou"]


def _readme_demo():
    """The README demo's commands as argv lists (``&&``-joined lines, backslash continuations), verbatim."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from demo_seeds import readme_commands
    finally:
        sys.path.pop(0)
    block = readme_commands()
    return block, [shlex.split(part) for part in block.replace("\\\n", " ").split("&&") if part.strip()]


# the README demo, scaled down for the test suite: only these values change
_SCALE_DOWN = {"--num-train": "48", "--num-val": "8", "--size": "64x128", "--crop-size": "64x128", "--epochs": "16",
               "--val-every": "4"}


def _scaled(argv, tmp_path):
    out = []
    for i, a in enumerate(argv):
        prev = argv[i - 1] if i else ""
        if prev in _SCALE_DOWN:
            a = _SCALE_DOWN[prev]
        elif a.startswith(("data/", "runs/")) or a == "pred":
            a = str(tmp_path / a)
        out.append(a)
    return out


@pytest.mark.slow
def test_demo_generate_train_eval_predict(tmp_path, capsys):
    """The README chain with its own flags (sizes scaled down), through the console entry points: each exits 0."""
    _, cmds = _readme_demo()
    assert [c[:3] if c[0] == "python" else c[:1] for c in cmds] == [
        ["python", "-m", "pyseg.data.synthetic"], ["pyseg-train"], ["pyseg-eval"], ["pyseg-predict"]]
    gen, train, ev, pred = (_scaled(c, tmp_path) for c in cmds)
    synthetic.main(gen[3:])
    data = Path(gen[3])
    assert train_cli.main(train[1:] + ["--progress", "log"]) == 0
    out = Path(train[train.index("--output-dir") + 1])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["type"] == "train"]
    vals = [r for r in records if r["type"] == "val"]
    assert len(losses) == 16 and [v["epoch"] for v in vals] == [4, 8, 12, 16]
    assert losses[-1] < 0.75 * losses[0], losses
    best = max(v["miou"] for v in vals)
    baseline = _majority_miou(data)
    assert 0.1 < baseline < 0.3  # background is the majority: its IoU = its share, the other classes 0
    assert best > baseline + 0.05, (best, baseline)
    printed = capsys.readouterr()
    assert "\r" not in printed.out + printed.err
    assert json.loads(printed.out.splitlines()[-1]) == {"best_miou": best, "epochs_done": 16}

    # the same command again (stopped after 4 epochs): the same trajectory, bit for bit
    again = Path(str(out) + "_again")
    assert train_cli.main(train[1:] + ["--progress", "none", "--output-dir", str(again),
                                       "--stop-after-epochs", "4"]) == 0
    rerun = [json.loads(line) for line in (again / "metrics.jsonl").read_text().splitlines()]
    assert [r for r in rerun if r["type"] != "train"] == [r for r in records if r["type"] != "train" and
                                                          r["epoch"] <= 4]
    capsys.readouterr()

    assert eval_cli.main(ev[1:]) == 0
    table = capsys.readouterr().out
    printed_miou = re.search(r"^mIoU\s+([0-9.]+)$", table, re.M)
    assert "triangle" in table and printed_miou and float(printed_miou.group(1)) == round(100 * best, 2), table
    res = eval_cli.run(ev[1:] + ["--progress", "none"])
    assert res["miou"] == pytest.approx(best, abs=1e-12)

    assert predict_cli.main(pred[1:] + ["--save-labels"]) == 0
    pred_dir = Path(pred[pred.index("--output") + 1])
    assert len(list(pred_dir.glob("*.png"))) == 3 * 8
    labels = np.array(Image.open(pred_dir / "000000_labels.png"))
    assert labels.shape == (64, 128) and labels.max() < 4
    assert np.array(Image.open(pred_dir / "000000_overlay.png")).shape == (64, 128, 3)
    # the written labels agree with the masks about as well as the evaluation says
    acc = np.mean([(np.array(Image.open(pred_dir / f"{i:06d}_labels.png")) ==
                    read_mask(data / f"masks/val/{i:06d}.png")).mean() for i in range(8)])
    assert acc == pytest.approx(res["pixel_acc"], abs=1e-3)


RESULTS = ROOT / "benchmarks/results/2026-12-01-cpu"


def test_readme_demo_figures_match_the_recorded_runs():
    """The README's demo figures are those of benchmarks/demo_seeds.py's fresh runs of the README's commands, and
    every seed clears the README's stated floor."""
    block, _ = _readme_demo()
    rec = json.loads((RESULTS / "demo_seeds.json").read_text())
    assert rec["commands"] == block, "the README demo commands changed since the recorded runs: rerun " \
                                     "benchmarks/demo_seeds.py and update the README figures"
    assert rec["seeds"] == [0, 1, 2]
    assert all(r["exit_status"] == 0 for r in rec["runs"])
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("<!-- demo-commands -->"):readme.index("## Backends per op")]
    m = re.search(r"val mIoU (0\.\d+) \(range (0\.\d+)[^0-9]+(0\.\d+)\)", section)
    assert m, "README: no 'val mIoU M (range A-B)' sentence in the demo section"
    assert [float(v) for v in m.groups()] == [round(rec["miou_mean"], 3), round(rec["miou_min"], 3),
                                             round(rec["miou_max"], 3)]
    floor = re.search(r"floor of (0\.\d+)", section)
    assert floor, "README: no 'floor of F' in the demo section"
    assert all(r["miou"] >= float(floor.group(1)) for r in rec["runs"]), (floor.group(1), rec["runs"])
    for r in rec["runs"]:
        assert (RESULTS / f"demo_seed{r['seed']}.txt").is_file()


def test_threads_option():
    from argparse import Namespace

    from pyseg.cli._common import apply_threads

    before = torch.get_num_threads()
    try:
        apply_threads(Namespace(threads=1))
        assert torch.get_num_threads() == 1
        apply_threads(Namespace(threads=None))  # not given: unchanged
        assert torch.get_num_threads() == 1
        with pytest.raises(ValueError, match="--threads must be >= 1"):
            apply_threads(Namespace(threads=0))
        assert train_cli.parse_args(["--model", "m", "--dataset", "folder", "--data-root", "d", "--output-dir", "o",
                                     "--threads", "2"]).threads == 2
    finally:
        torch.set_num_threads(before)
