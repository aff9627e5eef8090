"""`train` against careless input: odd run names, foreign directories, damaged run files, signals, locks.

Every case ends in one line on stderr and a non-zero exit code, and nothing
that fmnist_keras did not create is ever removed.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

from conftest import lose_a_signal_in_a_gc_callback
from fmnist_keras import train
from fmnist_keras.engine import evaluation, fit
from fmnist_keras.engine.callbacks import read_history
from fmnist_keras.rundir import MARKER, RunDir, RunDirError

BASE = ["--model", "mlp", "--epochs", "2", "--batch-size", "32", "--no-report"]


def _train(tmp_path, data_dir, *extra, out="runs"):
    return train.main(["--data-dir", str(data_dir), "--no-verify", "--out-dir", str(tmp_path / out), *BASE, *extra])


def _one_line_error(capsys, *fragments) -> str:
    """The one error line on stderr (argparse's usage lines aside), checked for ``fragments``."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("error:") or ": error: " in line]
    for fragment in fragments:
        assert fragment in line, err
    return line


def _files(directory):
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*"))


# --- data loss: run names and --overwrite ---------------------------------------------------


@pytest.mark.parametrize("name", ["", ".", "..", "../x", "a/b", "/abs", ".hidden", "latest", "x" * 101, "a\nb"])
def test_a_run_name_that_is_not_one_plain_component_is_refused(tmp_path, tiny_data_dir, capsys, name):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "older-run").mkdir()
    (tmp_path / "precious.txt").write_text("keep")
    before = _files(tmp_path)
    assert _train(tmp_path, tiny_data_dir, "--run-name", name, "--overwrite") == 2
    _one_line_error(capsys, "is not a plain directory name")
    assert _files(tmp_path) == before


def test_a_run_name_that_exists_is_refused_before_the_data_is_read(tmp_path, capsys):
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    (tmp_path / "runs" / "taken" / MARKER).write_text("{}")  # a run of train's
    missing = tmp_path / "no-data-here"  # were the data read first, this would be the error
    assert _train(tmp_path, missing, "--run-name", "taken") == 2
    _one_line_error(capsys, "run directory", "taken already exists", "--overwrite")
    assert _train(tmp_path, missing, "--run-name", "free") != 0  # the control: a free name gets to the data
    _one_line_error(capsys, "no-data-here")
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["taken"]


def test_overwrite_leaves_a_directory_it_did_not_create(tmp_path, tiny_data_dir, capsys):
    foreign = tmp_path / "runs" / "mine"
    foreign.mkdir(parents=True)
    (foreign / "thesis.tex").write_text("years of work")
    assert _train(tmp_path, tiny_data_dir, "--run-name", "mine", "--overwrite") == 2
    _one_line_error(capsys, "was not created by fmnist_keras", MARKER)
    assert (foreign / "thesis.tex").read_text() == "years of work"


def test_overwrite_never_follows_a_symlink(tmp_path, tiny_data_dir, capsys, finished_run):
    link = tmp_path / "runs" / "alias"
    link.symlink_to(finished_run, target_is_directory=True)
    before = _files(finished_run)
    assert _train(tmp_path, tiny_data_dir, "--run-name", "alias", "--overwrite") == 2
    _one_line_error(capsys, "is a symbolic link")
    assert link.is_symlink() and _files(finished_run) == before


def test_overwrite_refuses_a_file_where_the_run_directory_belongs(tmp_path, tiny_data_dir, capsys):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "notes").write_text("a file")
    assert _train(tmp_path, tiny_data_dir, "--run-name", "notes", "--overwrite") == 2
    _one_line_error(capsys, "is not a directory")
    assert (tmp_path / "runs" / "notes").read_text() == "a file"


def _in_the_way(out, how):
    """Make ``out/x`` a run directory's obstacle: a directory, a link, a file, or a directory of someone else's."""
    out.mkdir()
    if how == "a link":
        (out / "x").symlink_to(out.parent, target_is_directory=True)
    elif how == "a file":
        (out / "x").write_text("mine")
    else:
        (out / "x").mkdir()
        if how == "a run":
            (out / "x" / MARKER).write_text("{}")


@pytest.mark.parametrize("how, overwrite, says", [
    ("a run", False, "already exists; choose another --out-dir or pass --overwrite."),
    ("a link", True, "is a symbolic link"),
    ("a file", True, "is not a directory"),
    ("a file", False, "is not a directory"),  # not "or pass --overwrite", which would not remove it either
    ("a foreign directory", True, "was not created by fmnist_keras"),
    ("a foreign directory", False, "was not created by fmnist_keras"),
])
def test_a_command_that_names_its_runs_itself_is_told_to_choose_another_out_dir(tmp_path, how, overwrite, says):
    out = tmp_path / "runs"
    _in_the_way(out, how)
    before = _files(tmp_path)
    for attempt in (lambda **kw: RunDir.check_new(str(out), "x", overwrite, **kw),
                    lambda **kw: RunDir.create(str(out), "x", ["mlp"], overwrite, **kw)):
        with pytest.raises(RunDirError) as refused:
            attempt(elsewhere="another --out-dir")
        assert says in str(refused.value) and "another --out-dir" in str(refused.value)
        assert "--run-name" not in str(refused.value)
        with pytest.raises(RunDirError, match="another --run-name"):  # train's default
            RunDir.check_new(str(out), "x", overwrite)
    assert _files(tmp_path) == before


def test_overwrite_of_the_working_directory_is_refused(tmp_path, tiny_data_dir, capsys, finished_run, monkeypatch):
    monkeypatch.chdir(finished_run / "mlp")
    assert _train(tmp_path, tiny_data_dir, "--run-name", "run", "--overwrite") == 2
    _one_line_error(capsys, "holds the working directory")
    assert (finished_run / "mlp" / "model.keras").is_file()


def test_overwrite_happens_only_after_the_data_is_checked(tmp_path, tiny_data_dir, capsys, finished_run):
    (tiny_data_dir / "t10k-labels-idx1-ubyte.gz").write_bytes(b"garbage")
    before = _files(finished_run)
    assert _train(tmp_path, tiny_data_dir, "--run-name", "run", "--overwrite") == 1
    _one_line_error(capsys)
    assert _files(finished_run) == before


def test_sigterm_while_overwrite_removes_the_old_run_waits_for_a_whole_new_run(tmp_path, tiny_data_dir, capsys,
                                                                              finished_run, monkeypatch):
    """The signal comes halfway through the removal; it takes effect once the new run directory is whole."""
    from fmnist_keras import rundir

    (finished_run / "mlp" / "figures").mkdir(exist_ok=True)
    real_rmtree = rundir.shutil.rmtree

    def rmtree_then_sigterm(path, *args, **kwargs):
        real_rmtree(path, *args, **kwargs)
        signal.raise_signal(signal.SIGTERM)  # delivered in the middle of the removal

    monkeypatch.setattr(rundir.shutil, "rmtree", rmtree_then_sigterm)
    monkeypatch.setattr(fit.keras.Model, "fit", lambda *args, **kwargs: pytest.fail("fit ran"))
    assert _train(tmp_path, tiny_data_dir, "--run-name", "run", "--overwrite") == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "Interrupted (SIGTERM)" in err and f"--resume {finished_run}" in err and "nothing was written" not in err
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["latest", "run"]  # no .removing-* left
    assert (finished_run / MARKER).is_file() and (finished_run / "mlp" / "config.json").is_file()
    assert not (finished_run / "mlp" / "model.keras").exists()  # the old run is gone, the new one is resumable


def test_what_a_killed_overwrite_left_is_removed_only_when_it_is_the_projects(tmp_path):
    out = tmp_path / "runs"
    out.mkdir()
    leftover = out / ".removing-old-999999999"  # no such pid
    (leftover / "mlp").mkdir(parents=True)
    (leftover / MARKER).write_text("{}")
    (leftover / "mlp" / "model.keras").write_text("half of an old run")
    unmarked = out / ".removing-mine-999999999"
    unmarked.mkdir()
    (unmarked / "notes.txt").write_text("keep")
    live = out / f".removing-busy-{os.getpid()}"
    live.mkdir()
    (live / MARKER).write_text("{}")
    odd = []
    for name in (".removing-x-99999999999999999999", ".removing-x-\u00b2", ".removing-linked-999999999"):
        odd.append(out / name)  # a pid no process can have, digits that are not ASCII, a marker that is a link
        odd[-1].mkdir()
        (odd[-1] / "notes.txt").write_text("keep")
    (odd[0] / MARKER).write_text("{}")
    (odd[1] / MARKER).write_text("{}")
    (odd[2] / MARKER).symlink_to(leftover / MARKER)
    RunDir.create(str(out), "new", ["mlp"])
    assert sorted(p.name for p in out.iterdir()) == sorted([live.name, unmarked.name, "new", *(p.name for p in odd)])
    assert (unmarked / "notes.txt").read_text() == "keep" and all((p / "notes.txt").is_file() for p in odd)


def test_a_leftover_another_process_removes_or_that_cannot_be_removed_is_left_alone(tmp_path, monkeypatch):
    from fmnist_keras import rundir

    out = tmp_path / "runs"
    held, stuck = out / ".removing-held-999999999", out / ".removing-stuck-999999998"
    for leftover in (held, stuck):
        (leftover / "mlp").mkdir(parents=True)
        (leftover / MARKER).write_text("{}")
    real_rmtree = rundir.shutil.rmtree

    def rmtree(path, *args, **kwargs):
        if stuck in Path(path).parents:
            raise PermissionError(1, "Operation not permitted", str(path))
        real_rmtree(path, *args, **kwargs)

    monkeypatch.setattr(rundir.shutil, "rmtree", rmtree)
    with rundir._locked(held / rundir.LOCK, what=held):  # as a second process removing it would hold it
        RunDir.create(str(out), "new", ["mlp"])
    assert sorted(p.name for p in out.iterdir()) == sorted([held.name, stuck.name, "new"])
    assert (held / MARKER).is_file() and (stuck / MARKER).is_file()


@pytest.mark.parametrize("swapped_for", ["a link", "a directory"])
def test_a_run_swapped_before_its_removal_is_never_locked_in_the_users_directory(tmp_path, monkeypatch, swapped_for):
    # The old run is checked, then swapped for a link to a user's directory, or for the directory itself (a
    # rename), before the removal takes its lock: the lock must not be created, or a user's file of that name
    # truncated, in the user's directory.
    from contextlib import contextmanager

    from fmnist_keras import rundir

    out, mine = tmp_path / "runs", tmp_path / "mine"
    RunDir.create(str(out), "run", ["mlp"])
    mine.mkdir()
    (mine / rundir.LOCK).write_text("my notes\n")
    real_deferred = rundir.interrupts.deferred

    @contextmanager
    def swapped_first():
        (out / "run").rename(tmp_path / "moved-run")
        if swapped_for == "a link":
            (out / "run").symlink_to(mine)
        else:
            mine.rename(out / "run")
        with real_deferred():
            yield

    monkeypatch.setattr(rundir.interrupts, "deferred", swapped_first)
    says = "became a symbolic link" if swapped_for == "a link" else "no longer holds its .fmnist_keras-run marker"
    with pytest.raises(RunDirError, match=says):
        RunDir.create(str(out), "run", ["mlp"], overwrite=True)
    users = mine if swapped_for == "a link" else out / "run"
    assert (users / rundir.LOCK).read_text() == "my notes\n" and sorted(p.name for p in users.iterdir()) == [".lock"]
    assert (tmp_path / "moved-run" / MARKER).is_file()


def test_a_signal_lost_while_the_data_loads_stops_train_before_anything_is_written(tmp_path, tiny_data_dir,
                                                                                  monkeypatch, capsys):
    # Lost in jax's garbage-collection callback, as Keras imports jax on every backend: train acts on it once
    # the data is loaded, instead of training to the end.
    from fmnist_keras import data as fdata

    load_data = fdata.load_data

    def loaded_while_a_signal_is_lost(*args, **kwargs):
        lose_a_signal_in_a_gc_callback(signal.SIGINT, [])
        return load_data(*args, **kwargs)

    monkeypatch.setattr(fdata, "load_data", loaded_while_a_signal_is_lost)
    assert _train(tmp_path, tiny_data_dir, "--run-name", "run") == 130
    assert capsys.readouterr().err == "Interrupted (SIGINT) before training started; nothing was written.\n"
    assert not (tmp_path / "runs" / "run").exists()


def test_a_signal_lost_while_a_model_trains_stops_train_before_its_result_is_written(tmp_path, tiny_data_dir,
                                                                                    monkeypatch, capsys):
    fit_model = fit.fit_model

    def fitted_while_a_signal_is_lost(*args, **kwargs):
        result = fit_model(*args, **kwargs)
        lose_a_signal_in_a_gc_callback(signal.SIGTERM, [])
        return result

    monkeypatch.setattr(fit, "fit_model", fitted_while_a_signal_is_lost)
    assert _train(tmp_path, tiny_data_dir, "--run-name", "run") == 143
    run = tmp_path / "runs" / "run"
    assert capsys.readouterr().err == (f"Interrupted (SIGTERM); {run} keeps every completed epoch. Continue with: "
                                       f"python -m fmnist_keras.train --resume {run}\n")
    assert (run / "mlp" / "model.keras").is_file() and not (run / "mlp" / "metrics.json").exists()
    monkeypatch.setattr(fit, "fit_model", fit_model)
    assert train.main(["--resume", str(run)]) == 0 and (run / "mlp" / "metrics.json").is_file()


def test_an_overwrite_that_cannot_remove_the_old_run_is_one_line(tmp_path, tiny_data_dir, capsys, finished_run,
                                                                monkeypatch):
    from fmnist_keras import rundir

    def rmtree(path, *args, **kwargs):
        raise PermissionError(1, "Operation not permitted", str(path))

    monkeypatch.setattr(rundir.shutil, "rmtree", rmtree)
    assert _train(tmp_path, tiny_data_dir, "--run-name", "run", "--overwrite") == 2
    _one_line_error(capsys, "could not remove all of the old run", ".removing-run-", "remove it yourself")


@pytest.mark.parametrize("inside", ["figures/curves.png", "backup/latest.weights.h5.bkp", "tensorboard/train"])
def test_resume_never_writes_through_a_link_inside_the_models_directories(finished_run, tmp_path, capsys, inside):
    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    (finished_run / "mlp" / "metrics.json").unlink()
    link = finished_run / "mlp" / inside
    link.parent.mkdir(exist_ok=True)
    link.symlink_to(victim)
    assert train.main(["--resume", str(finished_run)]) == 1
    _one_line_error(capsys, str(link), "is a symbolic link")
    assert victim.read_text() == "mine"


@pytest.mark.parametrize("file, field, value", [
    ("fit.json", "best_epoch", 10**400), ("fit.json", "train_time_s", 10**400), ("fit.json", "epochs_run", 10**6),
    ("metrics.json", "wall_time_s", 10**400),
])
def test_resume_of_a_run_file_with_a_number_no_float_holds_is_one_line(finished_run, capsys, file, field, value):
    if file == "fit.json":
        (finished_run / "mlp" / "metrics.json").unlink()
    path = finished_run / "mlp" / file
    data = json.loads(path.read_text())
    data[field] = value
    path.write_text(json.dumps(data))
    assert train.main(["--resume", str(finished_run)]) == 1
    _one_line_error(capsys, str(path), "is damaged")


def test_resume_refuses_a_config_json_of_another_model(finished_run, capsys, monkeypatch):
    for name in ("metrics.json", "fit.json"):
        (finished_run / "mlp" / name).unlink()
    config = finished_run / "mlp" / "config.json"
    config.write_text(config.read_text().replace('"model": "mlp"', '"model": "baseline-cnn"'))
    monkeypatch.setattr(fit.keras.Model, "fit", lambda *args, **kwargs: pytest.fail("fit ran"))
    assert train.main(["--resume", str(finished_run)]) == 1
    _one_line_error(capsys, str(config), "configures 'baseline-cnn'", "directory of 'mlp'")
    assert not (finished_run / "baseline-cnn").exists()


def test_a_relative_data_dir_is_saved_absolute_so_resume_works_from_anywhere(tmp_path, tiny_data_dir, monkeypatch):
    monkeypatch.chdir(tiny_data_dir.parent)
    assert train.main(["--data-dir", tiny_data_dir.name, "--no-verify", "--out-dir", str(tmp_path / "runs"),
                       "--run-name", "rel", *BASE]) == 0
    config = json.loads((tmp_path / "runs" / "rel" / "mlp" / "config.json").read_text())
    assert config["data_dir"] == str(tiny_data_dir)
    (tmp_path / "runs" / "rel" / "mlp" / "metrics.json").unlink()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert train.main(["--resume", str(tmp_path / "runs" / "rel")]) == 0


@pytest.mark.parametrize("out_dir, message", [
    ("", "--out-dir is empty; pass a directory for the runs"),
    ("blocker", "--out-dir blocker is a file, not a directory; choose another --out-dir."),
    ("blocker/below", "--out-dir blocker/below lies below blocker, which is a file, not a directory; choose another "
                      "--out-dir."),
    ("dangling", "--out-dir dangling is a symbolic link to nothing (or a loop of links), not a directory; fix the "
                 "link or choose another --out-dir."),
    ("loop", "--out-dir loop is a symbolic link to nothing (or a loop of links), not a directory; fix the link or "
             "choose another --out-dir."),
    ("dangling/below", "--out-dir dangling/below lies below dangling, which is a symbolic link to nothing (or a loop "
                       "of links), not a directory; fix the link or choose another --out-dir."),
])
def test_an_out_dir_that_cannot_hold_runs_is_one_line(tmp_path, tiny_data_dir, capsys, out_dir, message, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "blocker").write_text("a file")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    from fmnist_keras import data

    monkeypatch.setattr(data, "load_data", lambda *args, **kwargs: pytest.fail("the data was read first"))
    argv = ["--data-dir", str(tiny_data_dir), "--no-verify", "--out-dir", out_dir, *BASE]
    assert train.main(argv) == 2
    _one_line_error(capsys, message)
    assert (tmp_path / "blocker").read_text() == "a file"


def test_an_empty_data_dir_is_a_usage_error_not_the_current_directory(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        train.main(["--data-dir", "", "--out-dir", str(tmp_path)])
    assert info.value.code == 2
    _one_line_error(capsys, "argument --data-dir: expected a path, got an empty string")
    assert list(tmp_path.iterdir()) == []


def test_default_run_names_are_unique_within_one_second(tmp_path):
    runs = [RunDir.create(str(tmp_path), None, ["mlp"]) for _ in range(3)]
    assert len({run.path for run in runs}) == 3
    assert all((run.path / MARKER).is_file() for run in runs)


# --- --resume of damaged, odd or busy run directories ---------------------------------------


@pytest.mark.parametrize("given", ["", ".", "..", "missing", "a-file"])
def test_resume_of_a_path_that_is_no_run_directory_is_one_line(tmp_path, capsys, given, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a-file").write_text("x")
    assert train.main(["--resume", given]) == 1
    _one_line_error(capsys, "--resume")


def test_resume_never_writes_into_a_directory_train_did_not_create(finished_run, capsys):
    (finished_run / MARKER).unlink()
    (finished_run / "mlp" / "metrics.json").unlink()  # so --resume would have work to do
    (finished_run / "mlp" / "report.md").write_text("my notes")
    before = _files(finished_run)
    assert train.main(["--resume", str(finished_run)]) == 1
    _one_line_error(capsys, "has no .fmnist_keras-run marker", "start a new run")
    assert _files(finished_run) == before and (finished_run / "mlp" / "report.md").read_text() == "my notes"


@pytest.mark.parametrize("made_by, fix", [
    ("benchmarks/distill.py", "; run benchmarks/distill.py again with --overwrite."),
    ("benchmarks/ablation.py", "; run benchmarks/ablation.py again, which replaces its runs."),  # it has no --overwrite
])
def test_resume_refuses_a_run_another_command_made_and_trains_its_own_way(finished_run, capsys, made_by, fix):
    assert json.loads((finished_run / "run.json").read_text()) == {"models": ["mlp"]}  # train's own: no made_by
    (finished_run / "mlp" / "metrics.json").unlink()  # so --resume would have work to do
    (finished_run / "run.json").write_text(json.dumps({"models": ["mlp"], "made_by": made_by}))
    before = _files(finished_run)
    assert train.main(["--resume", str(finished_run)]) == 1
    assert _one_line_error(capsys, f"{made_by} made this run").endswith(fix)
    assert _files(finished_run) == before


def test_a_run_made_by_another_command_says_so_in_its_run_file(tmp_path):
    run = RunDir.create(str(tmp_path), "student", ["cnn"], made_by="benchmarks/distill.py")
    assert json.loads((run.path / "run.json").read_text()) == {"models": ["cnn"], "made_by": "benchmarks/distill.py"}
    assert run.made_by() == "benchmarks/distill.py" and RunDir.create(str(tmp_path), "own", ["cnn"]).made_by() is None
    with pytest.raises(ValueError, match="not one of"):  # a command the refusal would have no true fix for
        RunDir.create(str(tmp_path), "other", ["cnn"], made_by="my-script.py")
    assert not (tmp_path / "other").exists()


def test_resume_of_a_finished_run_without_its_report_says_how_to_write_it(finished_run, capsys):
    assert train.main(["--resume", str(finished_run)]) == 0  # trained with --no-report
    out = capsys.readouterr().out
    assert "already finished, kept as it is" in out
    assert f"write one with: python -m fmnist_keras.evaluate {finished_run / 'mlp'}" in out


def test_a_latest_link_of_the_users_own_is_left_alone(tmp_path, tiny_data_dir):
    runs, elsewhere = tmp_path / "runs", tmp_path / "elsewhere"
    runs.mkdir()
    elsewhere.mkdir()
    (runs / "latest").symlink_to(elsewhere)
    assert _train(tmp_path, tiny_data_dir, "--run-name", "a", "--epochs", "1") == 0
    assert os.readlink(runs / "latest") == str(elsewhere)
    (runs / "latest").unlink()
    (runs / "notes.txt").write_text("mine")
    (runs / "latest").symlink_to("notes.txt")  # a sibling, but not a run: the user's own
    assert _train(tmp_path, tiny_data_dir, "--run-name", "b", "--epochs", "1") == 0
    assert os.readlink(runs / "latest") == "notes.txt"
    (runs / "latest").unlink()
    (runs / "latest").symlink_to("a")  # train's own kind of link: replaced by the next run
    assert _train(tmp_path, tiny_data_dir, "--run-name", "c", "--epochs", "1") == 0
    assert os.readlink(runs / "latest") == "c"
    (runs / "latest").unlink()
    (runs / "latest").symlink_to("gone")  # to a run since removed: replaced too
    assert _train(tmp_path, tiny_data_dir, "--run-name", "d", "--epochs", "1") == 0
    assert os.readlink(runs / "latest") == "d"


def test_where_the_latest_link_cannot_be_made_a_warning_says_so_and_the_run_goes_on(tmp_path, capsys, monkeypatch):
    import errno
    import pathlib

    def refuse(self, *args, **kwargs):
        raise OSError(errno.EPERM, "Operation not permitted", str(self))

    run = RunDir.create(str(tmp_path / "runs"), "a", ["mlp"])
    # A file system without symlinks (exFAT, vfat, SMB), and one where the link is made but cannot be renamed.
    for method in ("symlink_to", "replace"):
        with monkeypatch.context() as patched:
            patched.setattr(pathlib.Path, method, refuse)
            run.point_latest_here()
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "warning: could not point" in err and "Operation not permitted" in err
        assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["a"]  # no link, no temporary left
    run.point_latest_here()  # the control: where links work, the link is made
    assert os.readlink(tmp_path / "runs" / "latest") == "a"


def test_a_run_directory_that_cannot_be_written_is_one_line_and_taken_back(tmp_path, monkeypatch):
    import errno

    from fmnist_keras import rundir

    real_write_json = rundir.write_json

    def disk_full_at_run_json(path, data):
        if path.name == rundir.RUN_FILE:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_write_json(path, data)

    (tmp_path / "runs").mkdir()
    monkeypatch.setattr(rundir, "write_json", disk_full_at_run_json)
    with pytest.raises(RunDirError, match="cannot write the run directory .*No space left on device.*free some space"):
        RunDir.create(str(tmp_path / "runs"), "a", ["mlp"])
    assert list((tmp_path / "runs").iterdir()) == []  # not an unmarked directory that --overwrite would refuse


def test_a_full_disk_while_the_run_is_set_up_is_one_line_that_says_how_to_reuse_its_name(tmp_path, tiny_data_dir,
                                                                                         capsys, monkeypatch):
    import errno

    from fmnist_keras.config import TrainConfig

    def disk_full(config, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    with monkeypatch.context() as patched:
        patched.setattr(TrainConfig, "save", disk_full)
        assert _train(tmp_path, tiny_data_dir, "--run-name", "setup") == 2
    _one_line_error(capsys, "config.json: No space left on device; free some space, then run it again with "
                    "--run-name setup --overwrite, which reuses", "(it holds no epoch yet).")
    assert _train(tmp_path, tiny_data_dir, "--run-name", "setup", "--overwrite", "--epochs", "1") == 0  # it does


def test_a_full_disk_during_training_is_one_line_with_the_resume_command(tmp_path, tiny_data_dir, capsys, monkeypatch):
    import errno

    def disk_full(run, config, splits, facts):
        raise OSError(errno.ENOSPC, "No space left on device", str(run.model_file(config.model)))

    monkeypatch.setattr(evaluation, "final_metrics", disk_full)
    assert _train(tmp_path, tiny_data_dir, "--run-name", "full", "--epochs", "1") == 1
    line = _one_line_error(capsys, "model.keras: No space left on device; free some space, then continue the run "
                           "from its last completed epoch with:")
    assert line.endswith(f"python -m fmnist_keras.train --resume {tmp_path / 'runs' / 'full'}")
    assert (tmp_path / "runs" / "full" / "mlp" / "config.json").is_file()  # the run is there to resume


DAMAGE = {
    "run.json": ["", "{", "[]", '{"models": "mlp"}', '{"models": ["../../etc"]}', "NaN",
                 '{"models": ["mlp", "evil"]}', '{"models": ["mlp", "mlp"]}', '{"models": ["mlp"], "made_by": 5}',
                 '{"models": ["mlp"], "made_by": "rm -rf ~"}', '{"models": ["mlp"], "made_by": "two\\nlines"}'],
    "mlp/config.json": ["", "{", '{"model": "mlp", "epochs": "many"}', '{"model": "mlp", "surprise": 1}',
                        '{"model": "resnet"}', '{"model": "mlp", "batch_size": -5}'],
    "mlp/history.csv": ["epoch,loss\nzero,x\n", "\x00\x01\x02", "epoch,val_loss\n3,0.5\n"],
    "mlp/fit.json": ["", "{}", '{"epochs_run": "two"}', '{"epochs_run": 2, "train_time_s": 1, "terminated_on_nan": true}',
                     '{"epochs_run": 2, "train_time_s": 1, "terminated_on_nan": false, "nan_epoch": null, '
                     '"best_epoch": [1, 2]}',
                     '{"epochs_run": 2, "train_time_s": 1, "terminated_on_nan": false, "nan_epoch": null, '
                     '"best_epoch": 2, "wall_time_s": "x"}'],
    "mlp/metrics.json": ["", "[1, 2]", '{"test": {"accuracy": "high"}}', '{"test": {"accuracy": 0.5}}',
                         '{"test": {"accuracy": 0.5, "macro_f1": "x", "loss": 1}, "model": 5}'],
}


@pytest.mark.parametrize("file, content", [(f, c) for f, contents in DAMAGE.items() for c in contents])
def test_resume_of_a_damaged_run_file_is_one_line_naming_it(finished_run, capsys, file, content):
    (finished_run / "mlp" / "metrics.json").unlink()  # so --resume has work to do
    if file != "mlp/fit.json":
        (finished_run / "mlp" / "fit.json").unlink()
    (finished_run / file).write_text(content)
    assert train.main(["--resume", str(finished_run)]) == 1
    _one_line_error(capsys, str(finished_run / file))


_FIT = '{"epochs_run": 2, "train_time_s": 1, "terminated_on_nan": false, "nan_epoch": null, '


@pytest.mark.parametrize("file, content, says", [
    ("fit.json", "[1, 2]", "a JSON list, not an object"),
    ("fit.json", "{}", "epochs_run is missing; expected an epoch count"),
    ("fit.json", '{"epochs_run": 2, "train_time_s": 1, "terminated_on_nan": true}',
     "best_epoch is missing; expected an epoch number or null"),
    ("fit.json", _FIT + '"best_epoch": [1, 2]}', "best_epoch is [1, 2]; expected an epoch number or null"),
    ("fit.json", _FIT + '"best_epoch": 2, "wall_time_s": "x"}', "wall_time_s is 'x'; expected a number of seconds"),
    ("metrics.json", '{"test": {"accuracy": 0.5, "macro_f1": 1, "loss": 1}, "model": 5}',
     "epochs_run is missing; expected an epoch count"),
    ("metrics.json", '{"test": {"accuracy": 0.5, "macro_f1": "x", "loss": 1}, "model": "mlp", ' + _FIT[1:]
     + '"best_epoch": 2, "wall_time_s": 3}', "test.macro_f1 is 'x'; expected a number"),
])
def test_a_damaged_fit_or_metrics_field_is_named_with_what_it_should_be(finished_run, capsys, file, content, says):
    (finished_run / "mlp" / "metrics.json").unlink()
    if file == "metrics.json":
        (finished_run / "mlp" / "fit.json").unlink()
    (finished_run / "mlp" / file).write_text(content)
    assert train.main(["--resume", str(finished_run)]) == 1
    _one_line_error(capsys, f"{finished_run / 'mlp' / file} is damaged: {says}; delete")


def test_resume_with_damaged_backup_metadata_is_one_line(finished_run, capsys):
    for name in ("metrics.json", "fit.json"):
        (finished_run / "mlp" / name).unlink()
    backup = finished_run / "mlp" / "backup"
    backup.mkdir()
    (backup / "training_metadata.json").write_text('{"epoch": "late"}')
    assert train.main(["--resume", str(finished_run)]) == 1
    _one_line_error(capsys, "training_metadata.json", "delete")


@pytest.mark.parametrize("backed_up, history_kept, logged", [(7, True, 2), (1, False, 0)])
def test_resume_with_a_backup_ahead_of_the_history_is_refused_before_training(finished_run, capsys, monkeypatch,
                                                                              backed_up, history_kept, logged):
    for name in ("metrics.json", "fit.json", *(() if history_kept else ("history.csv",))):
        (finished_run / "mlp" / name).unlink()
    backup = finished_run / "mlp" / "backup"
    backup.mkdir()
    (backup / "training_metadata.json").write_text(f'{{"epoch": {backed_up}, "batch": -1}}')
    h5py.File(backup / "latest.weights.h5", "w").close()  # whole: the backup is damaged by its epoch count alone
    before = {path: path.read_bytes() for path in (finished_run / "mlp").rglob("*") if path.is_file()}
    monkeypatch.setattr(fit.keras.Model, "fit", lambda *args, **kwargs: pytest.fail("fit ran"))
    assert train.main(["--resume", str(finished_run)]) == 1
    line = _one_line_error(capsys, "training_metadata.json does not match", "history.csv",
                           f"holds {backed_up} epochs", f"logs {logged}", "delete")
    assert "from its first epoch" in line
    assert {path: path.read_bytes() for path in (finished_run / "mlp").rglob("*") if path.is_file()} == before


def test_resume_with_a_truncated_model_file_is_one_line(finished_run, capsys):
    (finished_run / "mlp" / "metrics.json").unlink()
    model = finished_run / "mlp" / "model.keras"
    model.write_bytes(model.read_bytes()[:300])
    assert train.main(["--resume", str(finished_run)]) == 1
    _one_line_error(capsys, "model.keras")


def test_a_second_process_is_refused_a_run_directory_in_use(finished_run, capsys):
    (finished_run / "mlp" / "metrics.json").unlink()
    with RunDir(finished_run).lock():
        assert train.main(["--resume", str(finished_run)]) == 1
    _one_line_error(capsys, "is in use by pid", str(os.getpid()))
    with RunDir(finished_run).lock():
        with pytest.raises(RunDirError, match="in use by"):
            with RunDir(finished_run).lock():
                pass


# --- a finished fit is never trained again ---------------------------------------------------


def test_resume_after_the_last_epoch_goes_straight_to_the_final_evaluation(finished_run, capsys, monkeypatch):
    mlp = finished_run / "mlp"
    (mlp / "metrics.json").unlink()  # killed during the final evaluation
    record = json.loads((mlp / "fit.json").read_text())
    # Keys of fit.json never stand in for what the evaluation computes.
    (mlp / "fit.json").write_text(json.dumps({**record, "test": "x", "model": 5, "num_params": "many"}))
    history, model = (mlp / "history.csv").read_bytes(), (mlp / "model.keras").read_bytes()
    monkeypatch.setattr(fit, "fit_model", lambda *a, **k: pytest.fail("a finished fit was trained again"))
    assert train.main(["--resume", str(finished_run)]) == 0
    assert "all its epochs are done; evaluating it" in capsys.readouterr().out
    assert (mlp / "history.csv").read_bytes() == history and (mlp / "model.keras").read_bytes() == model
    metrics = json.loads((mlp / "metrics.json").read_text())
    assert metrics["epochs_run"] == 2 and metrics["model"] == "mlp" and isinstance(metrics["num_params"], int)
    assert 0 <= metrics["test"]["accuracy"] <= 1


def test_ctrl_c_during_the_final_evaluation_prints_a_resume_command_that_is_true(finished_run, capsys, monkeypatch):
    mlp = finished_run / "mlp"
    (mlp / "metrics.json").unlink()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(evaluation, "final_metrics", interrupted)
        assert train.main(["--resume", str(finished_run)]) == 130
    err = capsys.readouterr().err
    assert f"python -m fmnist_keras.train --resume {finished_run}" in err and "Traceback" not in err
    assert train.main(["--resume", str(finished_run)]) == 0  # the printed command works
    assert (mlp / "metrics.json").is_file()


def test_ctrl_c_before_training_starts_exits_130_quietly(tmp_path, tiny_data_dir, capsys, monkeypatch):
    from fmnist_keras import data as fdata

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fdata, "load_data", interrupted)
    assert _train(tmp_path, tiny_data_dir) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("\n") == 1 and "--resume" not in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_sigterm_stops_at_a_batch_end_says_how_to_resume_and_exits_143(tmp_path, tiny_data_dir):
    argv = ["--data-dir", str(tiny_data_dir), "--no-verify", "--out-dir", str(tmp_path), "--run-name", "run",
            "--model", "mlp", "--epochs", "50", "--batch-size", "8", "--patience", "50", "--no-report"]
    process = subprocess.Popen([sys.executable, "-m", "fmnist_keras.train", *argv], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    history = tmp_path / "run" / "mlp" / "history.csv"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and process.poll() is None and len(read_history(history)) < 1:
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 143, err[-3000:]
    assert "Traceback" not in err and f"--resume {tmp_path / 'run'}" in err.strip().splitlines()[-1]
    assert (tmp_path / "run" / "mlp" / "model.keras").is_file()


# --- links planted inside a run directory are never followed -------------------------------


def test_a_lock_that_is_a_symlink_never_touches_its_target(finished_run, tmp_path, capsys):
    (finished_run / "mlp" / "metrics.json").unlink()
    user_file = tmp_path / "user.txt"
    user_file.write_text("DATA")
    (finished_run / ".lock").unlink(missing_ok=True)
    (finished_run / ".lock").symlink_to(user_file)
    assert train.main(["--resume", str(finished_run)]) == 1
    _one_line_error(capsys, "is a symbolic link")
    assert user_file.read_text() == "DATA"


@pytest.mark.parametrize("planted", ["mlp", "mlp/backup", "mlp/history.csv"])
def test_a_linked_model_directory_or_run_file_is_refused_and_its_target_kept(finished_run, tmp_path, capsys, planted):
    (finished_run / "mlp" / "metrics.json").unlink()
    (finished_run / "mlp" / "fit.json").unlink()
    target = tmp_path / "users-own"
    if planted == "mlp":
        (finished_run / "mlp").rename(target)
    else:
        target.mkdir() if planted.endswith("backup") else target.write_text("epoch,val_loss\n")
        if (finished_run / planted).exists():
            (finished_run / planted).unlink()
    (finished_run / planted).symlink_to(target)
    before = _files(target) if target.is_dir() else target.read_text()
    assert train.main(["--resume", str(finished_run)]) == 1
    _one_line_error(capsys, "is a symbolic link")
    assert (_files(target) if target.is_dir() else target.read_text()) == before


def test_an_interrupt_once_the_run_directory_exists_prints_a_true_resume_command(tmp_path, tiny_data_dir, capsys,
                                                                                  monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fit, "fit_model", interrupted)
    assert _train(tmp_path, tiny_data_dir, "--run-name", "run") == 130
    err = capsys.readouterr().err
    assert f"--resume {tmp_path / 'runs' / 'run'}" in err and "nothing was written" not in err
    monkeypatch.undo()
    assert train.main(["--resume", str(tmp_path / "runs" / "run")]) == 0  # config.json was written at once
    assert (tmp_path / "runs" / "run" / "mlp" / "metrics.json").is_file()


def test_resume_uses_the_runs_device_unless_asked_otherwise(finished_run, monkeypatch):
    from fmnist_keras import backend

    asked = []
    real = backend.select_backend
    monkeypatch.setattr(backend, "select_backend", lambda name, device: asked.append(device) or real(name, "cpu"))
    config = json.loads((finished_run / "mlp" / "config.json").read_text())
    (finished_run / "mlp" / "config.json").write_text(json.dumps({**config, "device": "cpu"}))
    (finished_run / "mlp" / "metrics.json").unlink()
    assert train.main(["--resume", str(finished_run)]) == 0
    (finished_run / "mlp" / "metrics.json").unlink()
    assert train.main(["--resume", str(finished_run), "--device", "auto"]) == 0
    assert asked == ["cpu", "auto"]


def test_private_temporary_files_are_made_ordinary_by_descriptor_never_through_a_link(tmp_path):
    import stat
    import tempfile

    from fmnist_keras import rundir

    victim = tmp_path / "victim.txt"
    victim.write_text("mine")
    victim.chmod(0o600)
    handle, name = tempfile.mkstemp(dir=tmp_path)
    os.unlink(name)
    os.symlink(victim, name)  # a link put in the temporary file's place
    try:
        rundir.make_ordinary(handle)
    finally:
        os.close(handle)
    assert stat.S_IMODE(victim.stat().st_mode) == 0o600
    os.chmod(name, 0o644)  # the control: a change of mode by name follows the link
    assert stat.S_IMODE(victim.stat().st_mode) == 0o644
    umask = os.umask(0)
    os.umask(umask)
    rundir.write_text(tmp_path / "run.json", "{}")
    assert stat.S_IMODE((tmp_path / "run.json").stat().st_mode) == 0o666 & ~umask


def test_a_closed_stdout_trains_the_run_and_exits_0(tmp_path, tiny_data_dir):
    # `train >&-`: sys.stdout is None, so Keras's own messages (EarlyStopping's "Restoring model weights
    # from the end of the best epoch") must stay off, as the progress bar does.
    argv = ["--model", "mlp", "--epochs", "2", "--patience", "1", "--no-verify", "--no-report", "--data-dir",
            str(tiny_data_dir), "--out-dir", str(tmp_path / "runs"), "--run-name", "closed"]
    out = subprocess.run([sys.executable, "-m", "fmnist_keras.train", *argv], stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: os.close(1), timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    assert (tmp_path / "runs" / "closed" / "mlp" / "metrics.json").is_file()


def test_a_validation_split_that_leaves_a_class_empty_names_the_flags_given(tmp_path, tiny_data_dir, capsys):
    with pytest.raises(SystemExit) as info:
        _train(tmp_path, tiny_data_dir, "--val-split", "0.001")
    assert info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("python -m fmnist_keras.train: error: --val-split 0.001: class 0 has ")
    assert "None" not in last
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_resume_of_a_run_whose_config_splits_no_data_names_its_config(finished_run, capsys):
    config = finished_run / "mlp" / "config.json"
    (finished_run / "mlp" / "metrics.json").unlink()
    config.write_text(config.read_text().replace('"val_split": 0.1', '"val_split": 0.001'))
    assert '"val_split": 0.001' in config.read_text()
    assert train.main(["--resume", str(finished_run)]) == 1
    _one_line_error(capsys, f"{config} (val_split 0.001) does not split this data: class 0 has ")


def test_main_gives_back_the_callers_ctrl_c_handler_after_a_rank_ignored_it(monkeypatch):
    # A torchrun rank that lost its peers ignores Ctrl-C and SIGTERM while it leaves; a caller in the same
    # process (a notebook) must get both back.
    before = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}

    def stopped_like_a_rank_that_lost_its_peers(argv):
        for number in before:
            signal.signal(number, signal.SIG_IGN)
        return 1

    monkeypatch.setattr(train, "_main", stopped_like_a_rank_that_lost_its_peers)
    assert train.main([]) == 1
    assert {number: signal.getsignal(number) for number in before} == before


@pytest.mark.parametrize("header, says, mend", [
    ("epoch,accuracy,loss,my_note,val_accuracy,val_loss", "(my_note is not logged); remove the column my_note from "
     "every line, or move it away to start", None),
    ("epoch,accuracy,loss,val_loss", "(val_accuracy is missing); make its first line "
     "epoch,accuracy,loss,val_accuracy,val_loss again", None),
    ("", "has the columns (none: a blank line), but", "epoch,accuracy,loss,val_accuracy,val_loss\n"),
])
def test_resume_refuses_a_history_whose_columns_were_changed_before_anything_of_an_epoch_is_written(
        finished_run, capsys, header, says, mend):
    mlp = finished_run / "mlp"
    for name in ("metrics.json", "fit.json"):  # stopped before its first backup: resumed from its first epoch
        (mlp / name).unlink()
    (mlp / "history.csv").write_text(header + "\n")
    model = (mlp / "model.keras").read_bytes()
    assert train.main(["--resume", str(finished_run)]) == 1
    line = _one_line_error(capsys, f"{mlp / 'history.csv'} has the columns ", "but this training logs "
                                   "epoch,accuracy,loss,val_accuracy,val_loss", says)
    assert "delete" not in line  # no backup to delete
    assert (mlp / "history.csv").read_text() == header + "\n"  # no row under the wrong columns
    assert (mlp / "model.keras").read_bytes() == model  # nor a checkpoint of the refused epoch
    (mlp / "history.csv").write_text(mend or "epoch,accuracy,loss,val_accuracy,val_loss\n")  # as the line says
    assert train.main(["--resume", str(finished_run)]) == 0
    assert len(read_history(mlp / "history.csv")) == json.loads((mlp / "metrics.json").read_text())["epochs_run"]


def test_resume_adds_the_line_end_a_hand_written_header_lacks_so_the_first_row_is_not_glued_to_it(finished_run):
    mlp = finished_run / "mlp"
    for name in ("metrics.json", "fit.json"):
        (mlp / name).unlink()
    (mlp / "history.csv").write_text("epoch,accuracy,loss,val_accuracy,val_loss")
    assert train.main(["--resume", str(finished_run)]) == 0
    history = read_history(mlp / "history.csv")
    epochs = json.loads((mlp / "metrics.json").read_text())["epochs_run"]
    assert [row["epoch"] for row in history] == list(range(epochs))


def test_the_column_check_names_the_backup_to_delete_when_there_is_one(tmp_path):
    from fmnist_keras.engine.callbacks import SameHistoryColumns

    (tmp_path / "history.csv").write_text("epoch,loss,val_loss,extra\n")
    (tmp_path / "backup").mkdir()
    check = SameHistoryColumns(tmp_path / "history.csv", tmp_path / "backup")
    check.on_train_begin()
    with pytest.raises(RunDirError, match=r"\(extra is not logged\); remove the column extra from every line, or move "
                                          rf"it away and delete {tmp_path / 'backup'} to train that model again"):
        check.on_epoch_end(0, {"loss": 1.0, "val_loss": 2.0})
    check.on_epoch_end(1, {"other": 1.0})  # checked once, at the first epoch


def test_a_peer_lost_at_the_final_barrier_is_the_one_line_of_a_lost_replica(tmp_path, tiny_data_dir, capsys,
                                                                             monkeypatch):
    # Rank 0 of 2 whose peer leaves after the weight digests, in the barrier before the process group closes:
    # gloo's error there is the lost-replica line with the resume command, not a traceback.
    from fmnist_keras.engine import distributed

    gloo_closed = RuntimeError("[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection "
                               "closed by peer [127.0.0.1]:29533")
    replicas = distributed.Replicas("torchrun", 0, 2, ("rank0:cpu", "rank1:cpu"), "gloo")
    barriers = []

    def barrier_of_a_lost_peer(replicas, in_step=True):
        barriers.append(in_step)
        if in_step:
            raise gloo_closed

    monkeypatch.setattr(distributed, "setup", lambda *args: replicas)
    monkeypatch.setattr(distributed, "same_on_every_rank", lambda replicas, message: message)
    monkeypatch.setattr(fit, "fit_model", lambda *args, **kwargs: fit.FitResult(None, [], {}))
    monkeypatch.setattr(distributed, "replica_digests", lambda model, replicas: ["same", "same"])
    monkeypatch.setattr(distributed, "shutdown", barrier_of_a_lost_peer)
    assert _train(tmp_path, tiny_data_dir, "--run-name", "run") == 1
    run = tmp_path / "runs" / "run"
    _one_line_error(capsys, "rank 0 of 2 stopped training (RuntimeError: [/__w/pytorch/pytorch/third_party/gloo/",
                    f"{run} keeps every completed epoch; once the cause is fixed, continue with: "
                    f"python -m fmnist_keras.train --resume {run}")
    assert barriers == [True, False]  # then left open for train.end_process
    assert not (run / "mlp" / "metrics.json").exists()
