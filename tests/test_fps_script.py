"""Smoke test of benchmarks/fps.py (--quick: smallest legal input, one timed iteration)."""
import importlib.util
import json
from pathlib import Path

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
