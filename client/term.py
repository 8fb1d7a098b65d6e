"""The person at the terminal: prompts and progress bars.  Both go to the
terminal (the prompt to the one stdin reads from, the bars to stderr when it
is one), never to stdout, which carries only the answer: `gcroots-query gc >
deleted.txt` asks on the terminal and leaves the file with the answer
alone."""

from __future__ import annotations

import os
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


def confirm(question: str, context: str = "") -> bool:
    """Ask `question [y/N]`, after `context` (the plan it is about), on the
    terminal that answers: stdin's (written through its own device, so
    that neither a redirected stdout nor a redirected stderr gets it); True
    only for y or yes."""
    prompt = f"{context}{question} [y/N] ".encode()
    try:
        tty = open(os.ttyname(sys.stdin.fileno()), "wb", buffering=0)
    except (OSError, ValueError):
        tty = None
    try:
        if tty is not None:
            tty.write(prompt)
        else:
            sys.stderr.buffer.write(prompt)
            sys.stderr.flush()
        answer = sys.stdin.readline()
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
            if self._key != self._key_of(p):
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

    @staticmethod
    def _key_of(p: Progress) -> tuple:
        """A new bar for a new phase, and when numbers first come (a phase
        without any -- scanning -- shows its time only)."""
        return p.phase, p.message if not p.phase else "", bool(p.total or p.done)

    def _open(self, p: Progress) -> None:
        from tqdm import tqdm  # the client's alone: the helper never imports it
        self._key = self._key_of(p)
        self._bar = tqdm(total=p.total or None, desc=p.message or p.phase,
                         unit=" " + _UNITS.get(p.phase, "items"), file=sys.stderr, leave=False,
                         dynamic_ncols=True, mininterval=0.2, smoothing=0.1,
                         bar_format=None if self._key[2] else "{desc}... ({elapsed})")

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
