"""Content-addressed derivations, built by the real Nix 2.8 with
`experimental-features = ca-derivations`: the live and dead sets and the
whole DB after a collection equal what `nix-store --gc` does to an
identical copy, for every keep-derivations/keep-outputs setting; the
Realisations rows go with their paths, crash or not."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from . import support
from .nixbuild import BuiltStore, derivation, remove

CA = "experimental-features = ca-derivations"


def ca_expression() -> str:
    fixed = hashlib.sha256(b"fixed\n").hexdigest()
    drvs = {
        "fod": ('derivation { name = "fod"; system = builtins.currentSystem; builder = "/bin/sh"; '
                'args = [ "-c" "echo fixed > $out" ]; outputHashMode = "flat"; '
                f'outputHashAlgo = "sha256"; outputHash = "{fixed}"; }}'),
        "a": derivation("a", ca=True, lines=50),
        "aTwin": derivation("a", ca=True, lines=50, build_only=["e"]),  # the same output path
        "b": derivation("b", ca=True, refs=["a"], build_only=["fod"], outputs=("out", "dev")),
        "c": derivation("c", ca=True, refs=["b"], build_only=["b.dev"], lines=200),
        "d": derivation("d", ca=False, refs=["c"]),     # input-addressed on top: deferred
        "e": derivation("e", ca=False, lines=10),
        "f": derivation("f", ca=True, refs=["e"]),       # content-addressed on top of it
        "g": derivation("g", ca=True, refs=["a"], lines=300),
    }
    return "rec {\n" + "".join(f"  {k} = {v};\n" for k, v in drvs.items()) + "}\n"


@pytest.fixture(scope="module")
def ca_world():
    """A store built once: roots on d and f (nix-build links), g and aTwin
    built and their links removed (garbage), a stale auto link."""
    top = Path(tempfile.mkdtemp(prefix="gcroots-ca-", dir="/tmp"))
    os.chmod(top, 0o755)
    s = BuiltStore.create(top / "live")
    expr = top / "ca.nix"
    expr.write_text(ca_expression())
    for attr in ("d", "f", "g", "aTwin"):
        s.build(expr, attr, s.top / f"result-{attr}", CA)
    for attr in ("g", "aTwin"):
        remove(s.top / f"result-{attr}")
    pristine = s.copy(top / "pristine")
    yield s, pristine, expr
    subprocess.run(["rm", "-rf", str(top)], check=True)


def settings(kd: bool, ko: bool) -> str:
    return f"{CA}\nkeep-derivations = {str(kd).lower()}\nkeep-outputs = {str(ko).lower()}"


@pytest.mark.parametrize("kd,ko", [(True, False), (True, True), (False, False), (False, True)])
def test_ca_store_collected_as_nix_collects_it(ca_world, kd, ko):
    s, pristine, _ = ca_world
    s.restore(pristine)
    twin = pristine.copy(s.top.parent / "twin")
    config = settings(kd, ko)
    try:
        for what in ("dead", "live"):
            ours = set(s.query(what, config=config).stdout.split())
            nix = set(s.nix_on_copy(twin, "nix-store", "--gc", f"--print-{what}",
                                    config=config).stdout.split())
            assert ours == nix, (what, sorted(ours ^ nix))
        assert s.db_rows()["Realisations"], "the store has no realisations to test with"
        done = json.loads(s.query("gc", "--yes", "--json", config=config).stdout)
        s.nix_on_copy(twin, "nix-store", "--gc", config=config)
        assert done["paths"] > 0
        assert s.entries() == twin.entries()
        assert s.db_rows() == twin.db_rows()
        assert s.foreign_key_problems() == [] == twin.foreign_key_problems()
        s.verify()
    finally:
        subprocess.run(["rm", "-rf", str(twin.top)], check=True)


def test_realisations_go_with_their_paths(ca_world):
    """Everything garbage (no roots): every Realisations and
    RealisationsRefs row goes, as Nix's ON DELETE CASCADE takes them."""
    s, pristine, _ = ca_world
    s.restore(pristine)
    for link in ("result-d", "result-f"):
        remove(s.top / link)
    assert s.db_rows()["RealisationsRefs"]
    s.query("gc", "--yes", config=CA)
    rows = s.db_rows()
    assert rows["ValidPaths"] == rows["Realisations"] == rows["RealisationsRefs"] == []
    assert s.foreign_key_problems() == []
