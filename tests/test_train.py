"""Training / evaluation / prediction commands end to end on generated data with test-only tiny models."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pyseg.cli import eval as eval_cli
from pyseg.cli import predict as predict_cli
from pyseg.cli import train as train_cli
from pyseg.data import DatasetError, get_palette
from pyseg.data.synthetic import generate
from pyseg.engine import apply_freeze, poly_lambda
from pyseg.engine.checkpoint import read_metadata

import tiny_models  # noqa: F401  (registers test-tiny, test-tiny-scales)

ROOT = Path(__file__).resolve().parents[1]
TINY = str(Path(__file__).with_name("tiny_models.py"))


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """4-class generated data in the generic folder layout: 32 train, 7 val (odd: no even DDP split) 64×64."""
    root = tmp_path_factory.mktemp("synth")
    generate(root, num_train=32, num_val=7, size=(64, 64), seed=0, layout="folder")
    return root


def _train_args(data, out, *extra, epochs=2, model="test-tiny"):
    return ["--import", TINY, "--model", model, "--dataset", "folder", "--data-root", str(data),
            "--output-dir", str(out), "--epochs", str(epochs), "--batch-size", "4", "--workers", "0",
            "--no-progress", "--lr", "0.02", "--bootstrap-k", "1024", "--log-every", "1", "--scale-p", "0", *extra]


def _records(out, kind):
    return [r for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


@pytest.mark.slow
def test_training_decreases_loss_and_reaches_miou(synth, tmp_path):
    out = tmp_path / "run"
    summary = train_cli.run(_train_args(synth, out, "--scale-p", "0", "--val-every", "4", "--model-arg", "width=24",
                                         epochs=8))
    losses = [r["loss"] for r in _records(out, "train")]
    assert len(losses) == 8
    assert losses[-1] < 0.5 * losses[0], losses
    vals = _records(out, "val")
    assert [v["epoch"] for v in vals] == [4, 8]
    assert summary["best_miou"] >= 0.6, summary
    assert summary["best_miou"] == max(v["miou"] for v in vals)
    # best checkpoint = the best validation, and it evaluates to the same mIoU through pyseg-eval
    meta = read_metadata(out / "best.safetensors")
    assert meta["model"] == "test-tiny" and meta["num_classes"] == 4 and meta["model_kwargs"] == {"width": 24}
    assert meta["classes"] == ["background", "circle", "square", "triangle"]
    res = eval_cli.run(["--import", TINY, "--checkpoint", str(out / "best.safetensors"), "--dataset", "folder",
                         "--data-root", str(synth), "--workers", "0", "--no-progress"])
    assert res["miou"] == pytest.approx(summary["best_miou"], abs=1e-12)
    # no temporary files left behind by the atomic writes
    assert sorted(p.name for p in out.iterdir()) == ["best.safetensors", "best.state.pt", "last.safetensors",
                                                       "last.state.pt", "metrics.jsonl"]


@pytest.mark.slow
def test_resume_matches_uninterrupted_run(synth, tmp_path):
    # augmentation on (random scale, crop, flip, jitter, noise), so the restored RNG state matters
    aug = ["--crop-size", "32x32", "--scale-range", "0.5", "1.5", "--scale-p", "0.5", "--color-jitter", "0.2",
           "--noise-std", "0.02", "--val-every", "2", "--loss", "bootstrap"]
    a, b = tmp_path / "a", tmp_path / "b"
    train_cli.run(_train_args(synth, a, *aug, epochs=3))
    s1 = train_cli.run(_train_args(synth, b, *aug, "--stop-after-epochs", "2", epochs=3))
    assert s1["epochs_done"] == 2 and read_metadata(b / "last.safetensors")["epoch"] == 2
    s2 = train_cli.run(_train_args(synth, b, *aug, "--resume", "auto", epochs=3))
    assert s2["epochs_done"] == 3 and s2["step"] == 3 * 8
    wa, wb = load_file(a / "last.safetensors"), load_file(b / "last.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-6, atol=1e-7, msg=k)
    la, lb = _records(a, "train"), _records(b, "train")
    assert [r["loss"] for r in la] == pytest.approx([r["loss"] for r in lb], rel=1e-6)
    assert _records(a, "val")[-1]["miou"] == pytest.approx(_records(b, "val")[-1]["miou"], abs=1e-9)
    sa, sb = torch.load(a / "last.state.pt", weights_only=False), torch.load(b / "last.state.pt", weights_only=False)
    assert sa["scheduler"]["last_epoch"] == sb["scheduler"]["last_epoch"] == 24
    assert sa["best_metric"] == pytest.approx(sb["best_metric"])


def test_resume_errors(synth, tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        train_cli.run(_train_args(synth, tmp_path / "x", "--resume", str(tmp_path / "nope.safetensors")))
    out = tmp_path / "r"
    train_cli.run(_train_args(synth, out, "--scale-p", "0", "--val-every", "0", epochs=1))
    # a state file from another step than the weights is detected
    st = torch.load(out / "last.state.pt", weights_only=False)
    st["step"] += 1
    torch.save(st, out / "last.state.pt")
    with pytest.raises(RuntimeError, match="checkpoint mismatch"):
        train_cli.run(_train_args(synth, out, "--resume", str(out), epochs=2))


def test_freeze_prefix(synth, tmp_path):
    out = tmp_path / "f"
    train_cli.run(_train_args(synth, out, "--freeze", "trunk", "--scale-p", "0", "--val-every", "0",
                               "--init", str(_init_weights(tmp_path)), epochs=1))
    init = load_file(tmp_path / "init.safetensors")
    after = load_file(out / "last.safetensors")
    for k in init:
        if k.startswith("trunk."):
            # frozen: weights unchanged and BN statistics not updated (module kept in eval mode)
            assert torch.equal(init[k], after[k]), k
        elif k.startswith("head."):
            assert not torch.equal(init[k], after[k]), k
    with pytest.raises(ValueError, match=r"--freeze prefix 'trunkk' matches no parameter.*trunk, head"):
        train_cli.run(_train_args(synth, tmp_path / "g", "--freeze", "trunkk", epochs=1))


def _init_weights(tmp_path):
    from pyseg.engine.checkpoint import save_weights
    from pyseg.models import create_model

    torch.manual_seed(3)
    m = create_model("test-tiny", num_classes=4)
    path = tmp_path / "init.safetensors"
    save_weights(m, path, {"model": "test-tiny", "num_classes": 4})
    return path


def test_apply_freeze_and_poly_lambda():
    m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    assert apply_freeze(m, ["0"]) == ["0"]
    assert not m[0].weight.requires_grad and m[1].weight.requires_grad
    f = poly_lambda(100, 0.9)
    assert f(0) == 1.0 and f(100) == 0.0 and f(50) == pytest.approx(0.5 ** 0.9)
    w = poly_lambda(100, 0.9, warmup_steps=10)
    assert w(0) == pytest.approx(0.1) and w(9) == 1.0 and w(10) == pytest.approx(0.9 ** 0.9)


def test_lr_is_poly_per_step(synth, tmp_path):
    out = tmp_path / "lr"
    train_cli.run(_train_args(synth, out, "--scale-p", "0", "--val-every", "0", "--optimizer", "sgd", epochs=2))
    steps = _records(out, "step")
    assert [r["step"] for r in steps] == list(range(1, 17))
    for r in steps:
        assert r["lr"] == pytest.approx(0.02 * (1 - r["step"] / 16) ** 0.9, abs=1e-12)


def test_bf16_autocast_and_rmi_on_cpu(synth, tmp_path):
    out = tmp_path / "bf16"
    s = train_cli.run(_train_args(synth, out, "--amp", "bf16", "--loss", "rmi", "--scale-p", "0", epochs=1))
    assert np.isfinite(_records(out, "train")[0]["loss"]) and s["last_val"] is not None
    with pytest.raises(ValueError, match="fp16 autocast needs a CUDA device"):
        train_cli.run(_train_args(synth, tmp_path / "fp16", "--amp", "fp16", "--device", "cpu", epochs=1))
    with pytest.raises(ValueError, match="set --crop-size to batch"):
        train_cli.run(_train_args(synth, tmp_path / "nocrop", "--scale-p", "0.5", epochs=1))


def test_corrupt_image_and_missing_mask_errors(tmp_path):
    root = tmp_path / "bad"
    generate(root, num_train=4, num_val=1, size=(32, 32), layout="folder")
    bad = root / "images/train/000002.png"
    bad.write_bytes(bad.read_bytes()[:60])
    with pytest.raises(DatasetError, match=r"cannot read image file .*000002\.png"):
        train_cli.run(_train_args(root, tmp_path / "o1", "--batch-size", "1", epochs=1))
    os.remove(root / "masks/train/000001.png")
    with pytest.raises(DatasetError, match=r"mask file not found: .*masks/train/000001\.png"):
        train_cli.run(_train_args(root, tmp_path / "o2", epochs=1))


def test_eval_tta_scales_and_predict(synth, tmp_path, capsys):
    out = tmp_path / "m"
    train_cli.run(_train_args(synth, out, "--scale-p", "0", "--val-every", "0", epochs=1, model="test-tiny-scales"))
    ck = str(out / "last.safetensors")
    base = ["--import", TINY, "--checkpoint", ck, "--dataset", "folder", "--data-root", str(synth), "--workers", "0",
            "--no-progress"]
    plain = eval_cli.run(base + ["--json", str(tmp_path / "r.json")])
    table = capsys.readouterr().out
    assert "triangle" in table and "mIoU" in table
    assert json.loads((tmp_path / "r.json").read_text())["miou"] == pytest.approx(plain["miou"])
    flip = eval_cli.run(base + ["--flip"])
    assert flip["pixels"] == plain["pixels"]
    # the model exposes set_scales: it receives the list and runs once (same result as a plain run)
    native = eval_cli.run(base + ["--scales", "0.5,1.0"])
    assert native["miou"] == pytest.approx(plain["miou"])
    # generic multi-scale averaging for a model without set_scales: different from the plain result
    out2 = tmp_path / "m2"
    train_cli.run(_train_args(synth, out2, "--scale-p", "0", "--val-every", "0", epochs=1))
    base2 = [a if a != ck else str(out2 / "last.safetensors") for a in base]
    p2 = eval_cli.run(base2)
    ms = eval_cli.run(base2 + ["--scales", "0.75,1.0,1.25", "--flip"])
    assert ms["pixels"] == p2["pixels"] and ms["iou"] != p2["iou"]

    pred = tmp_path / "pred"
    files = predict_cli.run(["--import", TINY, "--checkpoint", ck, "--input", str(synth / "images/val"), "--output",
                              str(pred), "--save-labels", "--size-divisor", "16"])
    assert len(files) == 3 * 7
    labels = np.array(Image.open(pred / "000000_labels.png"))
    colour = np.array(Image.open(pred / "000000_mask.png"))
    overlay = np.array(Image.open(pred / "000000_overlay.png"))
    img = np.array(Image.open(synth / "images/val/000000.png"))
    assert labels.shape == (64, 64) and labels.max() < 4
    assert np.array_equal(colour, get_palette("cityscapes", 4)[labels])
    assert np.abs(overlay.astype(int) - (img.astype(int) + colour.astype(int)) / 2).max() <= 1
    single = predict_cli.run(["--import", TINY, "--checkpoint", ck, "--input", str(synth / "images/val/000003.png"),
                               "--output", str(tmp_path / "one"), "--palette", "voc"])
    assert [p.name for p in single] == ["000003_mask.png", "000003_overlay.png"]


def _torchrun(args, nproc=2, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    cmd = [torchrun, "--standalone", "--nproc_per_node", str(nproc), "-m", *args]
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


@pytest.mark.slow
def test_torchrun_two_cpu_processes_match_one(synth, tmp_path):
    # no BN (per-rank batch statistics would differ) and no augmentation: 2 ranks × batch 2 see exactly the
    # samples of 1 process × batch 4 and their averaged gradients equal the single process's
    common = ["--model-arg", "norm='none'", "--hflip", "0", "--loss", "ce", "--val-every", "1"]
    one = tmp_path / "one"
    train_cli.run(_train_args(synth, one, *common, epochs=1))
    two = tmp_path / "two"
    args = _train_args(synth, two, *common, epochs=1)
    args[args.index("--batch-size") + 1] = "2"
    r = _torchrun(["pyseg.train", *args])
    assert "world size 2" in r.stdout and r.stdout.count("val mIoU") == 1  # rank 0 prints
    w1, w2 = load_file(one / "last.safetensors"), load_file(two / "last.safetensors")
    for k in w1:
        torch.testing.assert_close(w1[k], w2[k], rtol=1e-4, atol=1e-5, msg=k)
    l1, l2 = _records(one, "train"), _records(two, "train")
    assert [x["loss"] for x in l1] == pytest.approx([x["loss"] for x in l2], rel=1e-4)
    v1, v2 = _records(one, "val"), _records(two, "val")
    assert v2[-1]["pixels"] == 7 * 64 * 64  # every val image exactly once over both ranks (7 is odd)
    assert v1[-1]["miou"] == pytest.approx(v2[-1]["miou"], abs=2e-3)
    # the 2-process validation (sharded, all-reduced) equals a 1-process evaluation of the same weights
    single = eval_cli.run(["--import", TINY, "--checkpoint", str(two / "last.safetensors"), "--dataset", "folder",
                            "--data-root", str(synth), "--workers", "0", "--no-progress"])
    assert single["pixels"] == v2[-1]["pixels"]
    assert single["miou"] == pytest.approx(v2[-1]["miou"], abs=1e-12)
    assert single["iou"] == pytest.approx(v2[-1]["iou"], abs=1e-12)

