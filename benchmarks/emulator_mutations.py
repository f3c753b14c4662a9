"""Mutation check of the CUDA kernels' barriers: for every ``__syncthreads()`` in the device code of
meta_block and patchwise_conv2d (csrc/cuda/*_kernels.cuh), run the emulated tests with that one barrier
removed and show that at least one fails.

The CUDA emulator (tests/cuda_emulator.py) turns the barrier at that source line into a no-op, which is
the same as building the kernel with the line deleted (every instantiation of the template shares the
line); the threads of a block then run between the remaining barriers in forward and in reverse order,
so a barrier that protects shared memory changes the result.

    python benchmarks/emulator_mutations.py [--out benchmarks/results/2026-12-01-cpu/emulator_mutations.txt]

Exit status 1 when some barrier can be removed without any test failing.
"""
import argparse
import pathlib
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import cuda_emulator as ce  # noqa: E402
import test_cuda_emulated as T  # noqa: E402

FILES = ["meta_block_kernels.cuh", "patchwise_conv2d_kernels.cuh"]


def checks():
    run = T.Target("emulated")
    f32 = torch.float32
    out = {}
    for case in ("odd", "multi-tile", "smem-weights-large"):
        out[f"meta_block forward {case}"] = lambda c=case: T.check_meta(run, c, f32, backward=False)
        out[f"meta_block backward {case}"] = lambda c=case: T.check_meta(run, c, f32, backward=True)
    for case in ("warp-reduce", "global-weights", "fallback-smem"):  # tiled (1 and 8 chunks), fallback
        out[f"patchwise_conv2d {case}"] = lambda c=case: T.test_patchwise_conv2d("emulated", c, f32)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", help="also write the report to this file")
    args = ap.parse_args()
    ce.ops()
    cases = checks()
    lines = []
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    lines.append(f"# emulator_mutations.py at {commit}: every __syncthreads() removed in turn")
    lines.append(f"# torch {torch.__version__}; schedules: forward, reverse; checks: {', '.join(cases)}")
    # the unmutated kernels pass every check in both schedules
    for order in ("forward", "reverse"):
        with ce.schedule(order):
            for name, fn in cases.items():
                fn()
    lines.append("baseline: every check passes (forward and reverse schedules)")
    survivors = 0
    for f in FILES:
        src = (ce.CUDA_DIR / f).read_text().splitlines()
        for site in ce.barriers(f):
            line_no = int(site.rsplit(":", 1)[1])
            t0 = time.time()
            failed = []
            with ce.without_barrier(site):
                for order in ("forward", "reverse"):
                    with ce.schedule(order):
                        for name, fn in cases.items():
                            if not name.startswith(f.split("_kernels")[0]):
                                continue
                            try:
                                fn()
                            except (AssertionError, RuntimeError) as e:
                                failed.append(f"{name} [{order}]: {str(e).splitlines()[0][:70]}")
            verdict = "KILLED" if failed else "SURVIVED"
            survivors += not failed
            lines.append(f"\n{site}  {src[line_no - 1].strip()}")
            lines.append(f"  {verdict}: {len(failed)} failing check(s) ({time.time() - t0:.1f} s)")
            lines += [f"    {x}" for x in failed[:4]]
            if len(failed) > 4:
                lines.append(f"    ... {len(failed) - 4} more")
            print("\n".join(lines[-(2 + min(len(failed), 4) + (len(failed) > 4)):]), flush=True)
    lines.append(f"\n{survivors} barrier(s) survived removal")
    text = "\n".join(lines) + "\n"
    if args.out:
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out).write_text(text)
    print(f"\n{survivors} barrier(s) survived removal")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
