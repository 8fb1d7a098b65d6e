"""Stores built by the real Nix 2.8 (content-addressed derivations too), and
Nix collecting an identical copy of one.

The store is a private one whose logical and physical dirs are the same
(NIX_STORE_DIR, NIX_STATE_DIR), so that Nix can build in it.  Its paths
name its directory, so the copy Nix collects is mounted over the original
in a private mount namespace (`unshare -m`): same paths, other bytes.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
from dataclasses import dataclass
from pathlib import Path

from . import support

BASE_CONFIG = "substituters =\nsandbox = false\nbuild-users-group ="


def derivation(name: str, *, ca: bool, refs: list[str] = (), build_only: list[str] = (),
               outputs: tuple[str, ...] = ("out",), lines: int = 1) -> str:
    """A Nix expression: a derivation built by /bin/sh with builtins only,
    each output a file that names `refs` (Nix expressions: runtime
    references) and has `lines` more lines; `build_only` (expressions) are
    inputs it reads but does not keep."""
    body = "".join(f"test -e ${{{d}}}; " for d in build_only)
    for o in outputs:
        body += (f"echo {name}-{o} > ${o}; i=0; while [ $i -lt {lines} ]; do echo {name} $i; "
                 f"i=$((i+1)); done >> ${o}; " + "".join(f"echo ${{{r}}} >> ${o}; " for r in refs))
    names = " ".join(f'"{o}"' for o in outputs)
    attrs = (f'name = "{name}"; system = builtins.currentSystem; builder = "/bin/sh"; '
             f'args = [ "-c" "{body}" ]; outputs = [ {names} ];')
    if ca:
        attrs += ' __contentAddressed = true; outputHashMode = "recursive"; outputHashAlgo = "sha256";'
    return f"derivation {{ {attrs} }}"


@dataclass
class BuiltStore:
    top: Path                       # holds store/, var/, log/, etc/, home/

    @property
    def store(self) -> Path:
        return self.top / "store"

    @property
    def state(self) -> Path:
        return self.top / "var"

    @property
    def layout_args(self) -> tuple[str, ...]:
        return ("--store-dir", str(self.store), "--state-dir", str(self.state))

    def env(self, config: str = "") -> dict[str, str]:
        """The environment for Nix and for gcroots alike: nix.conf of its
        own (empty), NIX_CONFIG = the base settings + `config`."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("NIX_")}
        env.update(NIX_STORE_DIR=str(self.store), NIX_STATE_DIR=str(self.state),
                   NIX_LOG_DIR=str(self.top / "log"), NIX_CONF_DIR=str(self.top / "etc"),
                   HOME=str(self.top / "home"), XDG_CONFIG_DIRS=str(self.top / "etc"),
                   XDG_CACHE_HOME=str(self.top / "home/.cache"),
                   NIX_CONFIG=f"{BASE_CONFIG}\n{config}")
        return env

    @classmethod
    def create(cls, top: Path) -> "BuiltStore":
        for d in ("etc", "home", "log"):
            (top / d).mkdir(parents=True, exist_ok=True)
        return cls(top)

    def nix(self, *args: str, config: str = "", check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run(args, env=self.env(config), capture_output=True, timeout=600)
        if check and out.returncode != 0:
            raise AssertionError(f"{' '.join(args)}: {out.stderr.decode(errors='replace')[-3000:]}")
        return out

    def build(self, expr_file: Path, attr: str, link: Path, config: str) -> str:
        """nix-build -A attr -o link (an indirect root, as users make them)."""
        return self.nix("nix-build", str(expr_file), "-A", attr, "-o", str(link),
                        config=config).stdout.decode().strip()

    def instantiate_root(self, expr_file: Path, attr: str, link: Path, config: str) -> str:
        """nix-instantiate --add-root: a root on the .drv."""
        return self.nix("nix-instantiate", str(expr_file), "-A", attr, "--add-root", str(link),
                        "--indirect", config=config).stdout.decode().strip()

    def query(self, *args: str, config: str = "", check: bool = True) -> subprocess.CompletedProcess:
        """gcroots-query --standalone on this store, as root."""
        out = subprocess.run([support.QUERY, "--standalone", *self.layout_args, "--no-runtime",
                              *args], env=self.env(config), capture_output=True, timeout=600)
        if check and out.returncode != 0:
            raise AssertionError(f"gcroots-query {' '.join(args)} ({out.returncode}): "
                                 f"{out.stderr.decode(errors='replace')[-3000:]}")
        return out

    def copy(self, dst: Path) -> "BuiltStore":
        subprocess.run(["cp", "-a", str(self.top), str(dst)], check=True)  # keeps hard links
        return BuiltStore(dst)

    def restore(self, pristine: "BuiltStore") -> None:
        subprocess.run(["rm", "-rf", str(self.top)], check=True)
        pristine.copy(self.top)

    def nix_on_copy(self, copy: "BuiltStore", *args: str, config: str = "",
                    check: bool = True) -> subprocess.CompletedProcess:
        """Run a Nix command on `copy` as if it were this store: `copy` is
        mounted over our top in a private mount namespace."""
        cmd = ["unshare", "-m", "sh", "-c", 'mount --bind "$1" "$2" && shift 2 && exec "$@"',
               "sh", str(copy.top), str(self.top), *args]
        out = subprocess.run(cmd, env=self.env(config), capture_output=True, timeout=600)
        if check and out.returncode != 0:
            raise AssertionError(f"{' '.join(args)}: {out.stderr.decode(errors='replace')[-3000:]}")
        return out

    def db_rows(self) -> dict[str, list[tuple]]:
        """Every row of every table (sorted), the DB as Nix left it."""
        db = sqlite3.connect(f"file:{self.state}/db/db.sqlite?mode=ro", uri=True)
        try:
            tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
            return {t: sorted(db.execute(f'SELECT * FROM "{t}"'), key=repr) for t in tables}
        finally:
            db.close()

    def foreign_key_problems(self) -> list[tuple]:
        db = sqlite3.connect(f"file:{self.state}/db/db.sqlite?mode=ro", uri=True)
        try:
            return db.execute("PRAGMA foreign_key_check").fetchall()
        finally:
            db.close()

    def entries(self) -> set[str]:
        return set(os.listdir(self.store)) - {".links"}

    def verify(self) -> None:
        """nix-store --verify --check-contents finds nothing wrong."""
        out = self.nix("nix-store", "--verify", "--check-contents", check=False)
        text = out.stderr.decode(errors="replace")
        bad = [line for line in text.splitlines()
               if not line.startswith(("checking ", "reading the Nix store", "warning: "))]
        assert out.returncode == 0 and not bad, text


def remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)
