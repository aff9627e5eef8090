"""benchmarks/seeds.py: it never empties a user's file, refuses flags it sets itself, and stops its trains."""

import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import children  # noqa: E402  (benchmarks/children.py)
import seeds  # noqa: E402  (benchmarks/seeds.py)
from fmnist_keras.interrupts import Interrupted  # noqa: E402


def _refused(argv, capsys) -> str:
    with pytest.raises(SystemExit) as stop:
        seeds.parse_args(argv)
    assert stop.value.code == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    return line


def test_a_users_file_where_a_seeds_log_goes_is_refused_before_any_run(tmp_path, capsys):
    (tmp_path / "cnn-seed2.log").write_text("my notes\n")
    line = _refused(["--seeds", "1", "2", "--out-dir", str(tmp_path)], capsys)
    assert "cnn-seed2.log exists and is not a log a benchmark wrote" in line and "left alone" in line
    assert (tmp_path / "cnn-seed2.log").read_text() == "my notes\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn-seed2.log"]  # seed 1's log was not made either


@pytest.mark.parametrize("flag", ["--seed", "--model=mlp", "--out-dir", "--out", "--run-name", "--overwrite",
                                  "--resume"])
def test_train_flags_the_script_sets_itself_are_refused_after_the_double_dash(tmp_path, capsys, flag):
    line = _refused(["--out-dir", str(tmp_path), "--", "--epochs", "1", flag, "x"], capsys)
    assert f"{flag} after -- would change what this script reads back" in line
    assert seeds.parse_args(["--out-dir", str(tmp_path), "--", "--epochs", "1"]).train_args == ["--epochs", "1"]


def test_an_out_dir_that_is_a_file_is_refused_before_any_run(tmp_path, capsys):
    (tmp_path / "file").write_text("mine")
    assert "is a file, not a directory" in _refused(["--out-dir", str(tmp_path / "file")], capsys)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_script_ends_its_trains_and_waits_for_them(tmp_path, monkeypatch, signum):
    started = []

    def launch(args, seed):
        started.append(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]))
        return started[-1]

    def interrupted(seconds):
        raise Interrupted(signum)

    monkeypatch.setattr(seeds, "launch", launch)
    monkeypatch.setattr(seeds, "OWN_STOP_S", 0.2)  # no terminal's Ctrl-C reached them: SIGTERM after the grace
    # Ctrl-C in the script's wait between polls (its own time module alone: subprocess sleeps too, in wait)
    monkeypatch.setattr(seeds, "time", types.SimpleNamespace(sleep=interrupted, perf_counter=time.perf_counter))
    with pytest.raises(Interrupted):
        seeds.main(["--seeds", "1", "2", "--jobs", "2", "--out-dir", str(tmp_path)])
    assert len(started) == 2 and [process.returncode for process in started] == [-signal.SIGTERM] * 2  # waited for


def test_a_train_that_ignores_sigterm_is_killed_once_the_wait_is_over(tmp_path, monkeypatch):
    stubborn = subprocess.Popen([sys.executable, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                                 "signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"], stdout=subprocess.PIPE)
    assert stubborn.stdout.readline() == b"ready\n"
    monkeypatch.setattr(children, "STOP_WAIT_S", 0.5)
    seeds.stop({1: stubborn})
    assert stubborn.returncode == -signal.SIGKILL


def _ended(pid: int) -> bool:
    """Whether a process that is not this one's child has ended (gone, or a zombie its new parent has not reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except (FileNotFoundError, ProcessLookupError):
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_train_gets_sigterm_when_the_script_is_killed_with_sigkill(tmp_path):
    # The script, as a process of its own: it starts a stand-in train, which records its pid, then the signal it gets.
    train = ("import os, signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: (open(sys.argv[1] + '.signal', "
             "'w').write('SIGTERM'), sys.exit(0))); open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(60)")
    script = (f"import sys; sys.path.insert(0, {str(Path(seeds.__file__).parent)!r}); import children, time; "
              f"children.start_train([sys.executable, '-c', {train!r}, {str(tmp_path / 'train')!r}]); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 30
    while not (tmp_path / "train").exists() or not (tmp_path / "train").read_text():
        assert time.monotonic() < deadline and parent.poll() is None, "the stand-in train did not start"
        time.sleep(0.05)
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 30
    while not _ended(int((tmp_path / "train").read_text())):
        assert time.monotonic() < deadline, "the train went on after the script was killed"
        time.sleep(0.05)
    assert (tmp_path / "train.signal").read_text() == "SIGTERM"
