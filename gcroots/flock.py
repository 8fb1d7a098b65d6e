"""flock(LOCK_EX) with a deadline, as Nix's lockFile takes its locks (gc.lock,
a profile's lock): the one lock helper of the daemon and the client."""

from __future__ import annotations

import fcntl
import time


def lock_exclusive(fd: int, deadline: float | None) -> bool:
    """Lock `fd` exclusively by `deadline` (time.monotonic()); True if we
    hold it.  flock has no timeout of its own, so this polls, pausing 10 ms
    at first and up to 200 ms; a deadline already past means one try, None
    waiting as long as it takes."""
    if deadline is None:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return True
    pause = 0.01
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
        time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        pause = min(pause * 2, 0.2)
