"""The GC-relevant Nix settings, read the way Nix 2.8 reads them
(loadConfFile): the system `nix.conf` in $NIX_CONF_DIR (default /etc/nix),
then the user's files -- $NIX_USER_CONF_FILES (colon-separated) or else
nix/nix.conf under $XDG_CONFIG_HOME (default ~/.config) and each of
$XDG_CONFIG_DIRS (default /etc/xdg), the first of those winning -- then
$NIX_CONFIG (newline-separated `key = value` lines) on top.  Files may
`include`/`!include` others; bytes that are not UTF-8 are kept as they are.

A line is whitespace-separated tokens, `name = value...` (applyConfig: the
second token must be `=`, the value is the rest joined by single spaces);
`extra-NAME` appends to a list setting (experimental-features) instead of
replacing it.  Settings we do not use are read and ignored, as Nix ignores
unknown ones."""

from __future__ import annotations

import os
import pwd
import re
import sys
from dataclasses import dataclass

from gcroots import log

_log = log.get("gcroots.nixconf")

_ALIASES = {"gc-keep-derivations": "keep-derivations", "gc-keep-outputs": "keep-outputs"}
_BOOLS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
_LISTS = frozenset({"experimental-features"})   # the ones `extra-` appends to
_TOKEN = re.compile(r"[^ \t\n\r]+")           # tokenizeString's separators


class NixConfError(Exception):
    pass


@dataclass(frozen=True)
class GCSettings:
    keep_derivations: bool = True   # Nix's default
    keep_outputs: bool = False      # Nix's default
    ca_derivations: bool = False    # experimental-features has ca-derivations

    @property
    def follows_realisations(self) -> bool:
        """Nix reads Realisations (and .drv files, to find their rows) only
        for the keep-derivations and keep-outputs edges."""
        return self.ca_derivations and (self.keep_derivations or self.keep_outputs)


def _parse(text: str, origin: str, settings: dict[str, str], depth: int) -> None:
    if depth > 10:
        raise NixConfError(f"{origin}: includes nested too deeply")
    for lineno, line in enumerate(text.split("\n"), 1):
        tokens = _TOKEN.findall(line.split("#", 1)[0])
        if not tokens:
            continue
        where = f"{origin}:{lineno}"
        if tokens[0] in ("include", "!include"):
            if len(tokens) != 2:
                raise NixConfError(f"{where}: illegal configuration line {line.strip()!r}")
            path = tokens[1]
            if not path.startswith("/"):
                if origin == "NIX_CONFIG":  # Nix: relative to ".", which is not absolute
                    raise NixConfError(f"{where}: include of a relative path {path!r}")
                path = os.path.normpath(os.path.join(os.path.dirname(origin), path))
            if not os.path.exists(path):
                if tokens[0] == "include":
                    raise NixConfError(f"{where}: included file {path} does not exist")
            elif (text := _read(path)) is not None:
                _parse(text, path, settings, depth + 1)
            continue
        if len(tokens) < 2 or tokens[1] != "=":
            raise NixConfError(f"{where}: expected 'key = value', got {line.strip()!r}")
        _set(settings, _ALIASES.get(tokens[0], tokens[0]), " ".join(tokens[2:]), where)


def _set(settings: dict[str, str], key: str, value: str, where: str) -> None:
    """Config::set: `extra-` appends to a list setting (an unknown or
    non-list one is ignored, as Nix ignores unknown settings); a boolean
    is checked when set, as Nix checks it, even if set again later."""
    if key.startswith("extra-") and key[6:] in _LISTS:
        key = key[6:]
        value = f"{settings.get(key, '')} {value}"
    elif key in ("keep-derivations", "keep-outputs") and value not in _BOOLS:
        raise NixConfError(f"{where}: setting {key!r}: expected true or false "
                           f"(or yes/no, 1/0), got {value!r}")
    settings[key] = value


def _bool(settings: dict[str, str], key: str, default: bool) -> bool:
    return _BOOLS[settings[key]] if key in settings else default


def _read(path: str) -> str | None:
    """A config file's text, or None if it cannot be read: Nix skips such
    files (applyConfigFile ignores any system error), so we must too, or
    our settings would differ from the Nix that shares the store.  Say so
    unless it simply does not exist."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        _log.warning("nix_conf_unreadable", path=path, error=e.strerror)
        return None


def user_conf_files(env) -> list[str]:
    """Nix's getUserConfigFiles(), highest precedence first."""
    if "NIX_USER_CONF_FILES" in env:
        return [f for f in env["NIX_USER_CONF_FILES"].split(":") if f]
    home = env.get("HOME")
    if home is None:
        try:
            home = pwd.getpwuid(os.getuid()).pw_dir
        except KeyError:
            home = None
    config_home = env.get("XDG_CONFIG_HOME") or (home and os.path.join(home, ".config"))
    dirs = ([config_home] if config_home else [])
    dirs += [d for d in env.get("XDG_CONFIG_DIRS", "/etc/xdg").split(":") if d]
    return [os.path.join(d, "nix", "nix.conf") for d in dirs]


def load_gc_settings(environ: dict[str, str] | None = None) -> GCSettings:
    env = os.environ if environ is None else environ
    settings: dict[str, str] = {}
    conf = os.path.join(env.get("NIX_CONF_DIR", "/etc/nix"), "nix.conf")
    for path in [conf] + user_conf_files(env)[::-1]:  # later files override earlier ones
        text = _read(path)
        if text is not None:
            _parse(text, path, settings, 0)
    if env.get("NIX_CONFIG"):
        _parse(env["NIX_CONFIG"], "NIX_CONFIG", settings, 0)
    features = settings.get("experimental-features", "").split()
    return GCSettings(keep_derivations=_bool(settings, "keep-derivations", True),
                      keep_outputs=_bool(settings, "keep-outputs", False),
                      ca_derivations="ca-derivations" in features)


def settings_from(args) -> GCSettings:
    """nix.conf's settings with the command line's --keep-* overrides
    (gcrootsd, and gcroots-query --standalone)."""
    try:
        base = load_gc_settings()
    except NixConfError as e:
        raise SystemExit(f"{os.path.basename(sys.argv[0]) or 'gcroots'}: {e}") from None
    return GCSettings(
        keep_derivations=base.keep_derivations if args.keep_derivations is None else args.keep_derivations,
        keep_outputs=base.keep_outputs if args.keep_outputs is None else args.keep_outputs,
        ca_derivations=base.ca_derivations)
