"""benchmarks/roofline.py: coverage of the captured op calls, byte/FLOP formulas against hand counts, the floor,
the --measured merge and the CLI (a subprocess outside the checkout). CPU only; ~15 s (two meta-device captures)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import pyseg
from pyseg.models import get_config
from pyseg.ops.reference import meta_block as ref_meta
from pyseg.ops.reference import patchwise_conv2d as ref_patchwise

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "roofline.py"
_PYSEG_HOME = str(Path(pyseg.__file__).resolve().parent.parent)


def _load():
    spec = importlib.util.spec_from_file_location("pyseg_bench_roofline", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


rl = _load()


@pytest.fixture(scope="module")
def hyperseg_m():
    calls = rl.capture(["hyperseg-m"])
    return calls, rl.rows_for(calls, "h100", "float32")


def test_table_covers_every_op_of_hyperseg_m(hyperseg_m):
    calls, rows = hyperseg_m
    mine = [c for c in calls if c[0] == "hyperseg-m"]
    # HyperSeg-M's decoder: kernel 1 levels are pointwise blocks, kernel 3 levels meta blocks (SPEC.md 3)
    ks = get_config("hyperseg-m")["kernel_sizes"]
    assert [op for _, op, _ in mine] == ["pointwise_block" if k == 1 else "meta_block" for k in ks]
    assert {op for _, op, _ in calls} == {"pointwise_block", "meta_block", "patchwise_conv2d"}
    for model, op, _ in calls:
        got = sorted(r["direction"] for r in rows if r["model"] == model and r["op"] == op)
        assert set(got) == {"bwd", "fwd"} and got.count("fwd") == got.count("bwd")
    assert len(rows) == 2 * len(calls)
    for r in rows:
        assert r["MB"] > 0 and r["GFLOP"] > 0 and r["predicted_us"] > rl.LAUNCH_US and r["kernels"]
        assert r["pred_over_floor"] == pytest.approx(r["predicted_us"] / r["floor_us"])
    lvl4 = next(r for r in rows if r["model"] == "hyperseg-m" and r["level"] == 4 and r["direction"] == "fwd")
    assert lvl4["op"] == "meta_block" and lvl4["shape"].startswith("1x34x256x512 hid68 ->19 grid 16x32")


def test_patchwise_counts_by_hand():
    # x (1,2,4,4), 3 output channels, 3x3, pad 1, 2x2 grid, bias: y (1,3,4,4); 48 outputs x 18 taps = 864 MACs
    fb, ff, bb, bf, y = rl.patchwise_counts((1, 2, 4, 4), (1, 3, 2, 3, 3, 2, 2), True, (1, 1), (1, 1, 1, 1),
                                            (1, 1), 1, 4)
    assert y == (1, 3, 4, 4)
    assert ff == 2 * 864 + 48 and bf == 4 * 864 + 48
    assert fb == bb == (32 + 216 + 12 + 48) * 4
    x, w = torch.randn(1, 2, 4, 4), torch.randn(1, 3, 2, 3, 3, 2, 2)
    with FlopCounterMode(display=False) as fc:  # independent: torch's count of the reference's matmul
        ref_patchwise(x, w, None, (1, 1), (1, 1, 1, 1), (1, 1), 1)
    assert fc.get_total_flops() == 2 * 864
    # depthwise, bf16: K = 1*3*3
    fb, ff, *_ = rl.patchwise_counts((1, 4, 4, 4), (1, 4, 1, 3, 3, 2, 2), False, (1, 1), (1, 1, 1, 1), (1, 1), 4, 2)
    assert ff == 2 * 64 * 9 and fb == (64 + 144 + 64) * 2


def test_pointwise_counts_by_hand():
    fb, ff, bb, bf, y = rl.pointwise_counts((1, 3, 4, 4), (1, 6, 2, 2), 4)  # 3 -> 2 channels, 2x2 grid
    assert y == (1, 2, 4, 4)
    assert ff == 2 * 16 * 3 * 2 + 2 * 32  # GEMM + affine
    assert fb == (48 + 24 + 4 + 32) * 4
    assert bf == 3 * 192 + 6 * 32
    assert bb == (32 + 2 * 48 + 2 * 24 + 8) * 4


def test_meta_counts_by_hand():
    # x (1,2,4,4), hid 4, Cout 3, grid 2x2: four 2x2 patches, each 4x4 with its halo (64 haloed pixels)
    N = 4 * 2 + 9 * 4 + 3 * 4
    fb, ff, bb, bf, y = rl.meta_counts((1, 2, 4, 4), (1, N, 2, 2), 4, 3, 4)
    macs = 4 * 2 * 64 + 9 * 4 * 16 + 3 * 4 * 16
    assert ff == 2 * macs + 2 * 4 * 64 + 2 * 4 * 16 + 2 * 3 * 16
    assert fb == (32 + N * 4 + 2 * 11 + 48) * 4
    assert bf == ff + 2 * (2 * macs) + 4 * (4 * 64 + 4 * 16 + 3 * 16) + 2 * (64 - 16)
    x = torch.randn(1, 2, 4, 4)
    w1, w2, w3 = torch.randn(1, 4, 2, 2, 2), torch.randn(1, 4, 3, 3, 2, 2), torch.randn(1, 3, 4, 2, 2)
    with FlopCounterMode(display=False) as fc:  # independent: the public method's grouped convolutions
        ref_meta.meta_block(x, w1, w2, w3, method="grouped")
    assert fc.get_total_flops() == 2 * macs
    # uneven patches: 5 rows over 2 patches = 3 + 2 (patch of i is floor(i*2/5))
    assert rl._patch_sizes(5, 2) == [3, 2]


def test_meta_pw2_warps():
    """_pw2_warps (meta_forward_mma_kernel's pw2 tiles over 8 warps): every tile (m, n) of an mt3 x nt3 grid
    once, <= 4 per warp; with per > 0 a warp's tiles in one row block, per the smallest >= 2 that fits
    (HyperSeg-M level 3: 4 column tiles on warps 0 and 1); else tiles w + 8 i."""
    for mt3 in range(1, 33):
        for nt3 in range(1, 32 // mt3 + 1):
            per, warps = rl._pw2_warps(mt3, nt3)
            if per:
                got = [(m, w // mt3 * per + i) for w, ms in enumerate(warps) for i, m in enumerate(ms)]
                assert all(len(set(ms)) <= 1 for ms in warps)
                assert mt3 * -(-nt3 // per) <= 8 and (per == 2 or mt3 * -(-nt3 // (per - 1)) > 8)
            else:
                got = [((w + 8 * i) % mt3, (w + 8 * i) // mt3) for w, ms in enumerate(warps) for i in range(len(ms))]
                assert mt3 * -(-nt3 // 4) > 8
            assert sorted(got) == [(m, n) for m in range(mt3) for n in range(nt3)]
            assert max(len(ms) for ms in warps) <= 4
    assert rl._pw2_warps(1, 4) == (2, [[0, 0], [0, 0], [], [], [], [], [], []])


def test_hmsa_counts_by_hand():
    # two scales: p1 (1,2,4,4), p_low (1,2,2,2), a_low (1,1,2,2), out 4x4:
    # a*p at 2x2 (8), U(a*p) (7*32), U(a) (7*16), 1-U(a) (16), (1-U(a))*pred and + (2*32)
    b, f = rl.hmsa_counts([(1, 2, 4, 4), (1, 2, 2, 2)], [(0,), (1, 1, 2, 2)], [1.0, 0.5], (4, 4), False, None, 4)
    assert f == 8 + 224 + 112 + 16 + 64
    assert b == (32 + 8 + 4 + 32) * 4
    b, _ = rl.hmsa_counts([(1, 2, 4, 4), (1, 2, 2, 2)], [(0,), (1, 1, 2, 2)], [1.0, 0.5], (4, 4), True, None, 2)
    assert b == (32 + 8 + 4) * 2 + 16 * 8  # labels: int64


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_floor_is_max_of_memory_and_compute(hyperseg_m, dtype):
    calls, _ = hyperseg_m
    floors = {}
    for gpu in ("h100", "h200"):
        g = rl.GPUS[gpu]
        rows = rl.rows_for(calls, gpu, dtype)
        for r in rows:
            peak = {"fp32 FFMA": g["fp32"], "bf16 TC": g["bf16"], "fp16 TC": g["bf16"], "tf32 TC": g["tf32"]}[r["peak"]]
            t_mem, t_fl = r["MB"] * 1e6 / g["bw"] * 1e6, r["GFLOP"] * 1e9 / peak * 1e6
            assert r["floor_us"] == pytest.approx(max(t_mem, t_fl))
            assert r["bound"] == ("mem" if t_mem >= t_fl else "compute")
        floors[gpu] = rows
    for r in floors["h100"]:  # tensor cores only where a patch's GEMM has K = Cg*kh*kw >= 16 (not depthwise 3x3)
        dw = r["op"] == "patchwise_conv2d" and " g34" in r["shape"]
        assert r["peak"] == ("fp32 FFMA" if dtype == "float32" or dw else "bf16 TC"), r
    for a, b in zip(floors["h100"], floors["h200"]):
        if a["bound"] == b["bound"] == "mem":
            assert b["floor_us"] == pytest.approx(a["floor_us"] * 3.35 / 4.8)
        assert b["floor_us"] <= a["floor_us"]


def test_measured_merge(hyperseg_m, tmp_path):
    calls, _ = hyperseg_m
    rows = rl.rows_for(calls, "h100", "float32")
    base = dict(benchmark="meta_block", dtype="fp32", fused_backend="cuda")
    lvl = [dict(model="hyperseg-m", level=4, kind="meta", B=1, Cin=34, hid=68, Cout=19, H=256, W=512, gh=16, gw=32),
           dict(model="hyperseg-m", level=0, kind="1x1", B=1, Cin=82, hid=0, Cout=64, H=16, W=32, gh=16, gw=32)]
    fwd, both = tmp_path / "fwd.json", tmp_path / "fwdbwd.json"
    fwd.write_text(json.dumps(dict(base, mode="forward", rows=[dict(lvl[0], fused_ms=0.25), dict(lvl[1], fused_ms=0.01)])))
    both.write_text(json.dumps(dict(base, mode="forward+backward", rows=[dict(lvl[0], fused_ms=1.0)])))
    tri = tmp_path / "triton.json"  # another backend's medians are not the modelled kernels: ignored
    tri.write_text(json.dumps(dict(base, mode="forward", fused_backend="triton", rows=[dict(lvl[1], fused_ms=9.0)])))
    pw = tmp_path / "pw.json"  # bench_patchwise_conv2d.py's format: level 0 of the PatchWiseConv2d shapes
    prow = dict(case="M L0", shape=[1, 82, 16, 32], Cout=64, k=1, groups=1, grid=[16, 32], backend="cuda")
    pw.write_text(json.dumps(dict(benchmark="patchwise_conv2d", args=dict(dtype="float32"), results=[
        dict(prow, mode="fwd", median_ms=0.02), dict(prow, mode="fwd+bwd", median_ms=0.05),
        dict(prow, mode="fwd", backend="triton", median_ms=7.0)])))
    assert rl.merge_measured(rows, calls, [str(fwd), str(both), str(tri), str(pw)]) == 5
    p0 = {r["direction"]: r["measured_us"] for r in rows if r["model"] == "PatchWiseConv2d" and "measured_us" in r}
    assert p0 == pytest.approx({"fwd": 20.0, "bwd": 30.0})
    got = {(r["level"], r["direction"]): r for r in rows if r["model"] == "hyperseg-m" and "measured_us" in r}
    assert set(got) == {(4, "fwd"), (4, "bwd"), (0, "fwd")}
    assert got[(4, "fwd")]["measured_us"] == pytest.approx(250.0)
    assert got[(4, "bwd")]["measured_us"] == pytest.approx(750.0)  # forward+backward minus forward
    assert got[(0, "fwd")]["measured_us"] == pytest.approx(10.0)
    r = got[(4, "fwd")]
    assert r["pct_of_floor"] == pytest.approx(100 * r["floor_us"] / 250.0)
    table = rl.format_table(rows, "h100")
    assert "meas us" in table and "%floor" in table
    with pytest.raises(ValueError, match="not a benchmark JSON"):
        bad = tmp_path / "bad.json"
        bad.write_text("{}")
        rl.merge_measured(rows, calls, [str(bad)])


def test_bad_arguments(capsys):
    for argv, words in ((["--gpu", "a100"], ["h100", "h200"]), (["--models", "nope"], ["hyperseg-m", "hmsa-hyperseg-m"]),
                        (["--dtype", "float64"], ["bfloat16"])):
        with pytest.raises(SystemExit) as e:
            rl.main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert all(w in err for w in words), err


def test_cli_outside_checkout(tmp_path):
    own = tmp_path / "measured.json"
    own.write_text(json.dumps({"results": [{"op": "meta_block", "direction": "fwd", "dtype": "float32",
                                            "shape": "1x18x64x128 hid36 ->4 grid 4x8", "median_us": 40.0}]}))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([_PYSEG_HOME] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    out = tmp_path / "rows.json"
    r = subprocess.run([sys.executable, str(SCRIPT), "--gpu", "h200", "--models", "hyperseg-tiny", "--measured",
                        str(own), "--json", str(out)], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=300)
    assert r.returncode == 0, r.stderr
    assert "roofline on H200" in r.stdout and "merged into 1 of 10 rows" in r.stdout
    d = json.loads(out.read_text())
    assert d["gpu"] == "h200" and len(d["rows"]) == 10
    m = [x for x in d["rows"] if "measured_us" in x]
    assert len(m) == 1 and m[0]["measured_us"] == 40.0 and m[0]["level"] == 4


def test_patchwise_forward_plan_and_prediction(hyperseg_m):
    """The modelled patch-wise forward (pw_forward_tiled_kernel / pw_forward_direct_kernel): the launcher's
    plan for HyperSeg-M's 3x3 level, its bank-conflict-free row stride, and every float32 forward of
    HyperSeg-M's patch-wise shapes predicted within 2x of its floor (the acceptance of issue 20)."""
    plan = rl._pw_plan(34, 19, 1, 3, 3, (1, 1), (1, 1), 256, 512, 16, 32, 4)
    assert (plan["RO"], plan["OT"], plan["NG"], plan["TR"], plan["TC"], plan["IR"]) == (4, 20, 5, 16, 16, 18)
    assert plan["IC"] == 48 and plan["conflict"] == 1 and rl._pw_conflict(16, 16, 18, 1, 1) == 2
    assert plan["smem"] <= 48 * 1024 and plan["chunks"] * plan["CC"] >= 34
    assert rl._pw_plan(1, 2, 1, 3, 3, (1, 1), (60, 60), 8, 8, 1, 1, 4) is None  # the fallback kernel's case
    calls, _ = hyperseg_m
    rows = [r for r in rl.rows_for(calls, "h100", "float32") if r["op"] == "patchwise_conv2d" and r["direction"] == "fwd"]
    assert len(rows) == 3
    for r in rows:
        assert r["pred_over_floor"] <= 2.0, r


def test_patchwise_mma_plan_and_prediction(hyperseg_m):
    """The modelled tensor-core forward (pw_forward_mma_kernel) at HyperSeg-M's 3x3 shape: the launcher's
    plan (16x16-px tiles, 4 warps, chunks of 16 channels, odd-16-byte strides), where it does not run
    (float32, groups > 1, tiny patches), and its prediction against the FFMA kernel's in bfloat16."""
    plan = rl._pw_mma_plan(34, 19, 1, 3, 3, (1, 1), (1, 1), 256, 512, 16, 32, 2)
    assert (plan["TR"], plan["CT"], plan["NW"], plan["CC"], plan["IR"], plan["kpad"], plan["MT"]) == \
        (16, 1, 4, 16, 18, 48, 2)
    assert (plan["cstride"] * 2 // 16) % 2 == 1 and (plan["ldw"] * 2 // 16) % 2 == 1 and plan["smem"] <= 48 * 1024
    assert rl._pw_mma_plan(34, 19, 1, 3, 3, (1, 1), (1, 1), 256, 512, 16, 32, 4) is None  # float32: FFMA
    assert rl._pw_mma_plan(34, 34, 34, 3, 3, (1, 1), (1, 1), 256, 512, 16, 32, 2) is None  # depthwise
    assert rl._pw_mma_plan(82, 64, 1, 1, 1, (1, 1), (1, 1), 16, 32, 16, 32, 2) is None    # 1-px patches
    x, w = (1, 34, 256, 512), (1, 19, 34, 3, 3, 16, 32)
    g = rl.GPUS["h100"]
    mma = [rl._cuda_patchwise(x, w, True, (1, 1), (1, 1, 1, 1), (1, 1), 1, 2, False, pm)[0] for pm in (False, True)]
    assert all(k.name == "pw_forward_mma_kernel<MT=2>" for k in mma)
    assert mma[0].threads == 256 and mma[1].threads == 128  # pairs of patches per block in the default layout
    assert mma[1].l2 < mma[0].l2  # the default layout's weight sectors through L2
    rows = [r for r in rl.rows_for(hyperseg_m[0], "h100", "bfloat16") if r["op"] == "patchwise_conv2d"
            and r["direction"] == "fwd" and "x3x3x16 g1" in r["shape"]]
    assert len(rows) == 1 and rows[0]["pred_over_launch_floor"] <= 2.0, rows  # issue 20's acceptance
    ffma = rl._cuda_patchwise(x, w, True, (1, 1), (1, 1, 1, 1), (1, 1), 1, 4, False)[0]
    assert ffma.name.startswith("pw_forward_tiled_kernel") and mma[0].time_us(g) < ffma.time_us(g) / 2


def test_hmsa_tile_plan_and_prediction():
    """The tile kernel's ranges by hand, its tile choice (32 x 64; smaller tiles when the output or the plan
    needs them; the per-pixel kernel when even 8 x 32 does not fit) and a prediction far below the
    per-pixel kernel's."""
    # 2x upsample 4 -> 8: outputs 0..3 read rows 0..2 (dst 3: src 1.25); a 2x downsample 8 -> 4 above it
    assert rl._hmsa_ranges([8, 4], 1, 8, 0, 3) == [6, 3]
    lg = [(1, 19, 512, 1024), (1, 19, 256, 512), (1, 19, 128, 256)]
    at = [(0,), (1, 1, 128, 256), (1, 1, 64, 128)]
    sc = [2.0, 1.0, 0.5]
    plain = rl._cuda_hmsa(lg, at, sc, (1024, 2048), False, None, 4)
    assert [k.name for k in plain] == ["hmsa_fuse_tile_kernel(32x64)"] and plain[0].blocks == 32 * 32
    assert plain[0].barriers == 2 + 19 * 2 and plain[0].smem <= rl.HMSA_TILE_SMEM
    # the registry rows: scale grids at the scale's image size (scale_sizes), the top grid twice the output;
    # the stored logits are staged, so 32 x 64 tiles fit
    ss = [(1024, 2048), (512, 1024), (256, 512)]
    reg = rl._cuda_hmsa(lg, at, sc, (512, 1024), False, ss, 4)
    assert [k.name for k in reg] == ["hmsa_fuse_tile_kernel(32x64)"] and reg[0].time_us(rl.GPUS["h100"]) < 60
    tiny = rl._cuda_hmsa([(1, 5, 30, 300), (1, 5, 15, 150)], [(0,), (1, 1, 15, 150)], [1.0, 0.5], (3, 4), False,
                         None, 4)
    assert [k.name for k in tiny] == ["hmsa_fuse_kernel"]
    gpu = rl.GPUS["h100"]
    fb, _ = rl.hmsa_counts(lg, at, sc, (512, 1024), False, ss, 4)
    pixel = rl._cuda_hmsa_pixel(lg, sc, (512, 1024), False, ss, True, fb, 4, 1)
    assert reg[0].time_us(gpu) < pixel[0].time_us(gpu) / 3
