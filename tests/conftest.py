from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from . import support


def pytest_configure(config):
    if os.geteuid() != 0:
        raise pytest.UsageError("the test suite must run as root (./scripts/test uses sudo)")
    if not support.MAKE_STORE.exists():
        raise pytest.UsageError(f"{support.MAKE_STORE} is missing: the suite needs ../shared")
    if shutil.which("nix-store") is None:
        raise pytest.UsageError("nix-store is missing: run ./scripts/bootstrap")


@pytest.fixture(scope="session")
def users():
    """Real unprivileged users: two with 0700 homes, the daemon's user, one more."""
    made = {name: support.ensure_user(name) for name in
            (support.ALICE, support.BOB, support.DAEMON_USER, support.CAROL)}
    support.ensure_group(support.ADMIN_GROUP, [support.CAROL])
    return made


@pytest.fixture
def scratch():
    """A world-traversable temp dir (pytest's tmp_path is 0700 under /tmp and
    unprivileged test users must reach stores and sockets inside it)."""
    d = Path(tempfile.mkdtemp(prefix="gcroots-test-", dir="/tmp"))
    os.chmod(d, 0o755)
    yield d
    # rm, not shutil.rmtree: some tests build 10,000-level trees.
    subprocess.run(["rm", "-rf", "--one-file-system", str(d)], check=True)


@pytest.fixture
def pipelines():
    """Pipelines (helper + daemon) a test starts; stopped afterwards."""
    made = []
    yield made
    for p in made:
        p.stop()
