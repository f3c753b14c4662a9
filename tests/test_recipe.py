"""The HMSA training recipe: staged freezing, the three-step recipe with resume, pseudo-labels, mixed sampling,
class-uniform sampling, multi-scale evaluation's memory, attention dumps and the commands' bad-input errors.

Runs on test-only tiny models (tests/tiny_models.py) and 64×64 generated data: about 30 s on one CPU core."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from pyseg.cli import eval as eval_cli
from pyseg.cli import predict as predict_cli
from pyseg.cli import train as train_cli
from pyseg.data import build_dataset, build_eval_transform, read_image
from pyseg.data.sampling import WeightedEpochSampler, class_presence, mixing_weights
from pyseg.data.synthetic import generate
from pyseg.data.transforms import IMAGENET_MEAN, IMAGENET_STD, build_train_transform
from pyseg.engine import evaluate
from pyseg.engine.checkpoint import read_metadata, save_weights
from pyseg.engine.memory import PeakMemory
from pyseg.engine.trainer import _set_train_mode, apply_stage, build_train_sampler, training_loss
from pyseg.losses import build_loss
from pyseg.models import create_model

import tiny_models  # noqa: F401  (registers test-tiny-hmsa)

TINY = str(Path(__file__).with_name("tiny_models.py"))


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate(root, num_train=16, num_val=4, num_test=4, size=(64, 64), seed=0, layout="folder")
    return root


def _groups(model):
    """Parameter names of the trunk, the segmentation head and the attention head, from the names alone."""
    names = [n for n, _ in model.named_parameters()]
    trunk = {n for n in names if n.startswith("model.trunk.")}
    attention = {n for n in names if n.startswith("attention.")}
    head = set(names) - trunk - attention
    assert trunk and attention and head
    return trunk, head, attention


# --- 1. staged freezing, checked by gradients

@pytest.mark.parametrize("name,kwargs", [
    ("test-tiny-hmsa", {}),
    ("hmsa-deeplabv3p-mobilenetv2", dict(backbone="mobilenetv2_050", aspp_channels=16, decoder_channels=16,
                                         low_level_channels=8, attn_mid_channels=8)),
])
def test_each_stage_trains_exactly_its_parameters(name, kwargs):
    torch.manual_seed(0)
    criterion = build_loss("ce", ignore_index=255, num_classes=4)
    x, mask = torch.randn(2, 3, 32, 32), torch.randint(0, 4, (2, 32, 32))
    expected = {1: ("trunk", "head"), 2: ("attention",), 3: ("trunk", "head")}
    model = create_model(name, num_classes=4, **kwargs)
    trunk, head, attention = _groups(model)
    for stage, trained in expected.items():
        for p in model.parameters():
            p.grad = None
        frozen_mods = apply_stage(model, stage)
        _set_train_mode(model, frozen_mods)
        out = model(x)
        assert isinstance(out, dict) == (stage == 1)  # stage 1: each scale's own logits, no attention
        training_loss(out, mask, criterion).backward()
        should = set().union(*({"trunk": trunk, "head": head, "attention": attention}[g] for g in trained))
        for n, p in model.named_parameters():
            if n in should:
                assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, (stage, n)
            else:
                assert not p.requires_grad and p.grad is None, (stage, n)
        # wholly frozen parts keep frozen BatchNorm statistics
        assert model.model.training == (stage != 2) and model.attention.training == (stage == 2)


def test_stage_needs_a_multiscale_model():
    with pytest.raises(ValueError, match="--stage needs a model with set_stage"):
        apply_stage(create_model("test-tiny", num_classes=4), 2)


# --- 2. the recipe: three steps, learning rates, freezing across steps, resume within and across steps

def _recipe_args(data, out, *extra):
    return ["--import", TINY, "--model", "test-tiny-hmsa", "--dataset", "folder", "--data-root", str(data),
            "--output-dir", str(out), "--recipe", "hmsa-staged", "--step-epochs", "1", "2", "1", "--batch-size", "4",
            "--workers", "0", "--no-progress", "--loss", "ce", "--scale-p", "0", "--crop-size", "32x32",
            "--log-every", "1", "--val-scales", "0.5,1", "--contrast", "0.2", "--noise-std", "0.02", *extra]


def _steps(out):
    return [r for r in map(json.loads, Path(out).read_text().splitlines()) if r["type"] == "step"]


def test_recipe_steps_and_resume(synth, tmp_path):
    full = tmp_path / "full"
    rec = train_cli.run(_recipe_args(synth, full))
    assert rec["finished"] and [s["lr"] for s in rec["steps"]] == [1e-3, 5e-4, 1e-4]
    assert json.loads((full / "recipe.json").read_text()) == rec
    for i, s in enumerate(rec["steps"], 1):
        assert s["done"] and s["weights"] == f"step{i}/best.safetensors" and s["best_miou"] is not None
        assert read_metadata(full / s["weights"])["stage"] == i
        state = torch.load(full / f"step{i}/last.state.pt", weights_only=False)
        assert state["args"]["val_scales"] == ([1.0] if i == 1 else [0.5, 1.0])  # step 1: no attention yet
        # poly decay of power 0.8 from each step's learning rate, stepped every iteration
        steps = _steps(full / f"step{i}" / "metrics.jsonl")
        total = len(steps)
        assert total == 4 * s["epochs"]
        for r in steps:
            assert r["lr"] == pytest.approx(s["lr"] * (1 - r["step"] / total) ** 0.8, rel=1e-9, abs=1e-15)
    w = [load_file(full / f"step{i}/best.safetensors") for i in (1, 2, 3)]
    assert load_file(full / "best.safetensors").keys() == w[2].keys()
    assert all(torch.equal(load_file(full / "best.safetensors")[k], w[2][k]) for k in w[2])
    # step 2 changed only the attention head (BatchNorm statistics of the frozen model included); step 3 only the rest
    for k in w[0]:
        changed12, changed23 = not torch.equal(w[0][k], w[1][k]), not torch.equal(w[1][k], w[2][k])
        if k.startswith("attention.") and not k.endswith("num_batches_tracked"):
            assert changed12 and not changed23, k
        elif k.startswith("model.") and not k.endswith("num_batches_tracked"):
            assert changed23 and not changed12, k

    # interrupted inside step 2 (after its first epoch), resumed: the same weights at the end
    part = tmp_path / "part"
    rec = train_cli.run(_recipe_args(synth, part, "--stop-after-epochs", "1"))
    assert not rec["finished"] and [s["done"] for s in rec["steps"]] == [True, False, False]
    assert not (part / "step3").exists()
    rec = train_cli.run(_recipe_args(synth, part, "--resume", "auto"))
    assert rec["finished"]
    for i in (1, 2, 3):
        a, b = load_file(full / f"step{i}/last.safetensors"), load_file(part / f"step{i}/last.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a), i
    # and a finished recipe resumed again does nothing
    assert train_cli.run(_recipe_args(synth, part, "--resume", "auto"))["finished"]


# --- 3. pseudo-labels

def _save_random_hmsa(path, num_classes=4):
    torch.manual_seed(3)
    model = create_model("test-tiny-hmsa", num_classes=num_classes)
    model.eval()
    for m in model.modules():  # non-trivial BatchNorm statistics so that confidences spread
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.2, 2.0)
    save_weights(model, path, {"model": "test-tiny-hmsa", "num_classes": num_classes, "model_kwargs": {},
                               "classes": ["background", "circle", "square", "triangle"]})
    return model


def _confidence(model, image_path, scales, flip):
    """Top softmax probability and its class, computed here: the reference fusion, flips averaged by hand."""
    img = torch.from_numpy(read_image(image_path)).permute(2, 0, 1)[None].float() / 255
    x = (img - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    model.eval()
    model.backend = "reference"
    with torch.no_grad():
        p = model(x, scales=scales).softmax(1)
        if flip:
            p = (p + model(x.flip(-1), scales=scales).softmax(1).flip(-1)) / 2
    conf, cls = p[0].max(0)
    return conf.numpy(), cls.numpy()


def test_pseudo_labels_hold_255_exactly_below_threshold(synth, tmp_path):
    ck = tmp_path / "m.safetensors"
    model = _save_random_hmsa(ck)
    images = sorted((synth / "images/test").glob("*.png"))
    conf0, _ = _confidence(model, images[0], (0.5, 1.0, 2.0), True)
    thr = float(np.quantile(conf0, 0.4))  # a threshold inside the confidences: both outcomes occur
    out = tmp_path / "pseudo"
    written = predict_cli.run(["--import", TINY, "--checkpoint", str(ck), "--input", str(synth / "images/test"),
                               "--pseudo-labels", str(out), "--threshold", repr(thr), "--scales", "0.5,1,2", "--flip",
                               "--no-progress"])
    assert len(written) == 2 * len(images) + 1
    summary = json.loads((out / "pseudo_labels.json").read_text())
    assert summary["threshold"] == thr and summary["scales"] == [0.5, 1.0, 2.0] and summary["flip"]
    assert (out / "classes.txt").read_text().split() == ["background", "circle", "square", "triangle"]
    labelled = 0
    for img_path, rec in zip(images, summary["images"]):
        conf, cls = _confidence(model, img_path, (0.5, 1.0, 2.0), True)
        got = np.array(Image.open(out / "masks" / f"{img_path.stem}.png"))
        sure = np.abs(conf - thr) > 1e-5  # float rounding can only flip pixels at the threshold itself
        expected = np.where(conf >= thr, cls, 255)
        assert sure.mean() > 0.99 and np.array_equal(got[sure], expected[sure]), img_path
        assert 0 < (got == 255).mean() < 1
        assert rec["image"] == img_path.name and rec["labelled_fraction"] == pytest.approx((got != 255).mean())
        assert sum(rec["class_fraction"].values()) == pytest.approx(rec["labelled_fraction"])
        assert (out / "images" / img_path.name).read_bytes() == img_path.read_bytes()
        labelled += (got != 255).sum()
    total = sum(c["predicted_pixels"] for c in summary["classes"])
    assert total == 64 * 64 * len(images) and sum(c["labelled_pixels"] for c in summary["classes"]) == labelled
    # the folder is a training set for --extra-data
    ds = build_dataset("folder", out, None)
    assert len(ds) == len(images) and ds.num_classes == 4


# --- 4. mixing labelled and pseudo-labelled data; class-uniform sampling

def test_mixed_sampler_draws_each_source_at_its_weight(synth):
    tf = build_eval_transform()
    train = build_dataset("folder", synth, "train", tf)
    extra = build_dataset("folder", synth, "test", tf)
    dataset, sampler = build_train_sampler(train, extra, extra_weight=0.3, seed=0)
    assert len(sampler) == len(train) + len(extra) == 20
    counts = np.zeros(len(dataset), np.int64)
    for epoch in range(300):  # 6000 draws, fixed seeds: the binomial sd of the share is 0.006
        sampler.set_epoch(epoch)
        counts += np.bincount(list(sampler), minlength=len(dataset))
    share = counts[len(train):].sum() / counts.sum()
    assert abs(share - 0.3) < 0.03, share
    # uniform within each source (expected 262.5 and 450 per sample)
    assert counts[:16].min() > 180 and counts[:16].max() < 350 and counts[16:].min() > 350 and counts[16:].max() < 560
    # the same epoch draws the same samples (resume), another epoch others
    sampler.set_epoch(7)
    a = list(sampler)
    sampler.set_epoch(7)
    assert list(sampler) == a
    sampler.set_epoch(8)
    assert list(sampler) != a
    # two processes split one epoch's draws between them
    ranks = [WeightedEpochSampler(sampler.weights, 20, seed=0, num_replicas=2, rank=r) for r in (0, 1)]
    for r in ranks:
        r.set_epoch(7)
    assert [i for pair in zip(*map(list, ranks)) for i in pair] == a
    # the loader yields the drawn samples, from both sets
    loader = torch.utils.data.DataLoader(dataset, batch_size=1, sampler=sampler)
    drawn = list(sampler)
    assert min(drawn) < 16 <= max(drawn)
    for i, (_, mask) in zip(drawn, loader):
        src, j = (train, i) if i < 16 else (extra, i - 16)
        assert torch.equal(mask[0], src[j][1])


def test_training_with_extra_data_and_class_uniform_sampling(synth, tmp_path, capsys):
    import shutil

    extra = tmp_path / "extra"
    for sub in ("images", "masks"):
        shutil.copytree(synth / sub / "test", extra / sub)
    shutil.copy(synth / "classes.txt", extra / "classes.txt")
    args = ["--import", TINY, "--model", "test-tiny", "--dataset", "folder", "--data-root", str(synth),
            "--output-dir", str(tmp_path / "run"), "--epochs", "1", "--batch-size", "4", "--workers", "0",
            "--no-progress", "--scale-p", "0", "--loss", "ce", "--val-split", "", "--extra-data", f"folder:{extra}",
            "--extra-weight", "0.25", "--class-uniform", "0.5"]
    summary = train_cli.run(args)
    assert summary["step"] == (16 + 4) // 4  # an epoch draws len(train) + len(extra) samples
    assert "16 train images + 4 extra (share 0.25)" in capsys.readouterr().out
    (extra / "classes.txt").write_text("background\ncircle\n")
    with pytest.raises(ValueError, match="has classes \\['background', 'circle'\\], the training set"):
        train_cli.run(args)


def test_class_uniform_weights():
    # source of 4 images; class 2 only in image 3, class 0 in all, class 1 in images 0-1
    pres = np.array([[1, 1, 0], [1, 1, 0], [1, 0, 0], [1, 0, 1]], bool)
    w = mixing_weights([4], class_uniform=1.0, presence=[pres]).numpy()
    expected = np.array([1 / 4 + 1 / 2, 1 / 4 + 1 / 2, 1 / 4, 1 / 4 + 1]) / 3
    np.testing.assert_allclose(w, expected)
    w = mixing_weights([4, 2], [0.75, 0.25], class_uniform=0.5, presence=[pres, np.ones((2, 3), bool)]).numpy()
    np.testing.assert_allclose(w[:4], 0.75 * (0.5 / 4 + 0.5 * expected))
    np.testing.assert_allclose(w[4:], [0.125, 0.125])
    with pytest.raises(ValueError, match="needs the class presence"):
        mixing_weights([4], class_uniform=0.5)


def test_class_presence_reads_masks(synth):
    ds = build_dataset("folder", synth, "val")
    pres = class_presence(ds, 4)
    for i, (_, mask_path) in enumerate(ds.samples):
        m = np.array(Image.open(mask_path))
        assert list(pres[i]) == [bool((m == c).any()) for c in range(4)]


# --- 5. multi-scale evaluation: peak memory, labels through the fused path; attention maps

def test_multiscale_eval_memory_stays_bounded():
    torch.manual_seed(0)
    C, H, W = 64, 128, 256
    model = create_model("test-tiny-hmsa", num_classes=C).eval()
    x, mask = torch.randn(1, 3, H, W), torch.randint(0, C, (1, H, W))
    one_map = C * H * W * 4  # the fused logits at the input size, float32: 8 MiB (measured: 4.4 MiB used)
    bound = one_map  # stated bound: below one full-resolution logits map, for any number of scales
    res = evaluate(model, [(x, mask)], C, "cpu", scales=[0.5, 1.0, 2.0], progress="none", track_memory=True)
    assert res["memory_method"].startswith("tensor storages")
    assert 0 < res["peak_memory_mb"] * 2**20 < bound, res["peak_memory_mb"]
    # the fused labels equal the argmax of the fused logits
    with torch.no_grad():
        logits = model(x)
    ref = evaluate(model, [(x, logits.argmax(1))], C, "cpu", scales=[0.5, 1.0, 2.0], progress="none")
    assert ref["pixel_acc"] == 1.0
    # the measurement would see a path that materialises logits: the logits output, and the public method's
    # per-scale full-resolution logits (reference fusion) go far over the bound
    for backend, factor in (("auto", 1.0), ("reference", 5.0)):
        model.backend = backend
        with PeakMemory("cpu") as pm, torch.no_grad():
            model(x)
        assert pm.peak_bytes > factor * bound, (backend, pm.peak_mb)
    model.backend = "auto"
    # flip: two fused maps and their probabilities, still independent of the scales' sizes
    res = evaluate(model, [(x, mask)], C, "cpu", scales=[0.5, 1.0, 2.0], flip=True, progress="none",
                   track_memory=True)
    assert res["peak_memory_mb"] * 2**20 < 5 * bound


def test_dump_attention(tmp_path, synth):
    ck = tmp_path / "m.safetensors"
    model = _save_random_hmsa(ck)
    img = sorted((synth / "images/val").glob("*.png"))[0]
    predict_cli.run(["--import", TINY, "--checkpoint", str(ck), "--input", str(img), "--output", str(tmp_path / "o"),
                     "--scales", "0.5,1,2", "--dump-attention"])
    files = sorted(p.name for p in (tmp_path / "o").glob("*_attention_*.png"))
    assert files == [f"{img.stem}_attention_0.5.png", f"{img.stem}_attention_1.png"]  # the top's is unused
    x = torch.from_numpy(read_image(img)).permute(2, 0, 1)[None].float() / 255
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        _, attns, _ = model.eval()._per_scale(x, (0.5, 1.0, 2.0))
    a = torch.nn.functional.interpolate(attns[0], size=(64, 64), mode="bilinear", align_corners=False)[0, 0]
    got = np.array(Image.open(tmp_path / "o" / files[0])).astype(np.float64) / 255
    assert got.shape == (64, 64) and np.abs(got - a.numpy()).max() <= 0.5 / 255 + 1e-6


# --- 6. augmentations and bad inputs

def test_contrast_augmentation():
    torch.manual_seed(0)
    img = torch.linspace(0, 255, 64 * 64 * 3).reshape(3, 64, 64).to(torch.uint8)
    mask = torch.zeros(64, 64, dtype=torch.int64)
    t = build_train_transform(scale_p=0, hflip=0, contrast=0.5, mean=(0, 0, 0), std=(1, 1, 1))
    stds = {round(float(t(img, mask)[0].std()), 4) for _ in range(5)}
    assert len(stds) > 1  # the contrast changes from call to call
    with pytest.raises(ValueError, match="contrast must be < 1"):
        build_train_transform(contrast=1.0)
    with pytest.raises(ValueError, match="hflip is a probability"):
        build_train_transform(hflip=1.5)


def _train_argv(synth, out, *extra):
    return ["--import", TINY, "--model", "test-tiny-hmsa", "--dataset", "folder", "--data-root", str(synth),
            "--output-dir", str(out), "--epochs", "1", "--workers", "0", "--no-progress", "--scale-p", "0", *extra]


def test_bad_inputs(synth, tmp_path, capsys):
    def usage(main, argv, message):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "usage:" in err, err

    usage(train_cli.main, _train_argv(synth, tmp_path / "o", "--recipe", "hmsa-fast"),
          "argument --recipe: invalid choice: 'hmsa-fast'")
    usage(train_cli.main, _train_argv(synth, tmp_path / "o", "--extra-data", "pseudo"),
          "argument --extra-data: expected KIND:PATH with KIND one of")
    usage(train_cli.main, _train_argv(synth, tmp_path / "o", "--extra-data", "zip:pseudo"),
          "expected KIND:PATH")
    usage(train_cli.main, _train_argv(synth, tmp_path / "o", "--extra-weight", "0.3"),
          "--extra-weight needs --extra-data")
    usage(train_cli.main, _train_argv(synth, tmp_path / "o", "--extra-data", "folder:x", "--extra-weight", "1"),
          "argument --extra-weight: expected a number in (0, 1), got '1'")
    usage(train_cli.main, _train_argv(synth, tmp_path / "o", "--recipe", "hmsa-staged", "--stage", "2"),
          "--stage and --recipe exclude each other")
    usage(train_cli.main, _train_argv(synth, tmp_path / "o", "--recipe", "hmsa-staged", "--step-epochs", "1", "2"),
          "--step-epochs: --recipe hmsa-staged has 3 steps, got 2 values")
    for thr in ("0", "1.5", "-0.1", "high"):
        usage(predict_cli.main, ["--checkpoint", "x", "--input", "y", "--pseudo-labels", "z", "--threshold", thr],
              f"argument --threshold: expected a number in (0, 1], got '{thr}'")
    usage(predict_cli.main, ["--checkpoint", "x", "--input", "y"], "give --output")

    missing = tmp_path / "no_pseudo"
    assert train_cli.main(_train_argv(synth, tmp_path / "o", "--extra-data", f"folder:{missing}")) == 1
    assert capsys.readouterr().err == f"pyseg-train: error: --extra-data folder not found: {missing}\n"
    assert not (tmp_path / "o").exists()
    assert train_cli.main(_train_argv(synth, tmp_path / "o2", "--model", "test-tiny", "--stage", "2")) == 1
    assert "--stage needs a model with set_stage()" in capsys.readouterr().err


def test_readme_hmsa_demo_figures_match_the_raw_log():
    """The README's demo figures are those of the committed raw log, which ran the README's commands verbatim."""
    import sys

    root = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(root / "benchmarks"))
    try:
        from hmsa_recipe_demo import MARKER
        from demo_seeds import readme_commands
    finally:
        sys.path.pop(0)
    log = (root / "benchmarks/results/2026-12-01-cpu/hmsa_recipe_demo.txt").read_text()
    logged = "".join(line[4:] + "\n" for line in log.split("# commands:\n")[1].split("# output:\n")[0].splitlines())
    assert logged == readme_commands(marker=MARKER), "the README demo changed since the recorded run: rerun it"
    result = json.loads(log.splitlines()[-1][len("RESULT "):])
    assert result["exit_status"] == 0
    readme = (root / "README.md").read_text()
    section = readme[readme.index(MARKER):readme.index("### Training demo on generated data")]
    assert "benchmarks/results/2026-12-01-cpu/hmsa_recipe_demo.txt" in section
    for v in result["labelled"] + result["mixed"] + result["eval_miou"]:
        assert f"{v:.3f}" in section, v
    assert f"{result['pseudo_labelled_fraction']:.1%}" in section
    assert f"{result['wall_s'] / 60:.1f} min" in section
