"""Released HyperSeg checkpoints (pyseg.models.from_official): key manifests of the four released
configurations (generated once from the public code, tests/data/hyperseg_official_*.json), synthetic
checkpoints in the public format, bad files, and the public EfficientNet's static padding."""
import json
import os
import pathlib
import pickle

import pytest
import torch

from pyseg.models import from_official
from pyseg.models.backbones import static_same_padding
from pyseg.models.hyperseg import HyperSeg, image_coordinates
from pyseg.models.hyperseg_official import CONSTRUCTORS, hyperseg_kwargs, key_map
from pyseg.models.official import (CheckpointMismatchError, UnsupportedArchError, load_checkpoint, parse_arch,
                                   strip_prefix)

DATA = pathlib.Path(__file__).parent / "data"
MANIFESTS = sorted(DATA.glob("hyperseg_official_*.json"))

# small architectures in the public format (B0 trunk, narrow decoders) for fast round trips
V1_0 = ("hyperseg.models.hyperseg_v1_0.hyperseg_efficientnet('efficientnet-b0',pretrained=True,levels=2,"
        "out_feat_scale=[1.0,0.25,0.25,0.25,0.25],kernel_sizes=[1,1,1,3,3],level_channels=[16,8,8,8,8],"
        "expand_ratio=2,with_out_fc=False,decoder_dropout=None,weight_groups=[8,8,4,8,4],decoder_groups=1,"
        "inference_hflip=True,coords_res=[(64,128)],num_classes=5)")
UNIFY = ("hyperseg.models.hyperseg_v1_0_unify.hyperseg_efficientnet('efficientnet-b0',pretrained=False,levels=2,"
         "out_feat_scale=[1.0,0.166,0.2,0.25,0.4],kernel_sizes=[1,1,1,3,3],level_channels=[16,8,8,8,8],"
         "expand_ratio=2,weight_groups=[8,8,4,8,4],unify_level=4,num_classes=7)")
V0_1 = ("hyperseg.models.hyperseg_v0_1.hyperseg_efficientnet('efficientnet-b0',pretrained=True,levels=3,"
        "kernel_sizes=(1,1,3,3,3,3),expand_ratio=2,inference_hflip=True,with_out_fc=False,decoder_dropout=None,"
        "weight_groups=8,num_classes=3)")
SMALL = {"v1_0": (V1_0, (64, 128)), "v1_0_unify": (UNIFY, (64, 128)), "v0_1": (V0_1, (128, 128))}


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                if name.endswith("running_var"):
                    t.copy_(torch.rand(t.shape, generator=g) + 0.5)
                else:
                    t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return model


def _public_checkpoint(arch, seed=0, prefix=""):
    """A checkpoint as the public train.py saves it, made from a pyseg model's tensors."""
    model = _randomize(HyperSeg(**hyperseg_kwargs(arch)), seed).eval()
    sd = model.state_dict()
    out = {}
    for pub, ours in key_map(model, arch).items():
        if ours is None:  # cached coordinate grid
            h, w = (int(v) for v in pub[len("decoder.coord"):].split("_"))
            out[prefix + pub] = image_coordinates(torch.empty(1, 1, h, w)).clone()
        else:
            out[prefix + pub] = sd[ours].clone()
    ckpt = dict(epoch=3, state_dict=out, optimizer={"state": {}, "param_groups": [{"lr": 1e-3}]},
                scheduler={"last_epoch": 3}, best_iou=0.5, arch=arch)
    return ckpt, model


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.stem.replace("hyperseg_official_", ""))
def test_manifest_maps_one_to_one(manifest):
    """Every tensor of the released configuration maps onto exactly one pyseg tensor of the same shape."""
    man = json.loads(manifest.read_text())
    kw = hyperseg_kwargs(man["arch"])
    with torch.device("meta"):
        model = HyperSeg(**kw)
    km = key_map(model, man["arch"])
    assert sorted(km) == sorted(man["tensors"])
    own = model.state_dict()
    targets = [v for v in km.values() if v is not None]
    assert sorted(targets) == sorted(own)  # one-to-one onto the model
    for pub, ours in km.items():
        if ours is not None:
            assert tuple(own[ours].shape) == tuple(man["tensors"][pub]), pub
    params = sum(own[k].numel() for k, _ in model.named_parameters())
    public_params = sum(int(torch.tensor(man["tensors"][k]).prod()) for k in man["tensors"]
                        if not any(s in k for s in ("running_", "num_batches", "coord")))
    assert params == public_params
    assert kw["name"] in ("hyperseg-m", "hyperseg-s", "hyperseg-s-camvid", "hyperseg-l-voc")


def test_released_signal_slices():
    """v1_0 overlaps (every slice a prefix), unify and v0_1 are consecutive."""
    by_name = {p.stem: json.loads(p.read_text())["arch"] for p in MANIFESTS}
    m = hyperseg_kwargs(by_name["hyperseg_official_cityscapes_efficientnet_b1_hyperseg-m"])
    assert m["signal_slices"] == [(0, 416), (0, 224), (0, 128), (0, 192), (0, 320)]
    s = hyperseg_kwargs(by_name["hyperseg_official_cityscapes_efficientnet_b1_hyperseg-s"])
    assert s["signal_slices"] == [(0, 576), (576, 128), (704, 64), (768, 512)]
    voc = hyperseg_kwargs(by_name["hyperseg_official_vocsbd_efficientnet_b3_hyperseg-l"])
    assert voc["signal_slices"] == [(0, 592), (592, 272), (864, 416), (1280, 96), (1376, 48), (1424, 112)]


@pytest.mark.parametrize("kind", sorted(SMALL))
def test_synthetic_round_trip(tmp_path, kind):
    arch, (h, w) = SMALL[kind]
    ckpt, ref = _public_checkpoint(arch, prefix="module." if kind == "v1_0" else "")
    path = tmp_path / "model.pth"
    torch.save(ckpt, path)
    model = from_official(path)
    assert not model.training
    ref_sd, got_sd = ref.state_dict(), model.state_dict()
    assert ref_sd.keys() == got_sd.keys()
    for k in ref_sd:
        assert torch.equal(ref_sd[k], got_sd[k]), k
    x = torch.randn(1, 3, h, w)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))


def test_static_padding_tables():
    """The public EfficientNet's static paddings: (2,2) where its stride chain meets an odd size before a
    stride-2 5x5 conv (B1: 15 px; B3: 75 and 19 px), TF-same elsewhere."""
    import timm

    b1 = dict(static_same_padding(timm.create_model("tf_efficientnet_b1", num_classes=0), 240))
    assert b1["conv_stem"] == (0, 1, 0, 1)
    assert b1["blocks.1.0.conv_dw"] == (0, 1, 0, 1)
    assert b1["blocks.2.0.conv_dw"] == (1, 2, 1, 2)
    assert b1["blocks.5.0.conv_dw"] == (2, 2, 2, 2)
    b3 = dict(static_same_padding(timm.create_model("tf_efficientnet_b3", num_classes=0), 300))
    assert b3["blocks.2.0.conv_dw"] == (2, 2, 2, 2) and b3["blocks.5.0.conv_dw"] == (2, 2, 2, 2)
    assert b3["blocks.3.0.conv_dw"] == (0, 1, 0, 1)


# ----------------------------------------------------------------------------------------------
# bad input
def test_parse_arch_literals_only():
    assert parse_arch("a.b.f(1,'x',k=[(1,2)],n=None)") == ("a.b.f", [1, "x"], {"k": [(1, 2)], "n": None})
    assert parse_arch("ocrnet.HRNet_Mscale") == ("ocrnet.HRNet_Mscale", [], {})
    for bad in ["a.f(__import__('os').system('echo hacked'))", "a.f(x=open('/etc/passwd'))", "a.f(*[1])",
                "a.f(**{'k': 1})", "(lambda: 1)()", "a.f(1", "1 + 2"]:
        with pytest.raises(ValueError):
            parse_arch(bad)


def _save(tmp_path, obj, name="c.pth"):
    p = tmp_path / name
    torch.save(obj, p)
    return p


def test_code_in_arch_is_not_run(tmp_path):
    marker = tmp_path / "ran"
    arch = V1_0.replace("num_classes=5", f"num_classes=__import__('pathlib').Path({str(marker)!r}).touch()")
    ckpt, _ = _public_checkpoint(V1_0)
    with pytest.raises(ValueError, match="literals"):
        from_official(_save(tmp_path, dict(ckpt, arch=arch)))
    assert not marker.exists()


def test_unknown_arch_names_supported(tmp_path):
    ckpt, _ = _public_checkpoint(V1_0)
    with pytest.raises(UnsupportedArchError) as e:
        from_official(_save(tmp_path, dict(ckpt, arch="hyperseg.models.hyperseg_v0_2.hyperseg_efficientnet('x')")))
    for name in CONSTRUCTORS:
        assert name in str(e.value)


def test_not_a_checkpoint(tmp_path):
    p = tmp_path / "notes.pth"
    p.write_text("not a checkpoint\n")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        from_official(p)
    with pytest.raises(FileNotFoundError):
        from_official(tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="'state_dict' dict and an 'arch' string"):
        from_official(_save(tmp_path, {"model": {"w": torch.zeros(1)}}))
    with pytest.raises(ValueError, match="not a checkpoint dict"):
        from_official(_save(tmp_path, [torch.zeros(1)]))


def test_truncated(tmp_path):
    ckpt, _ = _public_checkpoint(V1_0)
    p = _save(tmp_path, ckpt)
    data = p.read_bytes()
    p.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError, match="truncated"):
        from_official(p)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


def test_pickled_code_refused(tmp_path):
    p = tmp_path / "evil.pth"
    with open(p, "wb") as f:
        pickle.dump({"state_dict": {}, "arch": V1_0, "x": _Evil()}, f)
    with pytest.raises(ValueError):
        load_checkpoint(p)


def test_missing_unexpected_misshaped_in_one_error(tmp_path):
    ckpt, _ = _public_checkpoint(V1_0)
    sd = dict(ckpt["state_dict"])
    del sd["backbone._conv_head.weight"]
    sd["decoder.level_9.0.bn1.weight"] = torch.zeros(3)
    sd["backbone._blocks.3._bn1.running_mean"] = torch.zeros(7)
    del sd["decoder.coord64_128"]
    with pytest.raises(CheckpointMismatchError) as e:
        from_official(_save(tmp_path, dict(ckpt, state_dict=sd)))
    msg = str(e.value)
    for key in ("backbone._conv_head.weight", "decoder.level_9.0.bn1.weight", "backbone._blocks.3._bn1.running_mean",
                "decoder.coord64_128", "nothing was loaded"):
        assert key in msg, key
    assert len(e.value.mismatched) == 1 and len(e.value.unexpected) == 1


def test_unsupported_options_are_named():
    with pytest.raises(ValueError, match="with_out_fc"):
        hyperseg_kwargs(V1_0.replace("with_out_fc=False", "with_out_fc=True"))
    with pytest.raises(ValueError, match="decoder_groups"):
        hyperseg_kwargs(V1_0.replace("decoder_groups=1", "decoder_groups=2"))
    with pytest.raises(ValueError, match="does not accept"):
        hyperseg_kwargs(V1_0.replace("num_classes=5", "num_classes=5,colour='red'"))


def test_strip_prefix():
    assert strip_prefix({"module.a": 1, "b": 2}) == {"a": 1, "b": 2}


def test_banded_expansion_with_asymmetric_padding():
    """PwDwConv2d takes the public EfficientNet's explicitly padded depthwise convs (ZeroPad2d + conv)."""
    from torch import nn
    from pyseg.models._fuse import ConvAct2d, PwDwConv2d

    pw = ConvAct2d(nn.Conv2d(4, 12, 1), nn.SiLU())
    for pads, k in (((0, 1, 0, 1), 3), ((1, 2, 1, 2), 5), ((2, 2, 2, 2), 5)):
        dw = nn.Sequential(nn.ZeroPad2d(pads), ConvAct2d(nn.Conv2d(12, 12, k, stride=2, groups=12), nn.SiLU()))
        pair = PwDwConv2d(pw, dw).eval()
        pair.min_bytes, pair.band_bytes = 0, 1  # bands of one row
        x = torch.randn(1, 4, 15, 22).contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            torch.testing.assert_close(pair(x), dw(pw(x)), atol=1e-5, rtol=1e-5)


def test_fuse_absorbs_static_padding(tmp_path):
    """fuse() turns the public EfficientNet's ZeroPad2d + conv pairs into symmetric-padded convs (zero taps)."""
    from torch import nn

    arch, (h, w) = SMALL["v1_0"]
    ckpt, _ = _public_checkpoint(arch)
    torch.save(ckpt, tmp_path / "model.pth")
    model = from_official(tmp_path / "model.pth")
    assert any(isinstance(m, nn.ZeroPad2d) for m in model.modules())
    x = torch.randn(1, 3, h, w)
    with torch.no_grad():
        expected = model(x)
        model.fuse().to_channels_last()
        assert not any(isinstance(m, nn.ZeroPad2d) for m in model.modules())
        got = model(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


# ----------------------------------------------------------------------------------------------
# benchmarks/compare_hyperseg.py (run by hand against the public code)
def _compare_script():
    import importlib.util

    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "compare_hyperseg.py"
    if not path.exists():
        pytest.skip("benchmarks/ is not part of an installed package")
    spec = importlib.util.spec_from_file_location("compare_hyperseg", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("manifest", MANIFESTS, ids=lambda p: p.stem)
def test_compare_script_builds_the_released_configurations(manifest):
    """The comparison script's configurations are the released checkpoints' constructor calls (the manifests'
    arch strings, recorded from the public code): same constructor, trunk, classes, arguments and input size."""
    rel = _compare_script().RELEASED
    man = json.loads(manifest.read_text())
    name = manifest.stem[len("hyperseg_official_"):]
    module, num_classes, size, kwargs = rel[name]
    fn, args, kw = parse_arch(man["arch"])
    assert fn == f"hyperseg.models.{module}.hyperseg_efficientnet"
    assert args == [_compare_script()._trunk(name)]
    assert kw.pop("pretrained") is True and kw.pop("num_classes") == num_classes
    assert kw == kwargs
    assert list(size) == man["input_size"]


def test_compare_script_rejects_a_wrong_source(tmp_path):
    with pytest.raises(SystemExit, match="hyperseg/models"):
        _compare_script().main(["compare", "--hyperseg-src", str(tmp_path), "--ckpt-dir", str(tmp_path)])
