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


def _run(tmp_path, fail_on="", out=None):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    _stub(bin_dir, "nvidia-smi", NVIDIA_SMI)
    _stub(bin_dir, "python3", PYTHON3)
    out = tmp_path / "out" if out is None else out
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
    steps_tsv = out / "steps.tsv"
    steps = ([line.split("\t") for line in steps_tsv.read_text().splitlines()]
             if steps_tsv.is_file() and not steps_tsv.is_symlink() else [])
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


# The output directory (data loss): new, empty or marked by the script itself, and never written through a link.
MARKER = ".fmnist_keras-gpu-check"


def _refused_in_one_line(result, out):
    assert result.returncode != 0, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(out) in lines[0] and "new or empty" in lines[0], result.stderr
    assert result.stdout == ""


@pytest.mark.skipif(sys.platform == "win32", reason="a bash script")
def test_a_users_non_empty_directory_is_refused_and_left_untouched(tmp_path):
    out = tmp_path / "home"
    out.mkdir()
    (out / "steps.tsv").write_text("notes\n")
    (out / "summary.md").write_text("my summary\n")
    target = tmp_path / "userfile2.txt"
    target.write_text("keep me\n")
    (out / "preflight.log").symlink_to(target)
    result, _, calls, _ = _run(tmp_path, out=out)
    _refused_in_one_line(result, out)
    assert "did not make it" in result.stderr and MARKER in result.stderr
    assert calls == []
    assert (out / "steps.tsv").read_text() == "notes\n" and (out / "summary.md").read_text() == "my summary\n"
    assert target.read_text() == "keep me\n" and (out / "preflight.log").is_symlink()
    assert sorted(p.name for p in out.iterdir()) == ["preflight.log", "steps.tsv", "summary.md"]


@pytest.mark.skipif(sys.platform == "win32", reason="a bash script")
@pytest.mark.parametrize("name", ["preflight.log", "steps.tsv", "summary.md", "notes-link"])
def test_a_link_in_its_own_marked_directory_is_refused_and_its_target_untouched(tmp_path, name):
    out = tmp_path / "out"
    result, _, _, _ = _run(tmp_path, out=out)
    assert result.returncode == 0, result.stdout + result.stderr
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    (out / name).unlink(missing_ok=True)
    target = tmp_path / "userfile2.txt"
    target.write_text("keep me\n")
    (out / name).symlink_to(target)
    (tmp_path / "calls.txt").unlink()
    result, _, calls, _ = _run(tmp_path, out=out)
    _refused_in_one_line(result, out)
    assert "symbolic link" in result.stderr and name in result.stderr
    assert calls == [] and target.read_text() == "keep me\n"
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and not p.is_symlink()} == \
        {k: v for k, v in before.items() if k != name}


@pytest.mark.skipif(sys.platform == "win32", reason="a bash script")
def test_a_marker_that_is_a_link_does_not_make_a_directory_its_own(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    marker = tmp_path / "elsewhere"
    marker.write_text("")
    (out / MARKER).symlink_to(marker)
    (out / "steps.tsv").write_text("notes\n")
    result, _, calls, _ = _run(tmp_path, out=out)
    _refused_in_one_line(result, out)
    assert calls == [] and (out / "steps.tsv").read_text() == "notes\n" and marker.read_text() == ""


@pytest.mark.skipif(sys.platform == "win32", reason="a bash script")
@pytest.mark.parametrize("exists", [False, True], ids=["new", "empty"])
def test_a_new_or_empty_directory_works_and_is_marked(tmp_path, exists):
    out = tmp_path / "deep" / "out"
    if exists:
        out.mkdir(parents=True)
    result, _, calls, steps = _run(tmp_path, out=out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (out / MARKER).is_file() and not (out / MARKER).is_symlink()
    assert len(steps) == 12 and len(calls) == 11 and (out / "summary.md").is_file()


@pytest.mark.skipif(sys.platform == "win32", reason="a bash script")
@pytest.mark.parametrize("odd", ["fifo", "directory"])
def test_anything_but_a_regular_file_or_runs_in_its_own_directory_is_refused(tmp_path, odd):
    out = tmp_path / "out"
    first, _, _, _ = _run(tmp_path, out=out)
    assert first.returncode == 0, first.stdout + first.stderr
    (out / "runs").mkdir(exist_ok=True)  # train's runs: the one directory it keeps there
    os.mkfifo(out / "steps.tsv.fifo") if odd == "fifo" else (out / "mine").mkdir()
    (tmp_path / "calls.txt").unlink()
    result, _, calls, _ = _run(tmp_path, out=out)
    _refused_in_one_line(result, out)
    assert ("steps.tsv.fifo" if odd == "fifo" else "mine") in result.stderr and calls == []


def test_a_rerun_into_its_own_marked_directory_works(tmp_path):
    out = tmp_path / "out"
    first, _, _, _ = _run(tmp_path, out=out)
    assert first.returncode == 0, first.stdout + first.stderr
    (out / "runs").mkdir(exist_ok=True)  # train's runs are kept there
    (out / "my-notes.txt").write_text("mine\n")  # a file of the user's beside the outputs stays as it is
    (tmp_path / "calls.txt").unlink()
    result, _, calls, steps = _run(tmp_path, out=out)
    assert result.returncode == 0, result.stdout + result.stderr
    assert (out / MARKER).is_file() and not (out / MARKER).is_symlink()
    assert len(steps) == 12 and len(calls) == 11  # steps.tsv started afresh, not appended to
    assert (out / "my-notes.txt").read_text() == "mine\n"
