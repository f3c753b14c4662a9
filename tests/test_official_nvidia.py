"""NVIDIA HMSA checkpoints (mscale.DeepV3R50, ocrnet.HRNet_Mscale) and pyseg's layouts of them.

NVIDIA's code is not needed: tests/data/nvidia_*.json are key -> shape manifests of checkpoints saved by their
training code (generated once; README "NVIDIA HMSA checkpoints" says how to repeat that and the numerical
comparison against their code)."""
import json
import math
import os

import pytest
import torch

from pyseg.models import create_model
from pyseg.models import nvidia_official as nv
from pyseg.models import from_official
from pyseg.models.official import CheckpointMismatchError, UnsupportedArchError

DATA = os.path.join(os.path.dirname(__file__), "data")
MANIFESTS = {"mscale.DeepV3R50": "nvidia_mscale.DeepV3R50.json",
             "ocrnet.HRNet_Mscale": "nvidia_ocrnet.HRNet_Mscale.json"}
PARAMS = {"mscale.DeepV3R50": 41_642_560, "ocrnet.HRNet_Mscale": 72_143_430}


def _manifest(arch):
    with open(os.path.join(DATA, MANIFESTS[arch])) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return {arch: create_model(name, num_classes=19) for arch, name in nv.ARCHS.items()}


@pytest.mark.parametrize("arch", sorted(MANIFESTS))
def test_manifest_maps_one_to_one(models, arch):
    man = _manifest(arch)
    assert man["arch"] == arch and man["num_classes"] == 19 and man["parameters"] == PARAMS[arch]
    model = models[arch]
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert sum(p.numel() for p in model.parameters()) == PARAMS[arch]
    mapped = {}
    for key, shape in man["state_dict"].items():
        assert key.startswith("module.")
        ours = nv.to_pyseg_key(arch, key[len("module."):])
        assert ours is not None, key
        assert ours not in mapped, f"{key} and {mapped.get(ours)} map to {ours}"
        assert own.get(ours) == tuple(shape), (key, ours, shape, own.get(ours))
        mapped[ours] = key
        assert nv.to_nvidia_key(arch, ours) == key[len("module."):]
    assert set(mapped) == set(own)


def _save_their_way(path, arch, sd, num_classes=19, **extra):
    torch.save({"epoch": 7, "arch": arch, "num_classes": num_classes, "state_dict": sd,
                "optimizer": {"state": {}, "param_groups": [{"lr": 0.01, "params": [0, 1]}]}, "mean_iu": 0.5,
                "command": f"train.py --arch {arch}", **extra}, path)


@pytest.mark.parametrize("arch", sorted(MANIFESTS))
def test_round_trip(models, arch, tmp_path):
    model = models[arch]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # distinct values everywhere, BN statistics included
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.uniform_(0.1, 1.0, generator=g)
    arch2, sd = nv.to_nvidia_state_dict(model)
    assert arch2 == arch
    assert {k: list(v.shape) for k, v in sd.items()} == _manifest(arch)["state_dict"]
    if arch == "mscale.DeepV3R50":  # through a file and the dispatcher
        path = tmp_path / "ckpt.pth"
        _save_their_way(path, arch, sd)
        loaded = from_official(path)
    else:  # the 290 MB HRNet file is skipped: the dispatcher hands the reader this dict, prefix removed
        loaded = nv.from_checkpoint({"epoch": 7, "arch": arch, "num_classes": 19,
                                     "state_dict": {k[len("module."):]: v for k, v in sd.items()}}).eval()
    assert type(loaded.model) is type(model.model) and not loaded.training
    assert loaded.checkpoint_info["epoch"] == 7 and loaded.checkpoint_info["arch"] == arch
    assert loaded.pyseg_config == {"model": nv.ARCHS[arch], "num_classes": 19, "model_kwargs": {}}
    want = model.state_dict()
    got = loaded.state_dict()
    assert set(got) == set(want)
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_bad_checkpoints(models, tmp_path):
    arch = "mscale.DeepV3R50"
    _, sd = nv.to_nvidia_state_dict(models[arch], prefix="")
    ok = {"arch": arch, "num_classes": 19, "state_dict": sd}
    # wrong class count: every class-dependent tensor is named, nothing loaded
    with pytest.raises(CheckpointMismatchError, match=r"mis-shaped 1: final\.6\.weight \(19, 256, 1, 1\)"):
        nv.from_checkpoint(dict(ok, num_classes=21), source="x")
    # a missing and an unexpected key, reported together
    bad = dict(sd)
    del bad["bot_fine.weight"]
    bad["aspp.project.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointMismatchError) as e:
        nv.from_checkpoint(dict(ok, state_dict=bad), source="x")
    assert e.value.missing == ["model.low_reduce.weight"] and e.value.unexpected == ["aspp.project.weight"]
    with pytest.raises(ValueError, match="num_classes must be a positive int"):
        nv.from_checkpoint(dict(ok, num_classes="19"), source="x")
    with pytest.raises(UnsupportedArchError, match="unsupported"):
        nv.from_checkpoint(dict(ok, arch="mscale.DeepV3W38"), source="x")
    # files: unsupported arch through the dispatcher; a pickle that would run code is refused
    path = tmp_path / "w38.pth"
    torch.save({"arch": "deepv3.DeepWV3Plus", "num_classes": 19, "state_dict": {"module.x": torch.zeros(1)}}, path)
    with pytest.raises(UnsupportedArchError, match="unsupported arch"):
        from_official(path)
    path = tmp_path / "code.pth"
    torch.save({"arch": arch, "num_classes": 19, "state_dict": {}, "optimizer": _Evil()}, path)
    with pytest.raises(ValueError, match="weights_only"):
        from_official(path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


# ---- the models themselves, on small trunks / inputs -------------------------------------------------
@pytest.fixture(scope="module")
def small_ocr():
    from pyseg.models.mscale import hmsa_ocrnet_hrnet

    torch.manual_seed(0)
    m = hmsa_ocrnet_hrnet(backbone="hrnet_w18_small", num_classes=5, mid_channels=32, key_channels=16,
                          attn_mid_channels=16)
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
    return m


def test_banded_heads_equal_whole_map(small_ocr):
    """Eval runs the OCR and attention heads in row bands: same fused logits as the whole-map heads, for odd
    sizes and band heights that do not divide the map."""
    m = small_ocr.eval()
    x = torch.randn(1, 3, 90, 124)
    m.set_scales((0.5, 1.0, 2.0))
    with torch.no_grad():
        m.model.head_band_rows = 0
        want = m(x)
        for band in (3, 7):
            m.model.head_band_rows = band
            torch.testing.assert_close(m(x), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    m.model.head_band_rows = 32


def test_nvidia_scale_sizes(small_ocr):
    # their ResizeX: floor(H * s)
    assert small_ocr.scaled_size((515, 1023), 0.5) == (257, 511)
    assert small_ocr.scaled_size((512, 1024), 2.0) == (1024, 2048)


def test_two_scale_training_outputs(small_ocr):
    m = small_ocr.train()
    m.supervised_scale_weight = 0.05
    x = torch.randn(2, 3, 64, 64)
    out = m(x)
    assert out["out"].shape == (2, 5, 64, 64)
    assert [w for w, _ in out["aux_terms"]] == [0.4, 0.05, 0.05]
    assert all(t.shape == (2, 5, 64, 64) for _, t in out["aux_terms"])
    target = torch.randint(0, 5, (2, 64, 64))
    loss = torch.nn.functional.cross_entropy(out["out"], target)
    for w, t in out["aux_terms"]:
        loss = loss + w * torch.nn.functional.cross_entropy(t, target)
    loss.backward()
    for name in ("attention.body.0.weight", "model.ocr.aux.3.weight", "model.ocr.classifier.weight"):
        assert dict(m.named_parameters())[name].grad.abs().sum() > 0, name
    with pytest.raises(ValueError, match="two-scale"):
        m(x, scales=(0.5, 1.0, 2.0))
    m.supervised_scale_weight = 0.0
    m.zero_grad()
    m.eval()


@pytest.mark.slow
def test_pyseg_train_two_scale_with_aux_losses(tmp_path):
    """pyseg-train on the HRNet-OCR HMSA model (small trunk): two-scale training with the OCR auxiliary and
    per-scale terms added to the loss, bf16 autocast, then validation through the fused multi-scale path."""
    from pyseg.cli import train as train_cli
    from pyseg.data.synthetic import generate

    data = tmp_path / "synth"
    generate(data, num_train=4, num_val=2, size=(64, 64), seed=0, layout="folder")
    out = tmp_path / "run"
    args = ["--model", "hmsa-ocrnet-hrnet-w48", "--dataset", "folder", "--data-root", str(data), "--output-dir",
            str(out), "--epochs", "1", "--batch-size", "2", "--workers", "0", "--no-progress", "--lr", "0.01",
            "--scale-p", "0", "--loss", "ce", "--amp", "bf16", "--model-arg", "backbone=hrnet_w18_small",
            "--model-arg", "mid_channels=16", "--model-arg", "key_channels=8", "--model-arg", "attn_mid_channels=8",
            "--model-arg", "supervised_scale_weight=0.05"]
    summary = train_cli.run(args)
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in recs if r["type"] == "train"]
    assert len(losses) == 1 and math.isfinite(losses[0]) and summary["last_val"] is not None
