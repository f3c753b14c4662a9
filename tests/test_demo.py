"""The README demo, scaled down: generated data -> pyseg-train (hyperseg-tiny) -> pyseg-eval -> pyseg-predict,
through the commands' entry points (the functions behind ``pyseg-train`` etc.)."""
import json
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


@pytest.mark.slow
def test_demo_generate_train_eval_predict(tmp_path, capsys):
    data, out, pred = tmp_path / "synth", tmp_path / "run", tmp_path / "pred"
    synthetic.main([str(data), "--layout", "folder", "--num-train", "48", "--num-val", "8", "--size", "64x128"])
    # one thread: the test's cost stays the same on a crowded CI machine (no oversubscribed thread pool)
    common = ["--dataset", "folder", "--data-root", str(data), "--workers", "0", "--no-progress", "--threads", "1",
              "--size-divisor", "64"]
    summary = train_cli.run(["--model", "hyperseg-tiny", *common, "--output-dir", str(out), "--epochs", "16",
                              "--batch-size", "8", "--lr", "2e-2", "--loss", "ce", "--scale-p", "0",
                              "--val-every", "4"])
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["type"] == "train"]
    assert len(losses) == 16
    assert losses[-1] < 0.6 * losses[0], losses
    baseline = _majority_miou(data)
    assert 0.1 < baseline < 0.3  # background is the majority: its IoU = its share, the other classes 0
    assert summary["best_miou"] > baseline + 0.08, (summary["best_miou"], baseline)

    res = eval_cli.run(["--checkpoint", str(out / "best.safetensors"), *common, "--json", str(tmp_path / "e.json")])
    assert res["miou"] == pytest.approx(summary["best_miou"], abs=1e-9)
    assert "triangle" in capsys.readouterr().out

    files = predict_cli.run(["--checkpoint", str(out / "best.safetensors"), "--input", str(data / "images/val"),
                              "--output", str(pred), "--size-divisor", "64", "--threads", "1", "--save-labels",
                              "--palette", "random"])
    assert len(files) == 3 * 8 and all(f.is_file() for f in files)
    labels = np.array(Image.open(pred / "000000_labels.png"))
    assert labels.shape == (64, 128) and labels.max() < 4
    assert np.array(Image.open(pred / "000000_overlay.png")).shape == (64, 128, 3)
    # the written labels agree with the masks about as well as the evaluation says
    acc = np.mean([(np.array(Image.open(pred / f"{i:06d}_labels.png")) == read_mask(data / f"masks/val/{i:06d}.png"))
                   .mean() for i in range(8)])
    assert acc == pytest.approx(res["pixel_acc"], abs=1e-3)


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
