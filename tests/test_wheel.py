"""The wheel installs and runs outside the repository (issue 20, packaging).

Builds the wheel, installs it (no dependencies) into a fresh virtualenv outside the repo, and
from an unrelated directory runs the README's library example and one ``:runlocal=True`` config
through the ``tfdpfair-train`` console script. The wheel's dependencies are not downloaded
again: the fresh venv sees the project venv's site-packages through a ``.pth`` path line (which
does not activate the project's editable install, so ``tfdpfair`` comes from the wheel).
"""

from __future__ import annotations

import json
import pathlib
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.slow, pytest.mark.ci]


def readme_library_example() -> str:
    text = (REPO / "README.md").read_text()
    section = text[text.index("## Using the library"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"  # a copy: building writes build/ and *.egg-info next to setup.py
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", ".venv*", "build", "*.egg-info", "runs", "__pycache__", ".pytest_cache"))
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(root / "dist"), str(source)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next((root / "dist").glob("tfdpfair-*.whl"))
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    python = venv / "bin" / "python"
    site = pathlib.Path(subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True).stdout.strip())
    (site / "project_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps",
                              "--no-index", str(wheel)], capture_output=True, text=True,
                             timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    return wheel, venv, site, elsewhere


def run(venv, cwd, *args, timeout=900):
    return subprocess.run([*args], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={"PATH": f"{venv / 'bin'}:/usr/bin:/bin",
                               "TF_CPP_MIN_LOG_LEVEL": "2", "HOME": str(cwd)})


def test_wheel_ships_configs_and_no_experiments_package(installed):
    wheel, venv, site, elsewhere = installed
    names = zipfile.ZipFile(wheel).namelist()
    assert "tfdpfair/configs/demo.py" in names and "tfdpfair/cli/train.py" in names
    assert not any(n.startswith("experiments/") for n in names)
    assert not (site / "experiments").exists()
    probe = run(venv, elsewhere, str(venv / "bin" / "python"), "-c",
                "import importlib.util, tfdpfair; print(tfdpfair.__file__); "
                "print(importlib.util.find_spec('experiments'))")
    assert probe.returncode == 0, probe.stderr[-2000:]
    where, experiments = probe.stdout.split()
    assert where.startswith(str(site)) and experiments == "None"
    for script in ("tfdpfair-train", "tfdpfair-evaluate", "tfdpfair-audit", "tfdpfair-epsilon"):
        assert (venv / "bin" / script).exists()


def test_readme_library_example_runs_from_the_wheel(installed):
    _, venv, _, elsewhere = installed
    proc = run(venv, elsewhere, str(venv / "bin" / "python"), "-c", readme_library_example())
    assert proc.returncode == 0, proc.stderr[-3000:]
    accuracy = float(re.search(r"'accuracy': ([0-9.]+)", proc.stdout).group(1))
    assert accuracy > 0.8
    assert (elsewhere / "release" / "PRIVACY.md").exists()


def test_console_script_runs_a_packaged_config_from_an_unrelated_directory(installed):
    _, venv, _, elsewhere = installed
    workdir = elsewhere / "run"
    proc = run(venv, elsewhere, str(venv / "bin" / "tfdpfair-train"),
               "--config=demo:runlocal=True", f"--workdir={workdir}")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["steps"] > 0 and metrics["epsilon"] > 0
    evaluate = run(venv, elsewhere, str(venv / "bin" / "tfdpfair-evaluate"),
                   f"--run_dirs={workdir}", f"--out_dir={workdir / 'fairness'}",
                   "--num_bootstrap=20")
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    assert (workdir / "fairness" / "report.md").exists()
