"""A person at a terminal (tmux): `gcroots-query gc > deleted.txt` asks on
the terminal, draws its progress there (percentage, rate, ETA; bytes freed
as they are freed), and leaves the file with the answer alone."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from . import support
from .support import QUERY, Pipeline

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux (scripts/bootstrap)")

SENTENCE = re.compile(r"\d+ store paths deleted, [\d.]+ MiB freed")


class Terminal:
    """One tmux pane, on a tmux server of its own (-L)."""

    def __init__(self, name: str, command: str, cwd: Path):
        self.server = name
        subprocess.run(["tmux", "-L", name, "new-session", "-d", "-s", "t", "-x", "160", "-y",
                        "40", "-c", str(cwd), f"bash -c {shlex.quote(command)}; sleep 600"],
                       check=True, env=dict(os.environ, TERM="xterm-256color"))

    def screen(self) -> str:
        return subprocess.run(["tmux", "-L", self.server, "capture-pane", "-p", "-t", "t"],
                              capture_output=True, text=True, check=True).stdout

    def wait_for(self, pattern: str, timeout: float = 120) -> tuple[re.Match, list[str]]:
        """The first screen that matches, and every screen seen until then."""
        seen = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            seen.append(self.screen())
            if m := re.search(pattern, seen[-1]):
                return m, seen
            time.sleep(0.05)
        raise AssertionError(f"{pattern!r} never showed; last screen:\n{seen[-1]}")

    def type(self, *keys: str) -> None:
        subprocess.run(["tmux", "-L", self.server, "send-keys", "-t", "t", *keys], check=True)

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.server, "kill-server"], capture_output=True)


def test_gc_on_a_terminal_asks_and_shows_progress_there_never_in_stdout(scratch, users,
                                                                         pipelines):
    root = scratch / "store"
    support.make_store(root, paths=2500, seed=121, quirks=0, roots=10, indirect=0, stale=0)
    p = Pipeline(root, scratch / "run")
    pipelines.append(p)
    p.start()
    work = scratch / "work"
    work.mkdir()
    # Through gcrootsd: the answer to a file, the rest on the terminal.
    term = Terminal(f"gcrt-{os.getpid()}-a", f"{QUERY} --socket {p.sock} gc --throttle 0.15 "
                    "> deleted.txt; echo EXIT=$?", work)
    try:
        m, _ = term.wait_for(r"Delete (\d+) store paths, freeing [\d.]+ \S+ on disk\? \[y/N\]")
        plan = term.screen()
        assert re.search(r"freed as Nix counts it\s+[\d.]+ MiB", plan), plan
        assert re.search(r"freed on disk\s+[\d.]+ \S+", plan) and "NAR size" in plan, plan
        assert (work / "deleted.txt").read_bytes() == b""   # the question is not in the answer
        total = int(m[1])
        term.type("y", "Enter")
        # A bar: percentage, done/total, rate, ETA, bytes freed so far.
        bar, screens = term.wait_for(r"deleting:\s+(\d+)%\|.*\| (\d+)/(\d+) \[[\d:]+<[\d:?]+, "
                                     r"[\d.?]+ ?\w* ?paths/s, ([\d.]+) (\w+) freed\]")
        assert int(bar[3]) == total and 0 <= int(bar[2]) < total, bar[0]
        _, screens = term.wait_for(r"EXIT=(\d+)")
        assert "EXIT=0" in screens[-1], screens[-1]
    finally:
        term.close()
    answer = (work / "deleted.txt").read_text()
    assert SENTENCE.match(answer.split("\n")[0]) and "\x1b" not in answer and "\r" not in answer
    assert "Delete" not in answer and "%|" not in answer and "/nix/store/" not in answer, answer
    # The bar moved and counted bytes as they went (not "N of N paths, 0.0 MiB" to the end).
    counts = [int(x) for s in screens for x in re.findall(r"\| (\d+)/\d+ \[", s)]
    assert len(set(counts)) >= 3, counts

    # --standalone, stdout and stderr both redirected: the plan and the
    # question on the terminal, no bar (stderr is none), paths in the file.
    support.make_store(scratch / "other", paths=400, seed=122, quirks=0, roots=5, indirect=0,
                       stale=0)
    term = Terminal(f"gcrt-{os.getpid()}-b",
                    f"{QUERY} --standalone --root {scratch / 'other'} --no-runtime gc "
                    "--print-deleted > deleted.txt 2> errors.txt; echo EXIT=$?", work)
    try:
        term.wait_for(r"Delete \d+ store paths, freeing .* on disk\? \[y/N\]")
        assert "garbage collection plan:" in term.screen()
        term.type("y", "Enter")
        _, screens = term.wait_for(r"EXIT=(\d+)")
        assert "EXIT=0" in screens[-1], screens[-1]
    finally:
        term.close()
    paths = (work / "deleted.txt").read_text().split("\n")[:-1]
    assert paths and all(re.fullmatch(r"/nix/store/[0-9a-z]{32}-.+", x) for x in paths), paths[:3]
    errors = (work / "errors.txt").read_text()
    assert SENTENCE.search(errors) and "%|" not in errors and "Delete" not in errors, errors
    assert "plan" not in errors
