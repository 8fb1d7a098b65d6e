"""The person at the terminal: prompts and progress bars.  Both go to the
terminal (stderr, or /dev/tty), never to stdout, which carries only the
answer: `gcroots-query gc > deleted.txt` asks on the terminal and leaves
the file with the answer alone."""

from __future__ import annotations

import sys
import threading

from gcroots.protocol.admin import Progress

from .format import human

# What each phase of long work counts (the bar's unit).
_UNITS = {"scan": "roots", "load": "paths", "plan": "paths", "check": "paths",
          "measure": "paths", "delete": "paths", "links": "files", "profiles": "generations",
          "roots": "links"}


def interactive() -> bool:
    """Whether a person can answer: stdin is a terminal."""
    return sys.stdin.isatty()


def confirm(question: str, progress: "ProgressBar | None" = None) -> bool:
    """Ask `question [y/N]` on the terminal (/dev/tty; stderr and stdin if
    there is none); True only for y or yes."""
    if progress is not None:
        progress.close()
    try:
        tty = open("/dev/tty", "r+", encoding="utf-8", errors="replace")
    except OSError:
        tty = None
    out, answer_from = (tty, tty) if tty is not None else (sys.stderr, sys.stdin)
    try:
        out.write(f"{question} [y/N] ")
        out.flush()
        answer = answer_from.readline()
    finally:
        if tty is not None:
            tty.close()
    return answer.strip().lower() in ("y", "yes")


class ProgressBar:
    """One bar on stderr for the phase of work in progress -- percentage,
    rate and ETA when its total is known, a count and rate otherwise --
    fed Progress events (from gcrootsd, or from work in this process, from
    any thread).  Silent unless stderr is a terminal."""

    def __init__(self, enabled: bool | None = None) -> None:
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self._bar = None
        self._key: tuple[str, str] | None = None
        self._lock = threading.Lock()

    def __call__(self, p: Progress) -> None:
        if not self.enabled:
            return
        with self._lock:
            if self._key != (p.phase, p.message if not p.phase else ""):
                self._close()
                self._open(p)
            bar = self._bar
            if p.total and bar.total != p.total:
                bar.total = p.total
            if p.bytes:
                bar.set_postfix_str(f"{human(p.bytes)} freed", refresh=False)
            if p.done > bar.n:
                bar.update(p.done - bar.n)
            else:
                bar.refresh()

    def _open(self, p: Progress) -> None:
        from tqdm import tqdm  # the client's alone: the helper never imports it
        self._key = (p.phase, p.message if not p.phase else "")
        self._bar = tqdm(total=p.total or None, desc=p.message or p.phase,
                         unit=" " + _UNITS.get(p.phase, "items"), file=sys.stderr, leave=False,
                         dynamic_ncols=True, mininterval=0.2, smoothing=0.1,
                         bar_format=None if p.phase else "{desc} ({elapsed})")

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
            self._key = None

    def close(self) -> None:
        """Remove the bar (before a prompt, an answer or an error)."""
        with self._lock:
            self._close()

    def __enter__(self) -> "ProgressBar":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
