"""Ctrl-C and SIGTERM in the short commands (evaluate, predict, export) and before training: one line, exit
128 + N, clean-ups run."""

import gc
import os
import signal
import sys

import pytest

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


def _lose_a_signal_in_a_gc_callback(signum, went_on: list):
    """As in jax's callback, which Keras imports: the handler's exception cannot leave the callback, and
    Python only reports it as "Exception ignored in: <function callback ...>"; ``went_on`` records whether
    the code after the collection ran."""
    fired = []

    def callback(phase, info):
        if phase == "start" and not fired:
            fired.append(phase)
            os.kill(os.getpid(), signum)
            for _ in range(1000):  # the handler runs here, inside the callback
                pass

    gc.callbacks.append(callback)
    try:
        gc.collect()
        went_on.append("after the collection")
    finally:
        if callback in gc.callbacks:
            gc.callbacks.remove(callback)
    assert fired, "the callback did not run"


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_lost_in_a_garbage_collection_callback_is_raised_at_the_next_call(capsys, signum):
    before, hook, went_on = signal.getsignal(signum), sys.unraisablehook, []

    def main():
        _lose_a_signal_in_a_gc_callback(signum, went_on)
        went_on.append("to the end")
        return 0

    assert run_command(main, "export") == 128 + signum
    name = signal.Signals(signum).name
    assert capsys.readouterr().err == f"export: interrupted ({name}) before it finished; run it again.\n"
    assert went_on == []  # stopped at the first call after the collection, as if the signal had come there
    assert signal.getsignal(signum) is before and sys.unraisablehook is hook and sys.getprofile() is None


def test_a_signal_lost_under_a_profiler_still_ends_the_command(capsys):
    # A profiler (cProfile) holds sys.setprofile: the lost signal is kept, and ends a command that finishes.
    went_on, events = [], []

    def profiler(frame, event, arg):
        events.append(event)

    def main():
        sys.setprofile(profiler)
        try:
            _lose_a_signal_in_a_gc_callback(signal.SIGINT, went_on)
        finally:
            sys.setprofile(None)
        return 0

    assert run_command(main, "export") == 130
    assert capsys.readouterr().err == ("export: interrupted (SIGINT) as it ended; what it wrote is whole, but check "
                                       "it or run it again.\n")
    assert went_on == ["after the collection"] and events  # the profiler was left in place, and ran


def test_train_stopped_by_a_signal_lost_in_a_callback_says_so_in_one_line(monkeypatch, capsys):
    from fmnist_keras import train

    went_on = []

    def main(argv):
        _lose_a_signal_in_a_gc_callback(signal.SIGINT, went_on)
        went_on.append("trained")
        return 0

    monkeypatch.setattr(train, "_main", main)
    assert train.main([]) == 130
    assert capsys.readouterr().err == "Interrupted (SIGINT) before training started; nothing was written.\n"
    assert went_on == [] and sys.getprofile() is None


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
