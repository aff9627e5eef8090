"""Ctrl-C and SIGTERM in the short commands (evaluate, predict, export) and before training: one line, exit
128 + N, clean-ups run."""

import os
import signal
import sys

import pytest

from conftest import lose_a_signal_in_a_gc_callback
from fmnist_keras.interrupts import lost_signals_kept, raise_if_lost, run_command


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


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_lost_in_a_garbage_collection_callback_still_ends_the_command(capsys, signum):
    before, hook, went_on = signal.getsignal(signum), sys.unraisablehook, []

    def main():
        lose_a_signal_in_a_gc_callback(signum, went_on)
        return 0

    assert run_command(main, "export") == 128 + signum
    name = signal.Signals(signum).name
    assert capsys.readouterr().err == (f"export: interrupted ({name}) as it ended; what it wrote is whole, but "
                                       f"check it or run it again.\n")
    assert went_on == ["after the collection"]  # the command went on to its end
    assert signal.getsignal(signum) is before and sys.unraisablehook is hook


def test_a_lost_signal_is_raised_at_the_next_safe_point(capsys):
    went_on = []

    def main():
        lose_a_signal_in_a_gc_callback(signal.SIGTERM, went_on)
        raise_if_lost()
        went_on.append("past the safe point")
        return 0

    assert run_command(main, "export") == 143
    assert capsys.readouterr().err == "export: interrupted (SIGTERM) before it finished; run it again.\n"
    assert went_on == ["after the collection"]


def test_a_lost_signal_is_kept_only_inside_the_block():
    before = sys.unraisablehook
    with lost_signals_kept() as lost:
        lose_a_signal_in_a_gc_callback(signal.SIGINT, [])
    assert [stop.signum for stop in lost] == [signal.SIGINT] and sys.unraisablehook is before
    raise_if_lost()  # outside the block: nothing is kept, nothing raised


def test_a_signal_the_command_handled_itself_gives_its_own_line_alone(capsys):
    # benchmarks/distill.py catches the interrupt, says what is left in its own line and returns 130.
    def main():
        try:
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(1000):
                pass
        except KeyboardInterrupt:
            print("distill.py: interrupted (SIGINT); run it again with --overwrite.", file=sys.stderr)
            return 130
        return 0

    assert run_command(main, "distill.py") == 130
    assert capsys.readouterr().err == "distill.py: interrupted (SIGINT); run it again with --overwrite.\n"


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
