"""scripts/install refuses bad requests before touching anything (the
installation itself, its reruns, repairs, both models and --uninstall run
in the real-systemd container: tests/test_container.py)."""

from __future__ import annotations

import os
import subprocess

import pytest

from .support import REPO

INSTALL = REPO / "scripts" / "install"
TOUCHED = ("/opt/gcroots", "/var/lib/gcroots-install", "/etc/default/gcroots",
           "/etc/systemd/system/gcrootsd.service", "/usr/local/bin/gcrootsd")


@pytest.mark.parametrize("args,code,message", [
    (["--frobnicate"], 2, "unknown argument --frobnicate"),
    (["--model", "nixos"], 2, "--model is stock or rootless"),
    (["--model"], 2, "--model needs"),
    (["--model", "stock", "--take-store"], 2, "--take-store is for the rootless model"),
    (["--model", "stock", "--user", "nix"], 2, "--user is for the rootless model"),
    (["--model", "rootless", "--user", "root"], 2, "not root"),
    # This machine runs no systemd: whether nix-daemon runs as root cannot be told.
    (["--take-store"], 1, "cannot tell whether|cannot tell how nix-daemon.service is configured"),
])
def test_refuses_before_touching_anything(args, code, message):
    before = {p: os.path.lexists(p) for p in TOUCHED}
    out = subprocess.run([str(INSTALL), *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == code, out.stderr
    assert any(m in out.stderr for m in message.split("|")), out.stderr
    assert out.stderr.startswith("install: ") and out.stdout == ""
    assert {p: os.path.lexists(p) for p in TOUCHED} == before
