"""A loaded released checkpoint everywhere a pyseg model goes: pyseg-convert (a subprocess, as users run it),
create_model(..., checkpoint=), pyseg-predict and benchmarks/fps.py with the .pth, fuse() + channels_last, every
backend, MultiScaleAttention. Synthetic checkpoints in the public format (small EfficientNet-B0 architectures;
see test_official_hyperseg.py). Cost: 3 pyseg-convert subprocesses (~5 s CPU each, mostly imports) and a few small models."""
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pyseg.models import create_model, from_official, load_pretrained
from pyseg.nn import MultiScaleAttention
from test_official_hyperseg import V1_0, _public_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def _command(name, module):
    """The console script when pyseg is installed, else the same entry point through the interpreter."""
    for d in (Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))):
        if (d / name).is_file():
            return [str(d / name)]
    return [sys.executable, "-c", f"import sys; from {module} import main; sys.exit(main())"]


def _run(cmd):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    env.pop("PYSEG_TRACEBACK", None)
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """(path of a public-format checkpoint, the pyseg model it was made from)."""
    ckpt, ref = _public_checkpoint(V1_0, seed=3)
    path = tmp_path_factory.mktemp("released") / "hyperseg_small.pth"
    torch.save(ckpt, path)
    return path, ref.eval()


def test_convert_script(released, tmp_path, monkeypatch):
    pth, ref = released
    out = tmp_path / "small.safetensors"
    r = _run(_command("pyseg-convert", "pyseg.cli.convert") + [str(pth), str(out)])
    assert r.returncode == 0, r.stderr
    assert "5 classes" in r.stdout and str(out) in r.stdout
    # the converted file loads without torch.load (and without the .pth)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    model = load_pretrained(out)
    x = torch.randn(1, 3, 64, 128)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))
    model2 = create_model("hyperseg-m", checkpoint=str(out), backend="reference")
    assert model2.backend == "reference"
    # refuses to overwrite; a bad input is one line on stderr, exit status 1
    r = _run(_command("pyseg-convert", "pyseg.cli.convert") + [str(pth), str(out)])
    assert r.returncode == 1 and "--force" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"\x00" * 100)
    r = _run(_command("pyseg-convert", "pyseg.cli.convert") + [str(bad), str(tmp_path / "x.safetensors")])
    assert r.returncode == 1 and "not a readable torch checkpoint" in r.stderr, r.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_create_model_checkpoint(released):
    pth, ref = released
    model = create_model("hyperseg-m", checkpoint=str(pth))
    x = torch.randn(1, 3, 64, 128)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref(x))
    with pytest.raises(ValueError, match="holds"):
        create_model("deeplabv3p-mobilenetv2", checkpoint=str(pth))
    with pytest.raises(ValueError, match="5-class"):
        create_model("hyperseg-m", checkpoint=str(pth), num_classes=19)


def test_loaded_model_fuse_backends_and_hmsa(released):
    pth, ref = released
    model = from_official(pth)
    x = torch.randn(1, 3, 64, 128)
    with torch.no_grad():
        expected = ref(x)
        for backend in ("reference", "cpu", "triton"):
            from pyseg import _extension

            if backend == "cpu" and not _extension.has_kernel("meta_block", "CPU"):
                continue
            if backend == "triton" and not _extension.triton_usable(torch.device("cpu")):
                continue
            torch.testing.assert_close(model.set_backend(backend)(x), expected, atol=1e-5, rtol=1e-4)
        model.set_backend("auto").fuse().to_channels_last()
        got = model(x.contiguous(memory_format=torch.channels_last))
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
        msa = MultiScaleAttention(model, infer_scales=(1.0,)).eval()
        torch.testing.assert_close(msa(x), expected, atol=1e-5, rtol=1e-4)
        msa.set_scales((0.5, 1.0))
        assert msa(torch.randn(1, 3, 128, 256)).shape == (1, 5, 128, 256)


def test_predict_and_fps_with_pth(released, tmp_path):
    """pyseg-predict and benchmarks/fps.py take the released .pth (their Python entry points, in-process)."""
    from pyseg.cli import predict

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import fps
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    pth, _ = released
    img = tmp_path / "street.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (50, 100, 3), dtype=np.uint8)).save(img)
    written = predict.run(["--checkpoint", str(pth), "--input", str(img), "--output", str(tmp_path / "out"),
                           "--resize", "64x128", "--device", "cpu", "--no-progress"])
    assert len(written) == 2
    mask = np.asarray(Image.open(tmp_path / "out" / "street_mask.png"))
    assert mask.shape == (50, 100, 3)
    rec = fps.main(["--checkpoint", str(pth), "--quick", "--iters", "1", "--warmup", "0", "--device", "cpu",
                    "--json", str(tmp_path / "fps.json")])
    assert rec["checkpoint"] == str(pth) and (tmp_path / "fps.json").is_file()
