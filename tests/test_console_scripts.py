"""The console scripts as users run them: subprocesses, exit statuses, what they print.

``pyseg-train``/``pyseg-eval``/``pyseg-predict`` are looked up next to the running interpreter (a venv's bin/, where
``pip install`` puts them). Without an installed pyseg (a source checkout on ``PYTHONPATH``) those tests skip,
saying so; CI installs the package, so there they run. ``python -m pyseg.train`` runs from a checkout too.
Cost: about 12 subprocesses with a test-only tiny model, one epoch each (~5 s of CPU each, mostly imports).
"""
import importlib.metadata
import io
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from pyseg.cli._common import CommandError, console_main, error_line
from pyseg.data.synthetic import generate
from pyseg.engine.progress import LineProgress, progress, resolve_mode

TINY = str(Path(__file__).with_name("tiny_models.py"))
ROOT = Path(__file__).resolve().parents[1]


def _script(name: str) -> str:
    dirs = [Path(sys.executable).parent, Path(sysconfig.get_path("scripts"))]
    for d in dirs:
        for cand in (d / name, d / f"{name}.exe"):
            if cand.is_file():
                return str(cand)
    try:
        dist = importlib.metadata.distribution("pyseg")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip(f"pyseg is not pip-installed for {sys.executable}, so its console script {name} does not exist "
                    "(CI installs it; locally: pip install --no-build-isolation -e .)")
    pytest.fail(f"pyseg {dist.version} is installed but its console script {name} is not in {[str(d) for d in dirs]}")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYSEG_PROGRESS_INTERVAL="60")
    env.pop("PYSEG_TRACEBACK", None)
    return env


def _run(cmd, env=None, timeout=300):
    """Run with stdout and stderr on pipes (not a terminal), as in a CI log or ``cmd > log 2>&1``."""
    return subprocess.run(cmd, capture_output=True, text=True, env=env or _env(), timeout=timeout, cwd=ROOT)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate(root, num_train=8, num_val=3, size=(32, 32), seed=0, layout="folder")
    return root


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory):
    """``pyseg-train`` through pipes: exit 0, a few plain lines, no carriage returns; returns the run folder."""
    out = tmp_path_factory.mktemp("run")
    r = _run([_script("pyseg-train"), "--import", TINY, "--model", "test-tiny", "--dataset", "folder",
              "--data-root", str(data), "--output-dir", str(out), "--epochs", "2", "--batch-size", "4",
              "--workers", "0", "--threads", "1", "--scale-p", "0", "--loss", "ce", "--lr", "0.01"])
    assert r.returncode == 0, r.stderr
    text = r.stdout + r.stderr
    assert "\r" not in text  # no progress bar redraws in a log
    lines = r.stdout.splitlines()
    # header, per epoch a loss line and a val line, the JSON summary; no step lines (interval 60 s)
    assert len(lines) == 6, lines
    assert lines[1].startswith("epoch 1/2: loss ") and lines[4].startswith("epoch 2: val mIoU ")
    assert '"best_miou"' in lines[-1]
    assert "epoch" not in r.stderr and "val" not in r.stderr, r.stderr
    assert (out / "best.safetensors").is_file()
    return out


def test_train_eval_predict_chain(trained, data, tmp_path):
    ck = str(trained / "best.safetensors")
    r = _run([_script("pyseg-eval"), "--import", TINY, "--checkpoint", ck, "--dataset", "folder", "--data-root",
              str(data), "--workers", "0", "--threads", "1"])
    assert r.returncode == 0, r.stderr
    assert "triangle" in r.stdout and "mIoU" in r.stdout and "\r" not in r.stdout + r.stderr
    assert r.stderr == ""
    r = _run([_script("pyseg-predict"), "--import", TINY, "--checkpoint", ck, "--input", str(data / "images/val"),
              "--output", str(tmp_path / "pred"), "--threads", "1"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"wrote 6 files for 3 image(s) to {tmp_path / 'pred'}" and r.stderr == ""
    assert len(list((tmp_path / "pred").glob("*.png"))) == 6


def _one_line_error(r, prog, message):
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert r.stderr.splitlines() == [f"{prog}: error: {message}"], r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("prog", ["pyseg-eval", "pyseg-predict"])
def test_missing_checkpoint(prog, data, tmp_path):
    missing = tmp_path / "nope.safetensors"
    extra = (["--dataset", "folder", "--data-root", str(data)] if prog == "pyseg-eval"
             else ["--input", str(data / "images/val"), "--output", str(tmp_path / "o")])
    r = _run([_script(prog), "--checkpoint", str(missing), *extra])
    _one_line_error(r, prog, f"checkpoint not found: {missing}")


def test_missing_dataset(trained, tmp_path):
    missing = tmp_path / "no_data"
    r = _run([_script("pyseg-eval"), "--import", TINY, "--checkpoint", str(trained / "best.safetensors"),
              "--dataset", "folder", "--data-root", str(missing)])
    _one_line_error(r, "pyseg-eval", f"dataset root not found: {missing}")
    r = _run([_script("pyseg-train"), "--model", "hyperseg-tiny", "--dataset", "folder", "--data-root",
              str(missing), "--output-dir", str(tmp_path / "o")])
    _one_line_error(r, "pyseg-train", f"dataset root not found: {missing}")
    assert not (tmp_path / "o").exists()


def test_predict_missing_input(trained, tmp_path):
    r = _run([_script("pyseg-predict"), "--import", TINY, "--checkpoint", str(trained / "best.safetensors"),
              "--input", str(tmp_path / "none.png"), "--output", str(tmp_path / "o")])
    _one_line_error(r, "pyseg-predict", f"input not found: {tmp_path / 'none.png'}")


def test_usage_error_exits_2():
    r = _run([_script("pyseg-train"), "--model", "x"])
    assert r.returncode == 2 and "usage: pyseg-train" in r.stderr and "required" in r.stderr, r.stderr
    r = _run([_script("pyseg-eval"), "--help"])
    assert r.returncode == 0 and "usage: pyseg-eval" in r.stdout


def test_recipe_and_pseudo_label_options(tmp_path, data):
    """Bad values of the HMSA recipe's options: a usage error (2) or one error line (1), as users see them."""
    missing = tmp_path / "no_pseudo"
    r = _run([_script("pyseg-train"), "--model", "hmsa-deeplabv3p-mobilenetv2", "--dataset", "folder", "--data-root",
              str(data), "--output-dir", str(tmp_path / "o"), "--recipe", "hmsa-staged", "--extra-data",
              f"folder:{missing}"])
    _one_line_error(r, "pyseg-train", f"--extra-data folder not found: {missing}")
    r = _run([_script("pyseg-predict"), "--checkpoint", "x", "--input", "y", "--pseudo-labels", "z", "--threshold",
              "1.5"])
    assert r.returncode == 2 and "usage: pyseg-predict" in r.stderr, r.stderr
    assert r.stderr.splitlines()[-1] == ("pyseg-predict: error: argument --threshold: expected a number in (0, 1], "
                                         "got '1.5'")


def test_traceback_on_request(tmp_path):
    r = _run([_script("pyseg-eval"), "--checkpoint", str(tmp_path / "x.safetensors"), "--dataset", "folder",
              "--data-root", str(tmp_path)], env=dict(_env(), PYSEG_TRACEBACK="1"))
    assert r.returncode == 1 and "Traceback" in r.stderr and "CommandError: checkpoint not found" in r.stderr


def test_python_m_train_exit_status(tmp_path):
    """``python -m pyseg.train`` (also the torchrun form) reports the same way; runs from a source checkout."""
    env = dict(_env(), PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    r = _run([sys.executable, "-m", "pyseg.train", "--model", "hyperseg-tiny", "--dataset", "folder", "--data-root",
              str(tmp_path / "none"), "--output-dir", str(tmp_path / "o")], env=env)
    _one_line_error(r, "pyseg-train", f"dataset root not found: {tmp_path / 'none'}")
    r = _run([sys.executable, "-m", "pyseg.train", "--epochs", "0"], env=env)
    assert r.returncode == 2 and "usage:" in r.stderr


# --- in-process: the wrapper and the progress modes


def test_console_main_statuses(capsys):
    def ok(argv):
        return {"summary": 1}

    def fails(argv):
        raise CommandError("checkpoint not found: x.safetensors")

    def crashes(argv):
        raise RuntimeError("first line\n  second line")

    def exits(argv):
        raise SystemExit("no images in dir")

    assert console_main(ok, "p")([]) == 0
    assert console_main(ok, "p").run is ok
    assert console_main(fails, "p")([]) == 1
    assert capsys.readouterr().err == "p: error: checkpoint not found: x.safetensors\n"
    assert console_main(crashes, "p")([]) == 1
    assert capsys.readouterr().err == "p: error: RuntimeError: first line; second line\n"
    assert console_main(exits, "p")([]) == 1
    assert capsys.readouterr().err == "p: error: no images in dir\n"
    assert error_line(FileNotFoundError("gone")) == "gone"

    def usage(argv):
        raise SystemExit(2)

    assert console_main(usage, "p")([]) == 2


class _Stream(io.StringIO):
    def __init__(self, tty):
        super().__init__()
        self.tty = tty

    def isatty(self):
        return self.tty


def test_progress_modes(monkeypatch):
    assert resolve_mode("auto", _Stream(True)) == "bar"
    assert resolve_mode("auto", _Stream(False)) == "log"
    assert resolve_mode(True, _Stream(False)) == "log" and resolve_mode(False) == "none"
    with pytest.raises(ValueError, match="progress mode must be one of"):
        resolve_mode("fancy")
    out = _Stream(False)
    bar = LineProgress(range(5), desc="epoch 1/3", interval=0, file=out)
    for i in bar:
        bar.set_postfix(loss=f"{i:.1f}")
    lines = out.getvalue().splitlines()
    # one line per item except the last (the caller prints the epoch summary), no carriage returns
    assert len(lines) == 4 and "\r" not in out.getvalue()
    assert lines[0].startswith("epoch 1/3: 1/5 [") and lines[-1].endswith("loss=3.0")
    out = _Stream(False)
    assert list(LineProgress(range(1000), interval=3600, file=out)) == list(range(1000))
    assert out.getvalue() == ""  # throttled: nothing for a loop shorter than the interval
    monkeypatch.setenv("PYSEG_PROGRESS_INTERVAL", "soon")
    with pytest.raises(ValueError, match="PYSEG_PROGRESS_INTERVAL"):
        progress(range(3), mode="log")
    assert list(progress(range(3), mode="none")) == [0, 1, 2]
