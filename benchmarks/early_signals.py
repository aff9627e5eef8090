"""One line, not a traceback, for a Ctrl-C or SIGTERM while a benchmark script's own imports load.

Each script run as a program imports this first: from then until
:func:`outputs.run_benchmark` hands the signals to the command's own handling
(:func:`hand_over`), a Ctrl-C or SIGTERM ends the script at once with
``NAME: interrupted (SIGINT) while it started; nothing was written.`` and exit
code 128 + the signal's number. Python's own start-up, before this, is the
same short window as any command's. Imported by anything else (a test that
imports a script), it changes nothing.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_replaced = {}  # signal number: the handler this module replaced


def _stopped(signum, frame) -> None:
    name = Path(sys.argv[0]).name
    os.write(2, f"{name}: interrupted ({signal.Signals(signum).name}) while it started; nothing was written.\n"
             .encode())
    os._exit(128 + signum)  # nothing to clean up yet, and no import's own handler to run through


def _run_as_a_script() -> bool:
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    return main_file is not None and Path(main_file).resolve().parent == Path(__file__).resolve().parent


def hand_over() -> None:
    """Give back the handlers this module replaced, for the command's own handling."""
    for number, handler in list(_replaced.items()):
        if signal.getsignal(number) is _stopped:
            signal.signal(number, handler)
        del _replaced[number]


if _run_as_a_script():
    for _number in SIGNALS:
        if signal.getsignal(_number) is not signal.SIG_IGN:  # a script started with `nohup` or `&` keeps ignoring
            _replaced[_number] = signal.signal(_number, _stopped)
