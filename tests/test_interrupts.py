"""Ctrl-C and SIGTERM in the short commands (evaluate, predict, export): one line, exit 128 + N, clean-ups run."""

import os
import signal

from fmnist_keras.interrupts import run_command


def test_ctrl_c_is_one_line_and_exit_130(capsys):
    def main():
        raise KeyboardInterrupt

    assert run_command(main, "evaluate") == 130
    err = capsys.readouterr().err
    assert err == "evaluate: interrupted (SIGINT) before it finished; run it again.\n"


def test_sigterm_runs_the_clean_ups_and_exits_143(capsys):
    cleaned, before = [], signal.getsignal(signal.SIGTERM)

    def main():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs between bytecodes
                pass
            return 0
        finally:
            cleaned.append("temporary removed")

    assert run_command(main, "export") == 143
    assert cleaned == ["temporary removed"]
    assert capsys.readouterr().err == "export: interrupted (SIGTERM) before it finished; run it again.\n"
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is the caller's again


def test_a_finished_command_keeps_its_exit_code():
    assert run_command(lambda: 3, "predict") == 3


def test_train_stopped_before_training_starts_says_so_in_one_line(monkeypatch, capsys):
    from fmnist_keras import train
    from fmnist_keras.interrupts import Interrupted

    for error, code, name in ((KeyboardInterrupt(), 130, "SIGINT"), (Interrupted(signal.SIGTERM), 143, "SIGTERM")):
        def interrupted(argv, error=error):
            raise error

        monkeypatch.setattr(train, "_main", interrupted)
        assert train.main([]) == code
        assert capsys.readouterr().err == f"Interrupted ({name}) before training started; nothing was written.\n"
