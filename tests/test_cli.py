"""What the commands share: one-line messages whatever the file names hold, and output under any encoding."""

import io
import os
import sys

import pytest

from fmnist_keras import cli, evaluate, export, predict, train


@pytest.mark.parametrize("text, shown", [
    ("runs/latest/cnn", "runs/latest/cnn"),
    ("caf\u00e9 \u9774.png", "caf\u00e9 \u9774.png"),  # printable letters stay as they are
    ("two\nlines", "two\\nlines"),
    ("tab\tand\rreturn", "tab\\tand\\rreturn"),
    ("\x1b[31mred", "\\x1b[31mred"),  # no terminal escape sequence gets through
    (os.fsdecode(b"caf\xe9"), "caf\\udce9"),  # a byte that is not UTF-8
    ("\u2028", "\\u2028"),  # a Unicode line separator
])
def test_one_line_escapes_what_does_not_print_as_itself(text, shown):
    assert cli.one_line(text) == shown
    assert len(cli.one_line(text).splitlines()) == 1


def test_print_error_is_one_line_on_stderr(capsys):
    cli.print_error(ValueError("no\nsuch file"))
    assert capsys.readouterr() == ("", "error: no\\nsuch file\n")


def test_output_escapes_what_its_encoding_lacks_instead_of_failing(monkeypatch):
    stream = io.TextIOWrapper(io.BytesIO(), encoding="ascii", errors="strict")
    monkeypatch.setattr(sys, "stdout", stream)
    with pytest.raises(UnicodeEncodeError):
        print(os.fsdecode(b"\xff.png"))
    cli.escape_unencodable_output()
    print(os.fsdecode(b"\xff.png"), "\u00e9")
    stream.flush()
    assert stream.buffer.getvalue().endswith(b"\\udcff.png \\xe9\n")


@pytest.mark.parametrize("command, argv", [
    (evaluate, ["{missing}"]),
    (predict, ["{missing}", "{missing}"]),
    (export, ["{missing}", "--format", "onnx", "--output", "{dir}/out.onnx"]),
    (train, ["--data-dir", "{missing}", "--no-verify", "--out-dir", "{dir}/runs", "--epochs", "1", "--no-report"]),
])
def test_every_command_reports_a_name_with_a_newline_in_one_line(command, argv, tmp_path, capsys):
    missing = str(tmp_path / "no\nsuch")
    argv = [arg.format(missing=missing, dir=tmp_path) for arg in argv]
    try:
        code = command.main(argv)
    except SystemExit as exit_info:  # an argparse error
        code = exit_info.code
    err = capsys.readouterr().err
    assert code != 0
    errors = [line for line in err.splitlines() if "error: " in line]
    assert len(errors) >= 1 and all("no\\nsuch" in line for line in errors), err
    assert not any(line.startswith("such") for line in err.splitlines()), err


def test_the_interrupted_line_of_train_is_one_line_whatever_the_run_is_called(capsys):
    from pathlib import Path

    from fmnist_keras.interrupts import Interrupted
    from fmnist_keras.rundir import RunDir

    assert train._interrupted(Interrupted(15), RunDir(Path("runs/two\nlines"))) == 143
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "runs/two\\nlines keeps every completed epoch" in err


def _too_long_a_name(directory) -> str:
    """One name longer than the file system of ``directory`` allows: ENAMETOOLONG, which Path.exists() raises."""
    return "a" * (os.pathconf(directory, "PC_NAME_MAX") + 1)


@pytest.mark.parametrize("command, argv", [
    (train, ["--resume", "{long}"]),
    (train, ["--data-dir", "{long}", "--no-verify", "--out-dir", "{dir}/runs", "--epochs", "1", "--no-report"]),
    (evaluate, ["{long}"]),
    (evaluate, ["{dir}/model.keras", "--out-dir", "{long}"]),
    (predict, ["{dir}/model.keras", "{long}"]),
    (predict, ["{long}", "{long}"]),
    (export, ["{long}", "--format", "onnx", "--output", "{dir}/out.onnx"]),
    (export, ["{dir}/model.keras", "--format", "onnx", "--output", "{long}"]),
])
def test_a_file_system_error_no_check_foresaw_is_one_line_with_a_fix(command, argv, tmp_path, capsys, monkeypatch):
    from fmnist_keras.interrupts import run_command

    monkeypatch.chdir(tmp_path)
    argv = [arg.format(long=_too_long_a_name(tmp_path), dir=tmp_path) for arg in argv]
    name = command.__name__.rsplit(".", 1)[-1]
    # What `python -m fmnist_keras.<command>` runs: train's main, the others' through run_command.
    try:
        code = command.main(argv) if command is train else run_command(lambda: command.main(argv), name)
    except SystemExit as exit_info:  # an argparse error
        code = exit_info.code
    err = capsys.readouterr().err
    assert code != 0 and "Traceback" not in err, err
    (line,) = [line for line in err.splitlines() if "error: " in line]
    assert "aaaa" in line and "too long" in line.lower() and "use a shorter name, then run it again" in line, line
    assert list(tmp_path.iterdir()) == []  # nothing was made on the way


@pytest.mark.parametrize("error, says", [
    (OSError(28, "No space left on device", "runs/x/model.keras"),
     "runs/x/model.keras: No space left on device; free some space or choose another place, then run it again."),
    (OSError(13, "Permission denied", "/srv"), "/srv: Permission denied; choose a place you may read and write"),
    (OSError("libcudnn.so.9: cannot open shared object file"), "libcudnn.so.9: cannot open shared object file; check"),
    (OSError(), "train failed: OSError; check the path"),
    (OSError(28, "No space left on device"),  # a full standard output: the system names no file
     "train failed: No space left on device; free some space or choose another place (its standard output too, "),
])
def test_an_os_error_line_says_what_why_and_a_fix_that_fits(error, says):
    line = cli.os_error_line("train", error)
    assert line.startswith("train cannot use " if error.filename else "train failed: ") and says in line
    assert "\n" not in line


def test_an_os_error_line_ends_with_the_next_step_it_is_given():
    error = OSError(28, "No space left on device", "runs/x/cnn/model.keras")
    line = cli.os_error_line("train", error, then="continue with: python -m fmnist_keras.train --resume runs/x")
    assert line.endswith("free some space or choose another place, then continue with: "
                         "python -m fmnist_keras.train --resume runs/x")


@pytest.mark.parametrize("errno_code", [28, 13, 30])  # ENOSPC, EACCES, EROFS
def test_files_that_must_stay_in_place_get_no_fix_that_moves_them(errno_code):
    error = OSError(errno_code, "reason", "runs/x/cnn/model.keras")
    moved, kept = cli.os_error_line("train", error), cli.os_error_line("train", error, in_place=True)
    assert "another place" in moved or "choose a place" in moved
    assert "place" not in kept and kept.startswith("train cannot use runs/x/cnn/model.keras: reason; ")


def test_a_reader_that_goes_away_ends_a_command_quietly(capsys):
    from fmnist_keras.interrupts import run_command

    def main():
        raise BrokenPipeError(32, "Broken pipe")

    assert run_command(main, "predict") == 1
    assert capsys.readouterr().err == ""


def test_a_failed_write_names_the_file_asked_for_not_its_temporary(tmp_path):
    import errno

    from fmnist_keras import rundir

    target = tmp_path / "figures" / "curves.png"
    target.parent.mkdir()
    with pytest.raises(OSError) as failed:
        with rundir.replacing(target) as (handle, temporary):
            os.close(handle)
            raise OSError(errno.ENOSPC, "No space left on device")  # as a write to a full disk does
    assert failed.value.filename == str(target) and failed.value.errno == errno.ENOSPC
    assert "cannot use " + str(target) in cli.os_error_line("evaluate", failed.value)
    assert list(target.parent.iterdir()) == []  # and no temporary left
    with pytest.raises(FileNotFoundError) as missing:
        with rundir.replacing(tmp_path / "missing" / "x.onnx", prefix=".x.onnx.", suffix=".partial.onnx"):
            pass
    assert missing.value.filename == str(tmp_path / "missing" / "x.onnx")  # not '.x.onnx.XXXX.partial.onnx'

    with pytest.raises(OSError, match="^exporter said no$"):  # a caller's own error keeps its words
        with rundir.replacing(tmp_path / "figures" / "x.png"):
            raise OSError("exporter said no")
