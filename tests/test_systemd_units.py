"""The systemd units: `systemd-analyze verify` has nothing to say (it only
warns on typos, so any stderr fails), and the exposure scores stay at the
targets: helper <= 1.5, gcrootsd <= 0.5."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from .support import REPO, VENV_BIN

UNITS = sorted((REPO / "systemd").iterdir())


@pytest.fixture(scope="module")
def unit_dir(tmp_path_factory) -> Path:
    # ExecStart= must name an existing binary for verify: point it at ours.
    d = tmp_path_factory.mktemp("units")
    for u in UNITS:
        (d / u.name).write_text(u.read_text().replace("/usr/local/bin/", f"{VENV_BIN}/"))
    return d


def test_units_exist():
    names = {u.name for u in UNITS}
    assert {"gcroots-helper.socket", "gcroots-helper.service", "gcroots-helper-nix-roots.socket",
            "gcrootsd.socket", "gcrootsd.service", "gcroots-gc.service",
            "gcroots-gc.timer"} <= names


def test_systemd_analyze_verify_is_silent(unit_dir):
    out = subprocess.run(["systemd-analyze", "verify", "--man=no",
                          *(str(unit_dir / u.name) for u in UNITS)],
                         capture_output=True, text=True, cwd=unit_dir)
    assert out.returncode == 0 and out.stderr == "", out.stderr


@pytest.mark.parametrize("unit,threshold", [("gcroots-helper.service", 15),
                                            ("gcrootsd.service", 5),
                                            ("gcroots-gc.service", 5)])
def test_exposure(unit_dir, unit, threshold):
    out = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager",
                          f"--threshold={threshold}", str(unit_dir / unit)],
                         capture_output=True, text=True, cwd=unit_dir)
    assert out.returncode == 0, out.stdout[-1500:]
    assert "Overall exposure level" in out.stdout


def test_upstream_style_unit_would_fail_the_threshold(unit_dir, tmp_path):
    """The check can fail: a unit with only ExecStart scores 9.6."""
    bare = tmp_path / "bare.service"
    bare.write_text(f"[Service]\nExecStart={VENV_BIN}/gcrootsd\n")
    out = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager",
                          "--threshold=15", str(bare)], capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.returncode != 0


def _settings(unit: str) -> dict[str, str]:
    out = {}
    for line in (REPO / "systemd" / unit).read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and not line.startswith("#"):
            out[key.strip()] = value.strip()
    return out


def test_helper_sees_the_real_tmp_and_homes_read_only():
    """`nix-build -o /tmp/ci-job/result` is an indirect root: with a private
    /tmp the helper would call its link stale (and the helper refuses to scan
    then).  ProtectSystem=strict keeps the real /tmp read-only to it."""
    helper = _settings("gcroots-helper.service")
    assert "PrivateTmp" not in helper
    assert helper["ProtectSystem"] == "strict" and helper["ProtectHome"] == "read-only"
    assert _settings("gcrootsd.service")["ProtectHome"] == "yes"   # the check reads settings
