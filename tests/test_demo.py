"""The README's main-job command, end to end: scripts/demo.py builds a store
with the real Nix, runs the helper as root and gcrootsd as user 'gcroots',
checks its answers against `nix-store --gc --print-dead`, collects, verifies
the store, and cleans up after itself."""

from __future__ import annotations

import glob
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_demo_runs_end_to_end_and_cleans_up():
    before = set(glob.glob("/tmp/gcroots-demo-*"))
    alice_existed = user_exists("gcroots-demo-alice")
    out = subprocess.run([sys.executable, str(REPO / "scripts/demo.py")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    report = out.stdout
    for section in ("gcroots-query roots", "gcroots-query dead", "gcroots-query why",
                    "gcroots-query cost", "gcroots-query gc --yes", "gcroots-query stats"):
        assert f"== {section}" in report, section
    # The demo's own cross-checks (its notes are word-wrapped): equal to
    # Nix 2.8, a clean store after gc, the private result link's path kept,
    # and without the helper the daemon's user would call live paths garbage.
    words = " ".join(report.split())
    assert ": identical." in words, report
    assert "nix-store --verify --check-contents: clean" in words, report
    assert "the webapp is still here: True" in words, report
    blind = re.search(r"(\d+) live paths, alice's webapp among them, would be called garbage", words)
    assert blind and int(blind.group(1)) > 0, report
    assert set(glob.glob("/tmp/gcroots-demo-*")) == before, "demo left its directory behind"
    # It removes only the users it created itself.
    assert user_exists("gcroots-demo-alice") == alice_existed


def user_exists(name: str) -> bool:
    return subprocess.run(["id", name], capture_output=True).returncode == 0
