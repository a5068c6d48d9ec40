"""Crash safety of the experiment binary: SIGKILL mid-run, rerun the same command, and the run
ends with the steps and ε of an uninterrupted run with the same seeds. Its steps after the
restore draw fresh noise (restores never replay noise, DESIGN.md invariant 7), so its weights
are not bit for bit those of the uninterrupted run."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = 30
FLAGS = [  # the demo, from scratch (no cached pre-training), no stateful dropout, fixed seeds
    "--config=tfdpfair/configs/demo.py:runlocal=True", f"--config.dp.steps={STEPS}",
    "--config.model.init=None", "--config.model.from_scratch=True",
    "--config.model.kwargs.drop_rate=0.0", "--config.model.kwargs.stochdepth_rate=0.0",
    "--config.non_private.enabled=False", "--config.dp.noise_seed=5",
    "--config.dp.sampling_seed=6", "--config.train.checkpoint_every_steps=4"]


def command(workdir: pathlib.Path) -> list[str]:
    return [sys.executable, "-m", "experiments.train", f"--workdir={workdir}", *FLAGS]


def checkpoint_step(workdir: pathlib.Path) -> int:
    try:
        return json.loads((workdir / "checkpoint" / "dp_state.json").read_text())[
            "logical_steps"]
    except (OSError, ValueError, KeyError):
        return -1


def weights(workdir: pathlib.Path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(workdir / "checkpoint" / "state.weights.h5", "r") as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()])
                     if isinstance(obj, h5py.Dataset) else None)
    return out


def kill_after_checkpoint(workdir: pathlib.Path, sig: int) -> int:
    """Starts the run, sends ``sig`` once a checkpoint past step 0 exists; returns that step."""
    proc = subprocess.Popen(command(workdir), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while checkpoint_step(workdir) < 4 and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        step = checkpoint_step(workdir)
        proc.send_signal(sig)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    return step


@pytest.mark.slow
@pytest.mark.ci
def test_sigkill_then_rerun_ends_with_the_planned_steps_and_epsilon(tmp_path):
    reference = tmp_path / "reference"
    subprocess.run(command(reference), cwd=REPO, check=True, timeout=900,
                   stdout=subprocess.DEVNULL)
    interrupted = tmp_path / "interrupted"
    killed_at = kill_after_checkpoint(interrupted, signal.SIGKILL)
    assert 4 <= killed_at < STEPS, f"the run was not interrupted mid-way ({killed_at})"
    assert not (interrupted / "metrics.json").exists()
    subprocess.run(command(interrupted), cwd=REPO, check=True, timeout=900,
                   stdout=subprocess.DEVNULL)
    want = json.loads((reference / "metrics.json").read_text())
    got = json.loads((interrupted / "metrics.json").read_text())
    assert got["steps"] == want["steps"] == STEPS
    assert got["epsilon"] == want["epsilon"]
    assert got["noise_multiplier"] == want["noise_multiplier"]
    expected, actual = weights(reference), weights(interrupted)
    assert expected.keys() == actual.keys()
    kernels = [name for name in expected if expected[name].ndim >= 2]  # not the DP state
    assert any(not np.allclose(actual[name], expected[name], rtol=1e-4, atol=1e-4)
               for name in kernels)  # fresh noise after the restore


@pytest.mark.slow
def test_sigterm_checkpoints_then_stops(tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.Popen(command(workdir), cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    while checkpoint_step(workdir) < 0 and proc.poll() is None:
        time.sleep(0.02)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=600)
    if proc.returncode == 0:
        pytest.skip("the run finished before SIGTERM arrived")
    assert proc.returncode == 143, output[-2000:]
    assert "SIGTERM received" in output
    step = checkpoint_step(workdir)
    assert 0 <= step < STEPS and not (workdir / "metrics.json").exists()
    subprocess.run(command(workdir), cwd=REPO, check=True, timeout=900,
                   stdout=subprocess.DEVNULL)
    assert json.loads((workdir / "metrics.json").read_text())["steps"] == STEPS
