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
    file-system error that no narrower check caught, with exit code 1.

    A signal's exception raised inside a callback that cannot pass it on is
    lost there, and ``main`` runs on: jax, which Keras imports on every
    backend, registers a garbage-collection callback. Python hands such an
    exception to ``sys.unraisablehook``, where it is kept; a command that
    then ends as if nothing happened (exit code 0) still ends on it, its
    outputs whole or not written (each is renamed into place).
    """
    lost = []

    def on_signal(signum, frame):
        raise Interrupted(signum)

    def keep_a_lost_signal(unraisable):
        if isinstance(unraisable.exc_value, KeyboardInterrupt):
            lost.append(Interrupted.of(unraisable.exc_value))
        else:
            previous_hook(unraisable)

    previous = {number: signal.signal(number, on_signal) for number in (signal.SIGINT, signal.SIGTERM)}
    previous_hook, sys.unraisablehook = sys.unraisablehook, keep_a_lost_signal
    try:
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
        sys.unraisablehook = previous_hook
        for number, handler in previous.items():
            signal.signal(number, signal.SIG_DFL if handler is None else handler)
    if lost and code == 0:  # the command went on to its end; one that failed has said why, in its own line
        print(f"{name}: interrupted ({lost[0]}) as it ended; what it wrote is whole, but check it or run it again.",
              file=sys.stderr)
        return lost[0].exit_code
    return code


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
