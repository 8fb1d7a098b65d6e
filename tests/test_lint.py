"""The checkout is the package, and it is clean: ruff (the rule set in
pyproject.toml) over the tree, mypy --strict on the protocols and the helper
(pyproject.toml's [tool.mypy]).  A finding fails the suite."""

from __future__ import annotations

import re
import subprocess
import tomllib

from .support import REPO, VENV_BIN


def _run(*cmd: str, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_ruff_finds_nothing():
    out = _run(str(VENV_BIN / "ruff"), "check", "--no-cache", ".")
    assert out.returncode == 0, out.stdout + out.stderr


def test_ruff_check_can_fail(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os\n")
    out = _run(str(VENV_BIN / "ruff"), "check", "--no-cache", "--config",
               str(REPO / "pyproject.toml"), str(bad))
    assert out.returncode == 1 and "F401" in out.stdout, out


def test_mypy_strict_on_protocol_and_helper_finds_nothing():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mypy"]
    assert config["strict"] and set(config["packages"]) == {"gcroots.protocol", "gcroots.helper"}
    out = _run(str(VENV_BIN / "mypy"), "--no-incremental")
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_check_can_fail(tmp_path):
    (tmp_path / "untyped.py").write_text("def f(x):\n    return x\n")
    out = _run(str(VENV_BIN / "mypy"), "--no-incremental", "--strict", "untyped.py",
               cwd=tmp_path)
    assert out.returncode == 1 and "no-untyped-def" in out.stdout, out


def test_a_checkout_is_the_package():
    """From the repository root, with the system's Python (no venv, no
    install), every sub-package imports from the folder the design names."""
    code = ("import sys, gcroots.protocol, gcroots.helper, gcroots.daemon, gcroots.client\n"
            "print(sys.prefix)\n"
            "for m in (gcroots.protocol, gcroots.helper, gcroots.daemon, gcroots.client):\n"
            "    print(m.__file__)\n")
    out = _run("/usr/bin/python3", "-s", "-E", "-c", code)
    assert out.returncode == 0, out.stderr
    prefix, *files = out.stdout.splitlines()
    assert prefix == "/usr"
    root = REPO / tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"][
        "package-dir"][""]
    for package, file in zip(("protocol", "helper", "daemon", "client"), files):
        assert file == str(REPO / "gcroots" / package / "__init__.py")
        # ... which is the folder pyproject.toml builds the wheel from
        assert (REPO / "gcroots" / package).resolve() == (root / "gcroots" / package).resolve() \
            == REPO / package


def test_architecture_names_only_files_there_are():
    """ARCHITECTURE.md's map of who owns what stays true to the tree."""
    text = (REPO / "ARCHITECTURE.md").read_text()
    named = set(re.findall(r"`((?:gcroots|protocol|helper|daemon|client|tests|nix|scripts|systemd)"
                           r"/[\w./-]*)`", text))
    assert len(named) > 30
    assert [name for name in sorted(named) if not (REPO / name).exists()] == []
