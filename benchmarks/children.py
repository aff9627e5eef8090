"""A benchmark's child processes (``train``, a prediction worker): started so that they end with the script,
and stopped so that a ``train`` keeps its completed epochs.

Shared by ``seeds.py`` and ``portability.py``. Importing this does not import Keras.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import time
from typing import BinaryIO

from fmnist_keras import interrupts

# How long the children may take to end on a Ctrl-C that reached them too, and after the script's SIGTERM.
OWN_STOP_S = 10
STOP_WAIT_S = 60
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>: the signal a process gets when its parent ends


def start_child(command: list[str], **popen_kwargs) -> subprocess.Popen:
    """``subprocess.Popen(command)``, and on Linux a process that gets SIGTERM when this one ends, however it ends
    (``PR_SET_PDEATHSIG``; SIGTERM lets ``train`` keep its completed epochs)."""
    if not sys.platform.startswith("linux"):
        return subprocess.Popen(command, **popen_kwargs)
    parent, prctl = os.getpid(), ctypes.CDLL(None, use_errno=True).prctl

    def end_with_parent():  # runs in the child, between fork and exec
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the script ended before the line above: nothing would stop this child
            os._exit(128 + signal.SIGTERM)

    return subprocess.Popen(command, preexec_fn=end_with_parent, **popen_kwargs)


def stop(running: dict, grace: float = 0.0) -> None:
    """End each child still running (the values of ``running``): wait ``grace`` seconds for those that a
    terminal's Ctrl-C reached with the script (one process group) to end on their own, then SIGTERM the rest (a
    ``train`` keeps its completed epochs, for ``--resume``), and SIGKILL what has not ended :data:`STOP_WAIT_S`
    later."""
    with interrupts.deferred():  # a second Ctrl-C waits until every child has ended
        for wait_s, send in ((grace, subprocess.Popen.terminate), (STOP_WAIT_S, subprocess.Popen.kill)):
            deadline = time.perf_counter() + wait_s
            for process in running.values():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=max(0.0, deadline - time.perf_counter()))
            for process in running.values():
                if process.poll() is None:
                    send(process)
        for process in running.values():
            process.wait()


@contextlib.contextmanager
def stopping(running: dict):
    """Around the whole life of the children the block puts in ``running`` (each put there inside
    ``interrupts.deferred()``, so that none starts unknown to it): on Ctrl-C or SIGTERM each still running is
    given :data:`OWN_STOP_S` to end on its own, then stopped (:func:`stop`) and the interrupt goes on; after any
    other end of the block each is stopped at once."""
    try:
        yield running
    except KeyboardInterrupt:
        stop(running, grace=OWN_STOP_S)
        raise
    finally:  # after any other error too, no child goes on alone
        stop(running)


def last_line(file: BinaryIO) -> str:
    """The last line with text among the last 4 KiB of a child's output, ``file`` (open for reading bytes)."""
    file.seek(max(0, os.fstat(file.fileno()).st_size - 4096))
    lines = [line.strip() for line in file.read().decode(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else ""
