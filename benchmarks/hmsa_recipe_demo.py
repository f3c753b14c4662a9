"""Run the README's HMSA recipe demo verbatim and record its raw output, wall time and results.

The commands are the ```bash block after ``<!-- hmsa-recipe-demo -->`` in README.md; they run in ``--workdir``
(relative paths: ``data/``, ``runs/``) through a pipe, as in a log file::

    python benchmarks/hmsa_recipe_demo.py --workdir /tmp/hmsa-demo \
        --out benchmarks/results/2026-12-01-cpu/hmsa_recipe_demo.txt

``OUT`` gets: a header (commit, date, CPU count, load average), the commands, their stdout+stderr unedited, then
the exit status, wall and CPU time, and one JSON line ``RESULT {...}``: each recipe step's best val mIoU from the
runs' ``recipe.json`` (``runs/labelled``: labelled data only; ``runs/mixed``: labelled + pseudo-labelled), the
pseudo-labels' labelled fraction and the final ``pyseg-eval`` mIoUs in the order printed.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from demo_seeds import ROOT, readme_commands, run_chain

MARKER = "<!-- hmsa-recipe-demo -->"


def _git(*args) -> str:
    r = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else "unknown"


def results(workdir: Path, output: str) -> dict:
    out = {}
    for run in ("labelled", "mixed"):
        rec = json.loads((workdir / "runs" / run / "recipe.json").read_text())
        out[run] = [s.get("best_miou") for s in rec["steps"]]
    pseudo = json.loads(next((workdir / "data").glob("*/pseudo_labels.json")).read_text())
    out["pseudo_labelled_fraction"] = pseudo["labelled_fraction"]
    out["eval_miou"] = [float(v) / 100 for v in re.findall(r"^mIoU\s+([0-9.]+)$", output, re.M)]
    out["eval_peak_memory_mb"] = [float(v) for v in re.findall(r"^peak memory per image: ([0-9.]+) MB", output, re.M)]
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="folder to run in (must not exist)")
    p.add_argument("--out", required=True, help="the raw log file to write")
    a = p.parse_args(argv)
    commands = readme_commands(marker=MARKER)
    cwd = Path(a.workdir)
    cwd.mkdir(parents=True)
    out = Path(a.out)
    dirty = " (working tree modified)" if _git("status", "--porcelain", "--untracked-files=no") else ""
    header = (f"# README HMSA recipe demo, run by benchmarks/hmsa_recipe_demo.py\n"
              f"# commit {_git('rev-parse', '--short', 'HEAD')}{dirty}, {time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n"
              f"# {os.cpu_count()} CPUs, load average at start {' '.join(f'{v:.2f}' for v in os.getloadavg())}\n"
              f"# commands:\n" + "".join(f"#   {line}\n" for line in commands.splitlines()) + "# output:\n")
    with open(out, "w") as f:
        f.write(header)
        f.flush()
        r, wall, cpu = run_chain(commands, cwd)
        f.write(r.stdout)
        f.write(f"# exit status {r.returncode}, wall {wall:.1f} s ({wall / 60:.2f} min), CPU {cpu:.1f} s, load "
                f"average at end {' '.join(f'{v:.2f}' for v in os.getloadavg())}\n")
        rec = {"exit_status": r.returncode, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1)}
        if r.returncode == 0:
            rec.update(results(cwd, r.stdout))
        f.write("RESULT " + json.dumps(rec) + "\n")
    print(out.read_text()[-2000:])
    return 0 if r.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
