"""Store path syntax: the fast paths agree with a literal transcription of
Nix 2.8's canonPath/parseStorePath/toStorePath."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from gcroots.daemon.storepaths import BASE32_CHARS, parse_store_path
from gcroots.storepath import canon_path, is_in_dir, is_store_basename, to_store_path

STORE = b"/nix/store"
NAME_CHARS = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ+-._?="


def nix_is_basename(name: bytes) -> bool:  # StorePath::StorePath, path.cc
    if len(name) < 33:
        return False
    if any(c not in BASE32_CHARS for c in name[:32]):
        return False
    rest = name[33:]
    return 0 < len(rest) <= 211 and all(c in NAME_CHARS for c in rest)


def nix_to_store_path(target: bytes) -> bytes | None:  # store-api.cc, literally
    if not is_in_dir(target, STORE):
        return None
    slash = target.find(b"/", len(STORE) + 1)
    head = target if slash == -1 else target[:slash]
    p = canon_path(head)
    parent = p[:p.rfind(b"/")] or b"/"
    if parent != STORE:
        return None
    return p if nix_is_basename(p[len(STORE) + 1:]) else None


pieces = st.sampled_from([b"", b".", b"..", b"/", b"//", b"0" * 32, b"e" * 32, b"-", b"x",
                          b"name", b"\n", b"\xff", b"a" * 200, b"?=+._", b"abcd" * 8])
targets = st.lists(pieces, max_size=8).map(lambda ps: STORE + b"/" + b"".join(ps))


@given(targets)
@settings(max_examples=3000)
def test_to_store_path_matches_nix(target):
    assert to_store_path(target, STORE) == nix_to_store_path(target)


@given(st.binary(max_size=260))
@settings(max_examples=3000)
def test_basename_matches_nix(name):
    if b"\0" not in name and b"/" not in name:
        assert is_store_basename(name) == nix_is_basename(name)


def test_examples():
    good = b"0" * 32 + b"-hello-1.0"
    assert is_store_basename(good)
    assert is_store_basename(b"0" * 32 + b"Xhello")          # index 32 unchecked
    assert is_store_basename(b"0" * 32 + b"-.hidden")        # leading dot allowed in 2.8
    assert not is_store_basename(b"e" * 32 + b"-x")          # e is not base-32
    assert not is_store_basename(b"0" * 32 + b"-")           # empty name
    assert not is_store_basename(b"0" * 32 + b"-" + b"a" * 212)
    assert to_store_path(STORE + b"/" + good + b"/bin/x", STORE) == STORE + b"/" + good
    assert to_store_path(STORE + b"x/" + good, STORE) is None
    assert to_store_path(STORE + b"//" + good, STORE) is None
    assert parse_store_path(STORE + b"/" + good + b"/", STORE) == STORE + b"/" + good
    assert parse_store_path(STORE + b"/./" + good, STORE) == STORE + b"/" + good
    assert parse_store_path(b"relative/" + good, STORE) is None
