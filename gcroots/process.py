"""How the helper and the daemon stop: SIGINT, SIGTERM (systemd's stop) or
a closed output pipe end them with one line, never a traceback.
Standard library only (the helper imports it)."""

from __future__ import annotations

import os
import signal
import sys
from typing import Callable


def stop_on_signals() -> None:
    """SIGTERM like SIGINT: a KeyboardInterrupt in the main thread that
    names the signal (gcroots.log sends SIGTERM when stderr is closed)."""
    def interrupt(signum, _frame):
        raise KeyboardInterrupt(signal.Signals(signum).name)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, interrupt)


def stopped_by(e: KeyboardInterrupt) -> str:
    return e.args[0] if e.args else "SIGINT"


def run_main(prog: str, main: Callable[[], int]) -> int:
    """main(), ended by a signal or EPIPE (`| head`) in one line."""
    try:
        return main()
    except KeyboardInterrupt as e:
        sys.stderr.write(f"{prog}: stopped by {stopped_by(e)}\n")
        return 130
    except BrokenPipeError:   # whoever read our output is gone
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.stderr.write(f"{prog}: output closed (EPIPE)\n")
        return 1
