"""benchmarks/portability.py: it never writes through a link, and every failure is one line, not a traceback."""

import argparse
import json
import runpy
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))
import portability  # noqa: E402  (benchmarks/portability.py)


def _fake_data(monkeypatch, n=20):
    rng = np.random.default_rng(0)
    x_test, y_test = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n)
    monkeypatch.setattr(portability.fdata, "load_data", lambda data_dir, verify=True: ((None, None), (x_test, y_test)))
    return rng.dirichlet(np.ones(10), n)


def _fake_subprocesses(monkeypatch, probabilities):
    """Each train does nothing; each predict writes ``probabilities`` for every model to its --output."""

    def run(command, env):
        if "predict" in command:
            output = Path(command[command.index("--output") + 1])
            np.savez(output, **{str(i): probabilities for i in range(len(command) - command.index("--output") - 2)})
        return 0.0

    monkeypatch.setattr(portability, "_run", run)


def test_portability_writes_its_json_and_only_into_a_directory_of_its_own(tmp_path, monkeypatch):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "test_images.npy").write_text("the user's file")
    with pytest.raises(argparse.ArgumentTypeError, match="did not write"):
        portability.out_dir_path(str(foreign))
    (tmp_path / "link").symlink_to(foreign)
    with pytest.raises(argparse.ArgumentTypeError, match="symbolic link"):
        portability.out_dir_path(str(tmp_path / "link"))
    assert (foreign / "test_images.npy").read_text() == "the user's file"

    # The whole script with its subprocesses faked: each backend predicts the same probabilities.
    _fake_subprocesses(monkeypatch, _fake_data(monkeypatch))
    out, result = tmp_path / "portability", tmp_path / "result.json"
    for _ in range(2):  # the second run writes into the directory the first made
        assert portability.main(["--backends", "torch", "jax", "--out-dir", str(out), "--json", str(result)]) == 0
    report = json.loads(result.read_text())
    assert report["passed"] and report["worst_max_abs_diff"] == 0.0 and len(report["directions"]) == 2


def test_portability_replaces_a_link_in_its_own_directory_and_never_writes_through_it(tmp_path, monkeypatch):
    _fake_subprocesses(monkeypatch, _fake_data(monkeypatch))
    out, users = tmp_path / "portability", tmp_path / "users"
    out.mkdir()
    users.mkdir()
    names = ("test_images.npy", "predictions-torch.npz", "predictions-jax.npz")
    # The marker as the script writes it: these names are its own, so a link planted under one is replaced.
    (out / portability.MARKER).write_text(json.dumps({"written_by": portability.WRITTEN_BY, "names": names}))
    for name in names:
        (users / name).write_text(f"the user's {name}")
        (out / name).symlink_to(users / name)

    assert portability.main(["--backends", "torch", "jax", "--out-dir", str(out)]) == 0
    for name in names:
        assert (users / name).read_text() == f"the user's {name}"  # untouched
        assert not (out / name).is_symlink() and (out / name).is_file()  # the link replaced by the script's file
    assert np.load(out / "test_images.npy").shape == (20, 28, 28, 1)
    assert [p.name for p in out.iterdir() if "partial" in p.name] == []  # no temporary file left


@pytest.mark.parametrize("backends", [["torch"], ["jax", "jax"]])
def test_portability_refuses_fewer_than_two_backends_when_parsing(backends, capsys):
    with pytest.raises(SystemExit) as stop:
        portability.parse_args(["--backends", *backends])
    assert stop.value.code == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert "names one backend" in line and "pass two or more" in line
    assert portability.parse_args(["--backends", "torch", "jax", "torch"]).backends == ["torch", "jax"]  # control


@pytest.mark.parametrize("below", ["sub", "sub/deeper"])
def test_portability_refuses_an_out_dir_below_a_file_when_parsing(tmp_path, capsys, below):
    (tmp_path / "afile").write_text("the user's file")
    with pytest.raises(SystemExit) as stop:
        portability.parse_args(["--out-dir", str(tmp_path / "afile" / below)])
    assert stop.value.code == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert f"lies below {tmp_path / 'afile'}, which is a file, not a directory" in line
    assert (tmp_path / "afile").read_text() == "the user's file"
    assert portability.parse_args(["--out-dir", str(tmp_path / "new" / below)]).out_dir  # control: a new path


def test_portability_says_in_one_line_which_backend_failed_and_the_childs_last_line(capsys):
    last = "python -m fmnist_keras.train: error: --device gpu: the torch backend sees no GPU."
    child = ("import sys; sys.stderr.write('usage: python -m fmnist_keras.train [-h]\\n' + '    [--option X]\\n' * "
             f"20 + {last!r} + '\\n\\n'); sys.exit(2)")
    command = [sys.executable, "-c", child, "fmnist_keras.train", "--backend", "torch", "--device", "gpu"]
    with pytest.raises(SystemExit) as stop:
        portability._run(command, {})
    assert stop.value.code == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line == (f"error: training under torch failed (exit 2): {last.rstrip('.')}; fix that and run portability.py "
                    f"again, or leave torch out of --backends")


def _run_script(monkeypatch, argv):
    monkeypatch.setattr(sys, "argv", [str(BENCHMARKS / "portability.py"), *argv])
    try:
        runpy.run_path(str(BENCHMARKS / "portability.py"), run_name="__main__")
    except SystemExit as stop:
        return stop.code
    except KeyboardInterrupt:  # would end the test session
        pytest.fail("an interrupt escaped portability.py as a traceback, not run_command's one line")
    pytest.fail("portability.py did not exit")


def test_portability_ends_with_one_line_and_128_plus_the_signal_when_interrupted(tmp_path, monkeypatch, capsys):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(portability.fdata, "load_data", interrupted)  # the module the script runs imports too
    assert _run_script(monkeypatch, ["--backends", "torch", "jax", "--out-dir", str(tmp_path / "out")]) == 130
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("portability.py: interrupted")


def test_portability_refuses_bad_data_in_one_line_before_it_makes_its_directory(tmp_path, monkeypatch, capsys):
    def damaged(*args, **kwargs):
        raise portability.fdata.DataError("the file is damaged; delete it")

    monkeypatch.setattr(portability.fdata, "load_data", damaged)
    out = tmp_path / "out"
    assert _run_script(monkeypatch, ["--backends", "torch", "jax", "--out-dir", str(out)]) == 1
    assert capsys.readouterr().err.splitlines() == ["error: the file is damaged; delete it"]
    assert not out.exists()



@pytest.mark.parametrize("marker", ["", "{}", '{"written_by": "benchmarks/portability.py", "names": ["trained-jax"]}'])
@pytest.mark.parametrize("theirs", ["test_images.npy", "predictions-jax.npz", "trained-torch"])
def test_portability_leaves_a_file_its_marker_does_not_list_alone(tmp_path, monkeypatch, capsys, marker, theirs):
    # A marker made by hand, or one that lists other names, does not make a user's file the script's to replace.
    _fake_subprocesses(monkeypatch, _fake_data(monkeypatch))
    out = tmp_path / "portability"
    out.mkdir()
    (out / portability.MARKER).write_text(marker)
    (out / theirs).write_text("the user's own")
    with pytest.raises(SystemExit) as stop:
        portability.main(["--backends", "torch", "jax", "--out-dir", str(out)])
    assert stop.value.code == 2
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert f"--out-dir {out} holds {theirs}, which its {portability.MARKER} does not list as the script's" in line
    assert "left alone" in line
    assert (out / theirs).read_text() == "the user's own" and (out / portability.MARKER).read_text() == marker


def test_portability_says_in_one_line_on_stderr_when_the_outputs_differ(tmp_path, monkeypatch, capsys):
    probabilities = _fake_data(monkeypatch)

    def run(command, env):  # jax's outputs differ from torch's by 0.01
        if "predict" in command:
            output = Path(command[command.index("--output") + 1])
            shift = 0.01 if "jax" in command else 0.0
            np.savez(output, **{str(i): probabilities + shift * (i == 0) for i in range(2)})
        return 0.0

    monkeypatch.setattr(portability, "_run", run)
    assert portability.main(["--backends", "torch", "jax", "--out-dir", str(tmp_path / "out")]) == 1
    out, err = capsys.readouterr()
    assert "FAIL: worst difference 1.00e-02" in out
    assert err.splitlines() == ["error: a model saved under torch gives softmax outputs 1.00e-02 away from its own "
                                "when loaded under jax, over the 0.0001 tolerance; the table above has every "
                                "direction, and tests/test_portability.py the checks to run"]


def test_portability_stops_its_child_with_sigterm_on_an_interrupt_so_a_train_keeps_its_epochs(tmp_path, monkeypatch):
    import signal

    import children
    from fmnist_keras.interrupts import Interrupted

    # The child writes more than a pipe holds as it stops: with its stderr in a pipe no one reads, it would block.
    child = ("import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: (sys.stderr.write('x' * 200_000), "
             "open(sys.argv[1] + '.signal', 'w').write('SIGTERM'), sys.exit(143))); open(sys.argv[1], 'w')"
             ".write('ready'); time.sleep(60)")
    ready, started, real_start = tmp_path / "child", [], portability.start_child

    def start(command, **kwargs):  # the real start, whose first wait is cut by a SIGTERM to the script
        process = real_start(command, **kwargs)
        real_wait = process.wait

        def wait(timeout=None):
            if timeout is None and len(started) == 1:
                started.append("interrupted")
                while not ready.exists() or not ready.read_text():
                    time.sleep(0.02)
                raise Interrupted(signal.SIGTERM)
            return real_wait(timeout)

        process.wait = wait
        started.append(process)
        return process

    monkeypatch.setattr(portability, "start_child", start)
    monkeypatch.setattr(children, "OWN_STOP_S", 0.1)  # no terminal's Ctrl-C reached the child: SIGTERM after it
    monkeypatch.setattr(children, "STOP_WAIT_S", 20)
    with pytest.raises(Interrupted):
        portability._run([sys.executable, "-c", child, str(ready)], {})
    assert started[0].returncode == 143 and (tmp_path / "child.signal").read_text() == "SIGTERM"
