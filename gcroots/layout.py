"""Where a store lives.

Nix distinguishes the *logical* store dir (`/nix/store`, part of every store
path hash, what symlinks and the DB say) from where the files physically are.
A "chroot store" (`nix-store --store DIR`) keeps the logical dir and puts the
files under DIR/nix/store, the state under DIR/nix/var/nix.  We mirror that
with `root`: everything on disk is root + logical path, while store paths
keep their logical spelling.  Symlinks outside the state tree (indirect
roots) are host paths and are followed on the host, exactly as Nix does.

Standard library only (the helper imports it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .storepath import canon_path

DEFAULT_STORE_DIR = b"/nix/store"
DEFAULT_STATE_DIR = b"/nix/var/nix"


@dataclass(frozen=True)
class StoreLayout:
    store_dir: bytes = DEFAULT_STORE_DIR   # logical
    state_dir: bytes = DEFAULT_STATE_DIR   # logical
    root: bytes = b"/"                     # physical prefix

    @classmethod
    def make(cls, store_dir: str | bytes | None = None, state_dir: str | bytes | None = None,
             root: str | bytes | None = None) -> StoreLayout:
        store = canon_path(os.fsencode(store_dir or DEFAULT_STORE_DIR))
        if store == b"/":
            raise ValueError("the store dir cannot be /")
        # The root may be given relative (like `nix-store --store ./x`).
        return cls(store, canon_path(os.fsencode(state_dir or DEFAULT_STATE_DIR)),
                   canon_path(os.path.abspath(os.fsencode(root or b"/"))))

    def physical(self, logical: bytes) -> bytes:
        """Where a logical path (a store path, say) is on disk."""
        return logical if self.root == b"/" else self.root + logical

    # Physical paths of the store's parts (root + logical), as Nix names them
    # (the collector's own files -- gc.lock, gc-socket, .links -- are daemon/gc.py's).
    @property
    def real_store_dir(self) -> bytes: return self.physical(self.store_dir)
    @property
    def real_state_dir(self) -> bytes: return self.physical(self.state_dir)
    @property
    def gcroots_dir(self) -> bytes: return self.real_state_dir + b"/gcroots"
    @property
    def auto_dir(self) -> bytes: return self.gcroots_dir + b"/auto"
    @property
    def profiles_dir(self) -> bytes: return self.real_state_dir + b"/profiles"
    @property
    def temproots_dir(self) -> bytes: return self.real_state_dir + b"/temproots"
    @property
    def db_path(self) -> bytes: return self.real_state_dir + b"/db/db.sqlite"
