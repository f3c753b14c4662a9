"""Smoke test of benchmarks/fps.py (--quick: smallest legal input, one timed iteration)."""
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_fps_quick_writes_json(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("pyseg_bench_fps", ROOT / "benchmarks" / "fps.py")
    fps = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fps)
    out = tmp_path / "r.json"
    rec = fps.main(["--model", "hyperseg-m", "--quick", "--iters", "1", "--warmup", "0", "--device", "cpu",
                    "--compare-reference", "--json", str(out)])
    text = capsys.readouterr().out
    assert "images/s" in text and "GMACs" in text and "10,311,214" in text
    data = json.loads(out.read_text())
    assert data["params"] == 10_311_214 and (data["height"], data["width"]) == (64, 128)
    assert set(data["results"]) == {"pyseg", "reference"}
    assert data["results"]["pyseg"]["fps"] > 0 and data["max_rel_diff_vs_reference"] < 1e-4
    assert data["channels_last"] is True  # the CPU default
    # MACs: static part counted by FlopCounterMode, decoder analytically; 64x128 is 1/64 of 1024x512
    assert 0.08 < data["gmacs_per_image"] < 0.16


def _load_fps():
    spec = importlib.util.spec_from_file_location("pyseg_bench_fps", ROOT / "benchmarks" / "fps.py")
    fps = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fps)
    return fps


def test_fps_hmsa_scales(tmp_path, capsys):
    fps = _load_fps()
    out = tmp_path / "h.json"
    fps.main(["--model", "hmsa-hyperseg-m", "--quick", "--iters", "1", "--warmup", "0", "--device", "cpu",
              "--scales", "1,0.5", "--compare-reference", "--json", str(out)])
    assert "HMSA scales" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert data["scales"] == [0.5, 1.0] and set(data["results"]) == {"pyseg", "reference"}
    assert data["max_rel_diff_vs_reference"] < 1e-4


def test_fps_scales_errors(tmp_path):
    fps = _load_fps()
    with pytest.raises(SystemExit, match="needs a multi-scale attention model"):
        fps.main(["--model", "hyperseg-m", "--quick", "--device", "cpu", "--scales", "0.5,1",
                  "--json", str(tmp_path / "x.json")])
    with pytest.raises(SystemExit, match="containing 1.0"):
        fps.main(["--model", "hmsa-hyperseg-m", "--quick", "--device", "cpu", "--scales", "0.5,2",
                  "--json", str(tmp_path / "y.json")])


def test_msa_set_backend_reaches_the_wrapped_model():
    from pyseg.models import create_model

    m = create_model("hmsa-hyperseg-m").set_backend("reference")
    assert m.backend == "reference" and all(b.backend == "reference" for b in m.model.decoder)
