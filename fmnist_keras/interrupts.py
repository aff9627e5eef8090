"""How a run is stopped from outside: Ctrl-C (SIGINT) or a scheduler's SIGTERM. No Keras import."""

from __future__ import annotations

import signal


class Interrupted(KeyboardInterrupt):
    """Training was stopped by a signal; the exit code is 128 + its number (SIGINT 130, SIGTERM 143)."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum
