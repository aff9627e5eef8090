"""benchmarks/gpu_check.sh's control flow, with stand-ins for nvidia-smi and the Python steps.

The script only runs for real on a GPU machine, where every minute is scarce:
these tests run it here in a second or two, each step a stub that records
its command line, so that a step that never ends, a wait that never returns
or a failed preflight that does not stop the run shows up on any machine.
"""

import os
import pathlib
import signal
import stat
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"

NVIDIA_SMI = """#!/usr/bin/env bash
case "$*" in
  *memory.used,utilization.gpu*) echo "1234, 56" ;;
  *name,driver_version*) echo "Stub GPU, 1.0, 1000 MiB" ;;
esac
"""

# Records each Python step's arguments; the summary runs on the real interpreter.
PYTHON3 = """#!/usr/bin/env bash
case "$*" in
  *gpu_summary.py*) exec "$REAL_PYTHON" "$@" ;;
  -c*) echo "stub: python3 $1"; exit 0 ;;
esac
echo "$*" >> "$CALLS"
case "$*" in *"$FAIL_ON"*) [ -n "$FAIL_ON" ] && { echo "stub failure" >&2; exit 3; } ;; esac
sleep 0.2
"""


def _stub(directory: pathlib.Path, name: str, text: str) -> None:
    path = directory / name
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _run(tmp_path, fail_on=""):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _stub(bin_dir, "nvidia-smi", NVIDIA_SMI)
    _stub(bin_dir, "python3", PYTHON3)
    out = tmp_path / "out"
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "REAL_PYTHON": sys.executable,
           "CALLS": str(tmp_path / "calls.txt"), "FAIL_ON": fail_on}
    env.pop("TOTAL", None)
    # In a session of its own, so that a script that hangs (a wait for the sampler, which never ends)
    # is killed with every process it started.
    process = subprocess.Popen(["bash", str(SCRIPT), str(out)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        pytest.fail("gpu_check.sh did not end within 120 s")
    result = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    calls = (tmp_path / "calls.txt").read_text().splitlines() if (tmp_path / "calls.txt").exists() else []
    steps = [line.split("\t") for line in (out / "steps.tsv").read_text().splitlines()]
    return result, out, calls, steps


@pytest.mark.skipif(sys.platform == "win32", reason="a bash script")
def test_every_step_runs_once_and_the_script_ends_with_a_summary(tmp_path):
    result, out, calls, steps = _run(tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    names = [step[0] for step in steps]
    assert names[:2] == ["preflight", "env"]
    assert sorted(names) == sorted([
        "preflight", "env", "devices-torch-gpu", "devices-torch-cpu", "devices-jax-gpu", "syncs", "jax",
        "overhead", "bench", "train-default", "train-cnn-large", "train-cnn-b512"])
    assert all(step[4] == "0" for step in steps), steps
    # overhead and bench run alone: each starts after every step before it ended, and ends before the next starts.
    by_name = {step[0]: (float(step[1]), float(step[2])) for step in steps}
    for alone in ("overhead", "bench"):
        start, end = by_name[alone]
        assert all(e <= start or s >= end for name, (s, e) in by_name.items() if name != alone), by_name
    assert len(calls) == 11 and sum("--device gpu" in call for call in calls) == 3, calls
    assert any("--run-name cnn-large" in call and "--model cnn-large" in call for call in calls)
    summary = (out / "summary.md").read_text()
    assert "| GPU | Stub GPU |" in summary and "| train-cnn-b512 | 0 |" in summary
    # The sampler ran beside the steps and was stopped: its samples carry the memory and the utilisation.
    assert "T " in (out / "gpu-memory.log").read_text() and " 1234 56" in (out / "gpu-memory.log").read_text()


@pytest.mark.skipif(sys.platform == "win32", reason="a bash script")
def test_a_failed_preflight_stops_the_run_before_any_other_step(tmp_path):
    result, out, calls, steps = _run(tmp_path, fail_on="--run-name preflight")
    assert result.returncode == 1
    assert [step[0] for step in steps] == ["preflight"] and steps[0][4] == "3"
    assert calls == [c for c in calls if "--run-name preflight" in c] and len(calls) == 1
    assert "preflight failed" in result.stdout and "stub failure" in result.stdout
    assert not (out / "summary.md").exists()


def test_the_summary_lists_a_run_stopped_at_its_limit_from_its_history(tmp_path):
    out = tmp_path / "out"
    stopped, finished = out / "runs" / "cnn-large" / "cnn-large", out / "runs" / "default" / "mlp"
    for model_dir in (stopped, finished):
        model_dir.mkdir(parents=True)
    (stopped / "config.json").write_text('{"model": "cnn-large", "batch_size": 128}')
    (stopped / "history.csv").write_text("epoch,accuracy,loss,val_accuracy,val_loss\n0,0.8,1.0,0.85,0.9\n"
                                         "1,0.9,0.8,0.91,0.7\n2,0.9,0.8,not-a-number,0.7\n")
    (finished / "config.json").write_text('{"model": "mlp", "batch_size": 512}')
    (finished / "metrics.json").write_text('{"model": "mlp", "device": "cuda:0 (Stub)", "epochs_run": 20, "best_epoch": 18, '
                                           '"test": {"accuracy": 0.9081}, "validation": {"accuracy": 0.91}, '
                                           '"fast_path": {"fused_adam": "on", "host_seeds": "off: changed"}}')
    (out / "steps.tsv").write_text("train-cnn-large\t100.0\t400.5\t300\t124\ntrain-default\t100.0\t225.0\t300\t0\n")
    summary = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_summary.py"), str(out)],
                             capture_output=True, text=True, check=True).stdout
    assert "| train-cnn-large | timeout | 300 | 300 |" in summary
    large = next(line for line in summary.splitlines() if line.startswith("| cnn-large | cnn-large |"))
    assert "| 128 | 2 (-) |" in large and "| 300 | 0.9100 (1 view) | stopped |" in large, large
    mlp = next(line for line in summary.splitlines() if line.startswith("| default | mlp |"))
    assert "| cuda:0 (Stub) | 512 | 20 (18) |" in mlp and "| 125 | 0.9100 | 0.9081 |" in mlp, mlp
    assert "| host_seeds |" in mlp and "fused_adam" not in mlp
