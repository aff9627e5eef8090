"""How a run is stopped from outside: Ctrl-C (SIGINT) or a scheduler's SIGTERM. No Keras import."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading


class Interrupted(KeyboardInterrupt):
    """Training was stopped by a signal; the exit code is 128 + its number (SIGINT 130, SIGTERM 143)."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @classmethod
    def of(cls, error: KeyboardInterrupt) -> Interrupted:
        """The signal a ``KeyboardInterrupt`` stands for: its own if it is an :class:`Interrupted`, else Ctrl-C."""
        return error if isinstance(error, cls) else cls(signal.SIGINT)


def run_command(main, name: str) -> int:
    """Run a short command's ``main``: Ctrl-C and SIGTERM raise :class:`Interrupted`, so its clean-ups run.

    Ctrl-C or SIGTERM then end the command with one line on stderr and exit
    code 128 + the signal's number, instead of a traceback; so does a
    file-system error that no narrower check caught, with exit code 1. A
    signal lost in a callback still ends it (:func:`lost_signals_kept`).
    """

    def on_signal(signum, frame):
        raise Interrupted(signum)

    previous = {number: signal.signal(number, on_signal) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        with lost_signals_kept() as lost:
            code = main()
    except KeyboardInterrupt as error:
        stop = Interrupted.of(error)
        print(f"{name}: interrupted ({stop}) before it finished; run it again.", file=sys.stderr)
        return stop.exit_code
    except BrokenPipeError:  # the reader went away (`predict ... | head`): nothing more to say, as Unix tools do
        with contextlib.suppress(OSError, ValueError, AttributeError):  # a stdout without a descriptor
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush does not fail again
        return 1
    except OSError as error:
        from fmnist_keras.cli import os_error_line, print_error

        print_error(os_error_line(name, error))
        return 1
    finally:
        for number, handler in previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
    return exit_code_with_lost_signal(code, lost, name)


def exit_code_with_lost_signal(code: int, lost: list[Interrupted], name: str) -> int:
    """``code``, or, for a command that went on to its end (0) although a signal was lost on the way (``lost``,
    from :func:`lost_signals_kept`), one line saying so and 128 + the signal's number. A command that failed
    has said why in its own line."""
    if not lost or code != 0:
        return code
    print(f"{name}: interrupted ({lost[0]}) as it ended; what it wrote is whole, but check it or run it again.",
          file=sys.stderr)
    return lost[0].exit_code


# The signals each open lost_signals_kept block has kept, innermost last (blocks nest: train inside a notebook's).
_KEPT: list[list[Interrupted]] = []


@contextlib.contextmanager
def lost_signals_kept():
    """Keep a signal's exception that a callback could not pass on, for :func:`raise_if_lost` and
    :func:`exit_code_with_lost_signal`.

    jax, which Keras imports on every backend, registers a garbage-collection
    callback. A Ctrl-C or SIGTERM whose handler runs inside it raises there,
    and Python only reports the exception ("Exception ignored in ...", through
    ``sys.unraisablehook``) and goes on. Inside the block that hook keeps the
    signal instead. Nothing is raised at that moment: the command acts on it at
    its next safe point (:func:`raise_if_lost`), or when it ends
    (:func:`exit_code_with_lost_signal`).

    Yields the list of the signals kept, each an :class:`Interrupted`.
    """
    lost: list[Interrupted] = []

    def keep(unraisable):
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            lost.append(Interrupted.of(unraisable.exc_value))
        else:
            previous_hook(unraisable)

    previous_hook, sys.unraisablehook = sys.unraisablehook, keep
    _KEPT.append(lost)
    try:
        yield lost
    finally:
        del _KEPT[next(index for index, kept in enumerate(_KEPT) if kept is lost)]  # by identity: lists compare equal
        sys.unraisablehook = previous_hook


def raise_if_lost() -> None:
    """Raise, as :class:`Interrupted`, the first signal :func:`lost_signals_kept` has kept so far, if any.

    For the points of a long command where a signal's exception may be raised
    as if it had come there: between its stages, outside any block that must
    not stop halfway.
    """
    if _KEPT and _KEPT[-1]:
        raise Interrupted(_KEPT[-1][0].signum)


@contextlib.contextmanager
def deferred():
    """Hold Ctrl-C (SIGINT) and SIGTERM back while the block runs, then deliver the first that came.

    For work that must not stop halfway, such as removing an old run: a
    signal that arrives inside takes effect, through the handler in place
    before, when the block ends. Only the main thread can set handlers; in
    another thread the block runs as it is. Blocks nest.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []

    def hold(signum, frame):
        received.append(signum)

    previous = {number: signal.signal(number, hold) for number in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        if received:
            signal.raise_signal(received[0])
