"""Run the README's CPU training demo verbatim for several seeds; record each run's raw output and a summary.

The commands are read from README.md (the ```bash block after ``<!-- demo-commands -->``); for seed S every
``--seed 0`` becomes ``--seed S`` (data generation and training), nothing else changes. Each seed runs in its own
folder (the commands use relative paths), one after the other, through a pipe (as in a log file)::

    python benchmarks/demo_seeds.py --seeds 0 1 2 --workdir /tmp/demo --out benchmarks/results/2026-12-01-cpu

writes ``OUT/demo_seed{S}.txt`` (the chain's stdout+stderr, its exit status and time), ``OUT/demo_seed{S}.json``
(exit status, the val mIoU and per-class IoU that ``pyseg-eval`` printed, wall and CPU seconds) and
``OUT/demo_seeds.json`` (all seeds found in OUT: mean and range). Seeds may run as separate processes
(``--seeds 1``); ``--summarize`` only rewrites ``demo_seeds.json`` from the per-seed files.
"""
from __future__ import annotations

import argparse
import json
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = "<!-- demo-commands -->"


def readme_commands(readme: Path = ROOT / "README.md", marker: str = MARKER) -> str:
    """A demo's shell commands (the ```bash block after ``marker``), exactly as the README shows them."""
    text = readme.read_text()
    if marker not in text:
        raise SystemExit(f"{readme}: no {marker} marker")
    m = re.search(r"```bash\n(.*?)```", text[text.index(marker):], re.S)
    if m is None:
        raise SystemExit(f"{readme}: no ```bash block after {marker}")
    return m.group(1)


def with_seed(commands: str, seed: int) -> str:
    if commands.count("--seed 0") < 2:
        raise SystemExit("the README demo must pass --seed 0 to the data generator and to pyseg-train")
    return commands.replace("--seed 0", f"--seed {seed}")


def parse_eval(output: str) -> dict:
    """pyseg-train's best val mIoU (its JSON line) and pyseg-eval's table: mIoU, pixel accuracy, per-class IoU (%)."""
    best = re.findall(r'^\{"best_miou": ([0-9.e-]+)', output, re.M)
    miou = re.findall(r"^mIoU\s+([0-9.]+)", output, re.M)
    acc = re.findall(r"^pixel acc\s+([0-9.]+)", output, re.M)
    rows = re.findall(r"^(background|circle|square|triangle)\s+([0-9.]+)", output, re.M)
    if not miou or not best:
        raise ValueError("no pyseg-train summary or no pyseg-eval 'mIoU' line in the output")
    return {"miou": float(miou[-1]) / 100, "train_best_miou": float(best[-1]), "pixel_acc": float(acc[-1]) / 100,
            "iou_pct": {k: float(v) for k, v in rows[-4:]}}


def run_chain(script: str, cwd: Path):
    """Run a shell command chain in ``cwd`` with stdout and stderr on one pipe; (CompletedProcess, wall s, CPU s)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    r = subprocess.run(["bash", "-c", script], cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.time() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r, wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--workdir", required=True, help="each seed runs in WORKDIR/seed<S> (must not exist)")
    p.add_argument("--out", required=True, help="folder for demo_seed<S>.txt and demo_seeds.json")
    p.add_argument("--summarize", action="store_true", help="only combine OUT/demo_seed*.json")
    a = p.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    commands = readme_commands()
    ok = True
    for seed in [] if a.summarize else a.seeds:
        cwd = Path(a.workdir) / f"seed{seed}"
        cwd.mkdir(parents=True)
        script = with_seed(commands, seed)
        r, wall, cpu = run_chain(script, cwd)
        rec = {"seed": seed, "exit_status": r.returncode, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}
        try:
            rec.update(parse_eval(r.stdout))
        except ValueError as e:
            rec["error"] = str(e)
        ok &= r.returncode == 0 and "miou" in rec
        (out / f"demo_seed{seed}.txt").write_text(
            f"$ (README demo commands, --seed {seed}) in {cwd}\n{script}\n--- output ---\n{r.stdout}"
            f"--- exit status {r.returncode}, wall {wall:.1f} s, CPU {cpu:.1f} s ---\n")
        (out / f"demo_seed{seed}.json").write_text(json.dumps(rec, indent=1) + "\n")
        print(json.dumps(rec), flush=True)
    runs = sorted((json.loads(f.read_text()) for f in out.glob("demo_seed[0-9]*.json")), key=lambda r: r["seed"])
    mious = [r["miou"] for r in runs if "miou" in r]
    summary = {"commands": commands, "seeds": [r["seed"] for r in runs], "runs": runs}
    if mious:
        summary.update(miou_mean=round(sum(mious) / len(mious), 4), miou_min=min(mious), miou_max=max(mious))
        print(f"val mIoU over seeds {summary['seeds']}: mean {summary['miou_mean']:.4f}, range "
              f"{summary['miou_min']:.4f}-{summary['miou_max']:.4f}")
    (out / "demo_seeds.json").write_text(json.dumps(summary, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
