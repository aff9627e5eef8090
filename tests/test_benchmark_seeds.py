"""benchmarks/seeds.py: it never empties a user's file, refuses flags it sets itself, and stops its trains."""

import json
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


@pytest.mark.parametrize("given, named", [(["1", "2", "1"], "1 2 1"), (["1", "01"], "1 1")])
def test_a_seed_given_twice_is_refused_before_any_run(tmp_path, capsys, given, named):
    # One run trained twice would count as two seeds that agree (a spread of 0).
    line = _refused(["--seeds", *given, "--out-dir", str(tmp_path / "out")], capsys)
    assert f"--seeds {named} names a seed twice; give each once" in line and not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["-h", "--help", "--he"])
def test_train_help_after_the_double_dash_is_refused(tmp_path, capsys, flag):
    # train would print its help, exit 0 and train nothing: the table would show the runs already there.
    line = _refused(["--out-dir", str(tmp_path), "--", flag], capsys)
    assert f"{flag} after -- makes train print its help and train nothing" in line


def test_a_run_directory_without_this_scripts_log_beside_it_is_refused_before_any_run(tmp_path, capsys):
    # `train --run-name cnn-seed1 --out-dir OUT` makes a run named as a seed's; train --overwrite would replace it.
    (tmp_path / "cnn-seed1" / "cnn").mkdir(parents=True)
    (tmp_path / "cnn-seed1" / "cnn" / "model.keras").write_text("a user's own run")
    line = _refused(["--seeds", "2", "1", "--out-dir", str(tmp_path)], capsys)
    assert f"{tmp_path / 'cnn-seed1'} exists and there is no cnn-seed1.log beside it" in line and "left alone" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cnn-seed1"]
    (tmp_path / "cnn-seed1.log").write_text(seeds.outputs.LOG_STAMP + ": python -m fmnist_keras.train ...\n")
    assert seeds.parse_args(["--seeds", "2", "1", "--out-dir", str(tmp_path)]).seeds == [2, 1]  # seeds.py's run


def _fake_trains(monkeypatch, code: str):
    """Each seed's train is ``python -c code``, its output in the seed's stamped log, as launch writes it."""

    def launch(args, seed):
        with seeds.outputs.open_log(seeds.log_path(args, seed), ["train"]) as log:
            return subprocess.Popen([sys.executable, "-c", code], stdout=log, stderr=subprocess.STDOUT)

    monkeypatch.setattr(seeds, "launch", launch)
    monkeypatch.setattr(seeds, "time", types.SimpleNamespace(sleep=lambda seconds: time.sleep(0.05),
                                                             perf_counter=time.perf_counter))


def test_a_failed_train_is_named_with_the_last_line_of_its_log(tmp_path, monkeypatch, capsys):
    _fake_trains(monkeypatch, "import sys; print('usage: ...'); print('error: argument --epochs: 0 is below 1'); "
                              "sys.exit(2)")
    assert seeds.main(["--model", "mlp", "--seeds", "3", "--out-dir", str(tmp_path)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"seed 3: train exited with 2: error: argument --epochs: 0 is below 1 (see {tmp_path / 'mlp-seed3.log'})"]


def test_a_train_that_ends_without_writing_metrics_is_not_counted_and_an_earlier_json_is_kept(tmp_path, monkeypatch,
                                                                                             capsys):
    # An earlier run of seed 3 left its metrics.json; this train exits 0 and writes nothing.
    (tmp_path / "mlp-seed3" / "mlp").mkdir(parents=True)
    metrics = tmp_path / "mlp-seed3" / "mlp" / "metrics.json"
    metrics.write_text('{"test": {"accuracy": 0.9, "macro_f1": 0.9}, "best_epoch": 1, "epochs_run": 1, '
                       '"seconds_per_epoch": 1.0}')
    earlier = tmp_path / "seeds.json"
    earlier.write_text(json.dumps({"rows": ["earlier"], **seeds.outputs.STAMP}))
    before = earlier.read_text()
    (tmp_path / "mlp-seed3.log").write_text(seeds.outputs.LOG_STAMP + ": an earlier seed 3\n")
    _fake_trains(monkeypatch, "pass")
    assert seeds.main(["--model", "mlp", "--seeds", "3", "--out-dir", str(tmp_path), "--json", str(earlier)]) == 1
    out, err = capsys.readouterr()
    assert err.splitlines() == [f"seed 3: train ended without writing {metrics} (the one there is an earlier run's); "
                                f"see {tmp_path / 'mlp-seed3.log'}", f"{earlier} is not written: no seed finished"]
    assert "0 of 1 seeds finished" in out and earlier.read_text() == before


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
    monkeypatch.setattr(children, "OWN_STOP_S", 0.2)  # no terminal's Ctrl-C reached them: SIGTERM after the grace
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
    children.stop({1: stubborn})
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
              f"children.start_child([sys.executable, '-c', {train!r}, {str(tmp_path / 'train')!r}]); time.sleep(60)")
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
