"""The GC-relevant Nix settings, read the way Nix reads them: the system
`nix.conf` in $NIX_CONF_DIR (default /etc/nix) with `include`/`!include`,
then $NIX_CONFIG (newline-separated `key = value` lines) on top."""

from __future__ import annotations

import os
from dataclasses import dataclass

_ALIASES = {"gc-keep-derivations": "keep-derivations", "gc-keep-outputs": "keep-outputs"}
_BOOLS = {"true": True, "false": False}


class NixConfError(Exception):
    pass


@dataclass(frozen=True)
class GCSettings:
    keep_derivations: bool = True   # Nix's default
    keep_outputs: bool = False      # Nix's default


def _parse(text: str, origin: str, settings: dict[str, str], depth: int) -> None:
    if depth > 10:
        raise NixConfError(f"{origin}: includes nested too deeply")
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        if words[0] in ("include", "!include") and len(words) == 2:
            path = words[1]
            if not os.path.isabs(path) and origin != "NIX_CONFIG":
                path = os.path.join(os.path.dirname(origin), path)
            try:
                with open(path, encoding="utf-8") as f:
                    _parse(f.read(), path, settings, depth + 1)
            except FileNotFoundError:
                if words[0] == "include":
                    raise NixConfError(f"{origin}:{lineno}: included file {path} does not exist") from None
            continue
        if "=" not in line:
            raise NixConfError(f"{origin}:{lineno}: expected 'key = value', got {line!r}")
        key, value = (x.strip() for x in line.split("=", 1))
        settings[_ALIASES.get(key, key)] = value


def _bool(settings: dict[str, str], key: str, default: bool) -> bool:
    if key not in settings:
        return default
    value = settings[key]
    if value not in _BOOLS:
        raise NixConfError(f"setting {key!r}: expected true or false, got {value!r}")
    return _BOOLS[value]


def load_gc_settings(environ: dict[str, str] | None = None) -> GCSettings:
    env = os.environ if environ is None else environ
    settings: dict[str, str] = {}
    conf = os.path.join(env.get("NIX_CONF_DIR", "/etc/nix"), "nix.conf")
    try:
        with open(conf, encoding="utf-8") as f:
            _parse(f.read(), conf, settings, 0)
    except FileNotFoundError:
        pass
    if env.get("NIX_CONFIG"):
        _parse(env["NIX_CONFIG"], "NIX_CONFIG", settings, 0)
    return GCSettings(keep_derivations=_bool(settings, "keep-derivations", True),
                      keep_outputs=_bool(settings, "keep-outputs", False))
