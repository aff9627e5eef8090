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

from fmnist_keras import interrupts

# How long the children may take to end on a Ctrl-C that reached them too, and after the script's SIGTERM.
OWN_STOP_S = 10
STOP_WAIT_S = 60
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>: the signal a process gets when its parent ends


def start_train(command: list[str], **popen_kwargs) -> subprocess.Popen:
    """``subprocess.Popen(command)``, and on Linux a process that gets SIGTERM when this one ends, however it ends
    (``PR_SET_PDEATHSIG``; SIGTERM lets ``train`` keep its completed epochs)."""
    if not sys.platform.startswith("linux"):
        return subprocess.Popen(command, **popen_kwargs)
    parent, prctl = os.getpid(), ctypes.CDLL(None, use_errno=True).prctl

    def end_with_parent():  # runs in the child, between fork and exec
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the script ended before the line above: nothing would stop this train
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
