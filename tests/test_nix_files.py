"""The Nix files (flake.nix, nix/): what can be proven without nixpkgs.

This machine has Nix 2.8 but no nixpkgs, so nothing can be built and the VM
test cannot run.  What runs here:

- every .nix file parses (`nix-instantiate --parse`, which also rejects
  undefined variables);
- nix/package.nix, nix/module.nix, nix/tests/multi-user.nix and flake.nix are
  *evaluated* with a stand-in for nixpkgs' lib and packages (tests/nix/):
  the package against pyproject.toml, the module's options, assertions and
  generated units, the VM test's node against the module, the flake's outputs;
- the generated units are rendered as NixOS would write them and checked
  with `systemd-analyze verify` and `security`, and against systemd/*;
- every ExecStart/ExecStartPre command line is parsed by our own CLIs'
  argument parsers, and every flag in it is in the command's --help;
- the VM test's Python testScript compiles and uses no undefined name.

Each check is shown to fail on a broken input, so none passes vacuously.
"""

from __future__ import annotations

import ast
import builtins
import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from .support import REPO, VENV_BIN

NIX_DIR = REPO / "tests" / "nix"
FAKE_BIN = re.compile(r"/nix/store/0{32}-gcroots(?:-helper)?-[0-9.]+/bin/")
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())


def nix_files() -> list[Path]:
    tracked = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard",
                              "*.nix"], cwd=REPO, capture_output=True, check=True).stdout
    return sorted(REPO / p for p in tracked.decode().split("\0") if p)


def nix_eval(expr: str):
    out = subprocess.run(["nix-instantiate", "--eval", "--strict", "--json", "--expr", expr],
                         cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        raise NixError(out.stderr)
    return json.loads(out.stdout)


class NixError(Exception):
    pass


def nix_value(value) -> str:
    """A Python value as a Nix expression (via JSON)."""
    return f"(builtins.fromJSON {json.dumps(json.dumps(value))})"


def evaluate_module(gcroots: dict, system: dict | None = None, **kwargs) -> dict:
    extra = "".join(f" {k} = {json.dumps(v)};" for k, v in kwargs.items())
    return nix_eval(f"import ./tests/nix/eval-module.nix {{ gcroots = {nix_value(gcroots)};"
                    f" system = {nix_value(system or {})};{extra} }}")


def failed_assertions(result: dict) -> list[str]:
    return [a["message"] for a in result["config"].get("assertions", []) if not a["assertion"]]


# -- syntax -------------------------------------------------------------------------

def test_the_nix_files_are_there():
    names = {p.relative_to(REPO).as_posix() for p in nix_files()}
    assert {"flake.nix", "nix/package.nix", "nix/module.nix", "nix/tests/multi-user.nix"} <= names


@pytest.mark.parametrize("path", nix_files(), ids=lambda p: p.relative_to(REPO).as_posix())
def test_parses(path):
    out = subprocess.run(["nix-instantiate", "--parse", str(path)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_parse_check_can_fail(tmp_path):
    for text in ("{ a = 1; ", "let x = 1; in y"):   # a syntax error, an undefined variable
        bad = tmp_path / "bad.nix"
        bad.write_text(text)
        assert subprocess.run(["nix-instantiate", "--parse", str(bad)],
                              capture_output=True).returncode != 0


# -- the package ----------------------------------------------------------------------

def _dist_name(requirement: str) -> str:
    name = re.match(r"[A-Za-z0-9._-]+", requirement).group(0)
    return re.sub(r"[._]+", "-", name).lower()


@pytest.fixture(scope="module")
def package() -> dict:
    return nix_eval("import ./tests/nix/eval-package.nix")


def test_package_follows_pyproject(package):
    project = PYPROJECT["project"]
    full, helper = package["gcroots"], package["helper"]
    assert full["pname"] == project["name"] and full["version"] == project["version"]
    assert helper["version"] == project["version"]
    required = {_dist_name(r) for r in project["dependencies"]}
    metrics = {_dist_name(r) for r in project["optional-dependencies"]["metrics"]}
    assert set(full["dependencies"]) == required | metrics
    assert set(package["withoutMetrics"]["dependencies"]) == required
    assert set(full["optional-dependencies"]["metrics"]) == metrics
    assert set(full["build-system"]) >= {_dist_name(r) for r in PYPROJECT["build-system"]["requires"]}
    assert full["mainProgram"] in project["scripts"]
    assert full["doCheck"] is False and full["pyproject"] is True


def test_package_installs_man_pages_and_completions(package):
    """Generated at build time by scripts/manpages (in the source set) with
    pyproject's `docs` extra, installed for man, bash, zsh and fish."""
    full = package["gcroots"]
    docs = {_dist_name(r) for r in PYPROJECT["project"]["optional-dependencies"]["docs"]}
    assert docs | {"installShellFiles"} <= set(full["nativeBuildInputs"])
    assert "scripts/manpages" in full["srcFiles"]
    script = full["postInstall"]
    assert "bash scripts/manpages docs" in script and "installManPage docs/man/man1/*.1" in script
    for shell in ("bash", "zsh", "fish"):
        assert f"--{shell} docs/completions/{shell}/" in script


def test_package_source_has_every_python_package(package):
    """A folder that one of pyproject.toml's packages is built from (under
    its package-dir, gcroots/'s links followed) but not in the package's
    file set would be missing from the wheel."""
    files = set(package["gcroots"]["srcFiles"])
    setuptools = PYPROJECT["tool"]["setuptools"]
    root = REPO / setuptools["package-dir"][""]
    dirs = {str((root / p.replace(".", "/")).resolve().relative_to(REPO)) for p in setuptools["packages"]}
    assert dirs == {"gcroots", "protocol", "helper", "daemon", "client"}
    assert dirs <= files, dirs - files
    assert {"pyproject.toml", PYPROJECT["project"]["readme"]} <= files
    assert package["gcroots"]["srcRoot"] == str(REPO)
    assert not files & {"tests", "nix", "bench", "systemd", "scripts"}


def test_both_builds_give_the_helper_libseccomps_path(package):
    """The helper dlopens libseccomp.so.2 by the path the build writes in;
    the line the build replaces is in helper/sandbox.py (--replace-fail)."""
    line = 'LIBSECCOMP = "libseccomp.so.2"'
    assert line in (REPO / "helper/sandbox.py").read_text().splitlines()
    for build in (package["gcroots"], package["helper"]):
        assert "substituteInPlace helper/sandbox.py --replace-fail" in build["postPatch"]
        assert f"'{line}'" in build["postPatch"]
        assert "-libseccomp/lib/libseccomp.so.2" in build["postPatch"]


def test_helper_build_carries_only_the_helpers_dependencies(package):
    helper = package["helper"]
    required = {_dist_name(r) for r in PYPROJECT["project"]["dependencies"]}
    # nixpkgs' runtime-deps check fails the build on a declared dependency
    # that is neither provided nor removed: every one must be one or the other.
    assert set(helper["dependencies"]) | set(helper["pythonRemoveDeps"]) == required
    assert {"trio", "tqdm", "structlog"} <= set(helper["pythonRemoveDeps"])
    # _cffi_backend for helper/_ffi.py; pyroute2 for sandbox-check only
    assert helper["dependencies"] == ["cffi", "pyroute2"]
    assert "prometheus-client" not in helper["dependencies"]
    assert helper["mainProgram"] == "gcroots-helper"
    assert helper["pythonImportsCheck"] == ["gcroots.helper.cli"]
    # Exactly the other console scripts are removed.
    removed = set(re.findall(r'"\$out/bin/([a-z-]+)"', helper["postInstall"]))
    assert removed == set(PYPROJECT["project"]["scripts"]) - {"gcroots-helper"}


# -- the module: options, assertions ----------------------------------------------------

ISSUE_OPTIONS = {  # issue 8, item 3
    "enable", "package", "user", "group", "adminGroup", "settings", "gc.automatic", "gc.dates",
    "gc.randomizedDelaySec", "gc.persistent", "gc.maxFreed", "gc.minFree", "gc.maxFree",
    "gc.keep", "gc.keepSince", "nixRootsDaemonCompat.enable",
}

COLLECTING_ON_NIXOS = {"enable": True, "user": "root", "gc": {"automatic": True}}
WRITABLE_STORE = {"boot": {"nixStoreMountOpts": ["nodev", "nosuid"]}}


@pytest.fixture(scope="module")
def default() -> dict:
    return evaluate_module({"enable": True})


def test_module_has_the_options_of_the_issue(default):
    names = {o["name"].removeprefix("services.gcroots.") for o in default["options"]}
    assert ISSUE_OPTIONS <= names, ISSUE_OPTIONS - names
    assert {"helperUser", "storeOwner", "nixRootsDaemonCompat.user"} <= names
    for o in default["options"]:
        assert o["description"], f"{o['name']} has no description"


def test_readme_mentions_only_real_options(default):
    """Every services.gcroots.<option> the README names must exist."""
    names = {o["name"] for o in default["options"]}
    prefixes = {n.rsplit(".", k)[0] for n in names for k in range(n.count("."))}
    text = (REPO / "README.md").read_text()
    for mentioned in re.findall(r"services\.gcroots(?:\.[A-Za-z][A-Za-z0-9-]*)+", text):
        assert mentioned in names or mentioned in prefixes, f"README names {mentioned}"


def test_disabled_module_defines_nothing():
    assert evaluate_module({})["config"] == {}


def test_default_configuration_is_accepted(default):
    assert failed_assertions(default) == []
    systemd = default["config"]["systemd"]
    assert set(systemd["services"]) == {"gcroots-helper", "gcrootsd", "gcroots-gc"}
    assert set(systemd["sockets"]) == {"gcroots-helper", "gcrootsd"}
    assert systemd.get("timers", {}) == {}              # gc.automatic is off by default
    assert systemd["services"]["gcrootsd"]["wantedBy"] == []   # socket-activated only
    users = default["config"]["users"]
    assert set(users["users"]) == {"gcroots", "gcroots-helper"}
    assert set(users["groups"]) == {"gcroots", "gcroots-helper", "gcroots-admin"}


def test_the_vm_test_configuration_is_accepted():
    node = nix_eval("(import ./tests/nix/eval-vm-test.nix).module")
    assert failed_assertions(node) == []
    assert node["cfg"]["user"] == "root" and node["cfg"]["gc"]["automatic"]


@pytest.mark.parametrize("config,system,expected", [
    ({"enable": True, "gc": {"automatic": True}}, WRITABLE_STORE, "can delete garbage only as the owner"),
    ({"enable": True, "gc": {"minFree": "1G"}}, WRITABLE_STORE, "can delete garbage only as the owner"),
    ({"enable": True, "settings": {"gc-interval": "1d"}}, WRITABLE_STORE, "only as the owner"),
    (COLLECTING_ON_NIXOS, {}, "is mounted read-only"),
    (COLLECTING_ON_NIXOS, {**WRITABLE_STORE, "nix": {"gc": {"automatic": True}}}, "run one collector"),
    ({**COLLECTING_ON_NIXOS, "gc": {"automatic": True, "maxFree": "9G"}}, WRITABLE_STORE, "maxFree needs gc.minFree"),
    ({"enable": True, "gc": {"keep": 3}}, {}, "prune profiles and links before the scheduled"),
    ({"enable": True, "gc": {"rootsOlderThan": "9d"}}, {}, "gc.rootsOlderThan prune profiles"),
    ({"enable": True, "helperUser": "gcroots"}, {}, "helperUser must differ"),
    ({"enable": True, "settings": {"socket": "/tmp/x"}}, {}, "settings.socket: gcrootsd is socket-activated"),
    ({"enable": True, "settings": {"min-free": "1G"}}, {}, "use services.gcroots.gc.minFree"),
])
def test_assertions_refuse(config, system, expected):
    messages = [" ".join(m.split()) for m in failed_assertions(evaluate_module(config, system))]
    assert len(messages) == 1 and expected in messages[0], messages


def test_collecting_as_the_store_owner_is_accepted():
    assert failed_assertions(evaluate_module(COLLECTING_ON_NIXOS, WRITABLE_STORE)) == []
    # An unprivileged Nix daemon owns the store: its user may collect.
    unprivileged = {"nix": {"daemonUser": "nix", "gc": {"automatic": False}}, **WRITABLE_STORE}
    assert failed_assertions(evaluate_module({**COLLECTING_ON_NIXOS, "user": "nix"}, unprivileged)) == []
    # Older nixpkgs: boot.readOnlyNixStore instead of nixStoreMountOpts.
    old = evaluate_module(COLLECTING_ON_NIXOS, {"boot": {"readOnlyNixStore": True}},
                          hasNixStoreMountOpts=False)
    assert any("is mounted read-only" in m for m in failed_assertions(old))
    old = evaluate_module(COLLECTING_ON_NIXOS, {"boot": {"readOnlyNixStore": False}},
                          hasNixStoreMountOpts=False)
    assert failed_assertions(old) == []


@pytest.mark.parametrize("config,error", [
    ({"enable": True, "gc": {"automatc": True}}, "services.gcroots.gc.automatc' does not exist"),
    ({"enable": True, "gc": {"keep": 0}}, "services.gcroots.gc.keep' is not of type"),
    ({"enable": True, "settings": {"log-level": "loud"}}, "settings.log-level' is not of type"),
    ({"enable": True, "settings": {"metrics-interval": {"a": 1}}}, "services.gcroots.settings' is not of type"),
])
def test_bad_definitions_are_errors(config, error):
    with pytest.raises(NixError, match=re.escape(error)):
        evaluate_module(config)


def test_warnings():
    compat = evaluate_module({"enable": True, "nixRootsDaemonCompat": {"enable": True}})
    assert any("scans /proc itself" in w for w in compat["config"]["warnings"])
    nix_min_free = {**WRITABLE_STORE, "nix": {"settings": {"min-free": 1 << 30}}}
    both = evaluate_module(COLLECTING_ON_NIXOS, nix_min_free)
    assert any("nix.settings.min-free" in w for w in both["config"]["warnings"])
    assert evaluate_module(COLLECTING_ON_NIXOS, WRITABLE_STORE)["config"]["warnings"] == []


# -- the module: units ------------------------------------------------------------------

def _value(v) -> str:
    if v is True:
        return "true"
    if v is False:
        return "false"
    return str(v)


def render(kind: str, unit: dict) -> str:
    """A unit file as NixOS writes it (nixos/lib/systemd-lib.nix), less the
    Environment= and X-* lines NixOS adds on its own."""
    lines = ["[Unit]", f"Description={unit['description']}"]
    if unit.get("documentation"):
        lines.append("Documentation=" + " ".join(unit["documentation"]))
    for key in ("requires", "wants", "after"):
        if unit.get(key):
            lines.append(f"{key.capitalize()}=" + " ".join(unit[key]))
    section = {"services": "Service", "sockets": "Socket", "timers": "Timer"}[kind]
    lines.append(f"[{section}]")
    for stream in unit.get("listenStreams", []):
        lines.append(f"ListenStream={stream}")
    config = unit.get({"services": "serviceConfig", "sockets": "socketConfig",
                       "timers": "timerConfig"}[kind], {})
    for key in sorted(config):
        values = config[key] if isinstance(config[key], list) else [config[key]]
        lines += [f"{key}={_value(v)}" for v in values]
    return "\n".join(lines) + "\n"


def write_units(result: dict, directory: Path, bin_dir: Path = VENV_BIN) -> list[Path]:
    """The module's units in `directory`, with our commands where the package's would be."""
    paths = []
    suffix = {"services": "service", "sockets": "socket", "timers": "timer"}
    for kind, units in result["config"]["systemd"].items():
        for name, unit in units.items():
            if unit.get("enable", True) is False:
                continue
            path = directory / f"{name}.{suffix[kind]}"
            path.write_text(FAKE_BIN.sub(f"{bin_dir}/", render(kind, unit)))
            paths.append(path)
    return paths


SPACE_LISTS = {"ReadWritePaths", "ReadOnlyPaths", "Requires", "Wants", "After", "Before"}


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        value = {"yes": "true", "no": "false"}.get(value, value)
        if key in SPACE_LISTS:   # one line or several: the same list to systemd
            current.setdefault(key, []).extend(value.split())
        else:
            current.setdefault(key, []).append(value)
    return sections


EVERYTHING_ON = {
    "enable": True, "user": "root",
    "gc": {"automatic": True, "keep": 5, "keepSince": "30d", "maxFreed": "50G",
           "minFree": "10G", "maxFree": "20G", "rootsOlderThan": "90d"},
    "settings": {"metrics-address": "127.0.0.1:9847", "keep-outputs": False,
                 "keep-derivations": True, "gc-interval": "1d", "metrics-interval": "1min",
                 "free-check-interval": "10min", "log-level": "debug"},
    "nixRootsDaemonCompat": {"enable": True, "user": "nix"},
}
# The two deployment models: a stock nix-daemon (root's store: gcrootsd as
# uid 0 without capabilities) and a rootless one (its user owns the store).
ROOTLESS_NIXOS = {"nix": {"daemonUser": "nix"}, **WRITABLE_STORE}
CONFIGS = {
    "default": ({"enable": True}, {}),
    "collecting": ({**COLLECTING_ON_NIXOS, "gc": {"automatic": True, "keep": 3}}, WRITABLE_STORE),
    "rootless": ({"enable": True, "user": "nix", "gc": {"automatic": True},
                  "settings": {"metrics-address": "9847"}}, ROOTLESS_NIXOS),
    "everything": (EVERYTHING_ON, WRITABLE_STORE),
}


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def configured(request, tmp_path_factory):
    result = evaluate_module(*CONFIGS[request.param])
    assert failed_assertions(result) == []
    directory = tmp_path_factory.mktemp(f"units-{request.param}")
    return request.param, result, directory, write_units(result, directory)


def test_rendered_units_verify_silently(configured):
    name, _, directory, paths = configured
    out = subprocess.run(["systemd-analyze", "verify", "--man=no", *map(str, paths)],
                         capture_output=True, text=True, cwd=directory)
    assert out.returncode == 0 and out.stderr == "", (name, out.stderr)


def exposure(path: Path) -> float:
    out = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(path)],
                         capture_output=True, text=True, cwd=path.parent)
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out.stdout)
    assert match, out.stdout[-1500:] + out.stderr
    return float(match.group(1))


# Per configuration (see CONFIGS): by default the Debian units' targets
# (tests/test_systemd_units.py: 1.4, 0.4, 0.4 measured, the same as
# systemd/).  gcrootsd as uid 0 without capabilities costs systemd's "runs as
# root" items (0.7 measured); metrics over HTTP open its network to loopback
# (1.5 measured); ageing every user's result links (gc.rootsOlderThan as
# root) gives the timer's unit the homes, /tmp, CAP_DAC_OVERRIDE and
# CAP_FOWNER (1.2 measured).
EXPOSURE = {
    "default": {"gcroots-helper.service": 1.4, "gcrootsd.service": 0.5, "gcroots-gc.service": 0.5},
    "collecting": {"gcroots-helper.service": 1.4, "gcrootsd.service": 1.0, "gcroots-gc.service": 1.0},
    "rootless": {"gcroots-helper.service": 1.4, "gcrootsd.service": 2.0, "gcroots-gc.service": 0.5},
    "everything": {"gcroots-helper.service": 1.4, "gcrootsd.service": 2.0, "gcroots-gc.service": 1.2},
}


def test_rendered_units_exposure(configured):
    name, _, directory, _ = configured
    for unit, limit in EXPOSURE[name].items():
        score = exposure(directory / unit)
        assert score <= limit, (name, unit, score)


def test_exposure_check_can_fail(tmp_path):
    bare = tmp_path / "bare.service"
    bare.write_text(f"[Service]\nExecStart={VENV_BIN}/gcrootsd\n")
    assert exposure(bare) > 5


# Where the module's units may differ from systemd/*, and why.
INTENDED = {
    "EnvironmentFile": "configuration comes from options, not /etc/default/gcroots",
    "ExecStart": "checked against the CLIs instead (test_exec_lines_are_valid_command_lines)",
    "Sockets": "the compat socket only when nixRootsDaemonCompat.enable",
    "Documentation": "the same links, not compared",
}


def test_units_mirror_systemd_dir(tmp_path):
    """Same sections, keys and values as the Debian units, but for INTENDED:
    the default configuration (plus gc.automatic and the compat socket, to
    have the timer and that socket)."""
    result = evaluate_module({"enable": True, "user": "gcroots", "storeOwner": "gcroots",
                              "gc": {"automatic": True}, "nixRootsDaemonCompat": {"enable": True}},
                             WRITABLE_STORE)
    assert failed_assertions(result) == []
    ours = {p.name: parse_unit(p.read_text()) for p in write_units(result, tmp_path)}
    for debian in sorted((REPO / "systemd").iterdir()):
        theirs = parse_unit(debian.read_text())
        assert debian.name in ours, f"the module has no {debian.name}"
        mine = ours[debian.name]
        for section in ("Unit", "Service", "Socket", "Timer"):
            a = {k: v for k, v in theirs.get(section, {}).items()
                 if k not in INTENDED and (debian.name, k) not in INTENDED_IN}
            b = {k: v for k, v in mine.get(section, {}).items()
                 if k not in INTENDED and (debian.name, k) not in INTENDED_IN}
            assert a == b, (debian.name, section, {k: (a.get(k), b.get(k))
                                                   for k in a.keys() | b.keys() if a.get(k) != b.get(k)})
    assert ours["gcroots-helper.service"]["Service"]["Sockets"] == [
        "gcroots-helper.socket", "gcroots-helper-nix-roots.socket"]


# Per unit.
INTENDED_IN = {
    ("gcroots-helper.service", "Environment"): "the Debian unit takes gcrootsd's user from "
        "GCROOTSD_USER (a model's drop-in sets it); the module writes the user into ExecStart",
    ("gcroots-gc.service", "ReadWritePaths"): "the Debian unit cannot know whether GC_ARGS "
        "prunes profiles (it may write them, -optional); the module knows gc.keep/keepSince",
}


# Where a deployment model's Debian units (systemd/ plus scripts/install's
# drop-ins) may differ from the module's for the same model, and why.
MODEL_INTENDED = {
    ("gcrootsd.service", "Group"): "on Debian gcrootsd has its user's own group, so that nothing "
                                   "it creates in /nix/var/nix keeps a group --uninstall removes",
    ("gcroots-gc.service", "Group"): "the same as gcrootsd.service",
    ("gcroots-helper.socket", "SocketGroup"): "the same; the socket is 0600 anyway",
    ("gcrootsd.socket", "SocketUser"): "the admin socket is open to everybody (0666): its owner "
                                       "does not matter; the module names gcrootsd's user",
}


def debian_units(tmp_path: Path, *install_args: str) -> dict[str, dict]:
    """systemd/'s units with the model's drop-ins from scripts/install applied."""
    dropins = tmp_path / "dropins"
    out = subprocess.run([str(REPO / "scripts" / "install"), *install_args, "--dropins",
                          str(dropins)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    units = {}
    for unit in sorted((REPO / "systemd").glob("gcroots*")):
        parsed = parse_unit(unit.read_text())
        for dropin in sorted((dropins / f"{unit.name}.d").glob("*.conf")):
            for section, keys in parse_unit(dropin.read_text()).items():
                parsed.setdefault(section, {}).update(keys)   # these keys are replaced
        units[unit.name] = parsed
    return units


@pytest.mark.parametrize("model,config,system,install_args", [
    ("stock", {"enable": True, "user": "root", "gc": {"automatic": True}}, WRITABLE_STORE,
     ("--model", "stock")),
    ("rootless", {"enable": True, "user": "nix", "gc": {"automatic": True}}, ROOTLESS_NIXOS,
     ("--model", "rootless", "--user", "nix")),
])
def test_each_model_is_the_same_on_debian_and_nixos(tmp_path, model, config, system, install_args):
    """Both models without twins: on Debian the same units with a drop-in
    per unit for gcrootsd's user (scripts/install), on NixOS
    services.gcroots.user; the result is the same but for MODEL_INTENDED."""
    result = evaluate_module(config, system)
    assert failed_assertions(result) == []
    ours = {p.name: parse_unit(p.read_text()) for p in write_units(result, tmp_path)}
    user = config["user"]
    theirs_all = debian_units(tmp_path, *install_args)
    # The Nix >= 2.34 compat socket is off here (Nix 2.8 has no roots daemon).
    assert set(theirs_all) - set(ours) == {"gcroots-helper-nix-roots.socket"}
    for name, theirs in theirs_all.items():
        if name not in ours:
            continue
        mine = ours[name]
        for section in ("Unit", "Service", "Socket", "Timer"):
            a = {k: v for k, v in theirs.get(section, {}).items()
                 if k not in INTENDED and (name, k) not in {**INTENDED_IN, **MODEL_INTENDED}}
            b = {k: v for k, v in mine.get(section, {}).items()
                 if k not in INTENDED and (name, k) not in {**INTENDED_IN, **MODEL_INTENDED}}
            assert a == b, (model, name, {k: (a.get(k), b.get(k)) for k in a.keys() | b.keys()
                                          if a.get(k) != b.get(k)})
        if name in ("gcrootsd.service", "gcroots-gc.service"):
            assert theirs["Service"]["User"] == mine["Service"]["User"] == [user]
    helper = ours["gcroots-helper.service"]["Service"]["ExecStart"][0]
    assert f'"--allow-user" "{user}"' in helper


def test_mirror_check_can_fail(tmp_path):
    result = evaluate_module({"enable": True})
    result["config"]["systemd"]["services"]["gcrootsd"]["serviceConfig"]["ProtectHome"] = "read-only"
    mine = parse_unit(next(p for p in write_units(result, tmp_path)
                           if p.name == "gcrootsd.service").read_text())
    theirs = parse_unit((REPO / "systemd" / "gcrootsd.service").read_text())
    assert mine["Service"]["ProtectHome"] != theirs["Service"]["ProtectHome"]


def test_options_shape_the_units():
    result = evaluate_module(EVERYTHING_ON, WRITABLE_STORE)
    systemd = result["config"]["systemd"]
    daemon = systemd["services"]["gcrootsd"]
    assert daemon["wantedBy"] == ["multi-user.target"]  # collects and serves by itself
    assert daemon["serviceConfig"]["PrivateNetwork"] is False
    assert daemon["serviceConfig"]["IPAddressAllow"] == ["localhost"]
    assert daemon["serviceConfig"]["IPAddressDeny"] == "any"
    helper = systemd["services"]["gcroots-helper"]["serviceConfig"]
    assert "--allow-user" in helper["ExecStart"] and '"nix"' in helper["ExecStart"]
    compat = systemd["sockets"]["gcroots-helper-nix-roots"]
    assert compat["listenStreams"] == ["/nix/var/nix/gc-roots-socket/socket"]
    assert compat["socketConfig"]["FileDescriptorName"] == "nix-roots"
    assert compat["socketConfig"]["SocketUser"] == "nix"
    assert systemd["sockets"]["nix-roots-daemon"] == {"enable": False}
    assert systemd["timers"]["gcroots-gc"]["timerConfig"] == {
        "OnCalendar": "daily", "RandomizedDelaySec": "1h", "Persistent": True}
    gc = systemd["services"]["gcroots-gc"]["serviceConfig"]
    # One command: clean with the whole policy (no separate prune step).
    argv = shlex.split(gc["ExecStart"])
    assert argv[3:] == ["clean", "--yes", "--keep", "5", "--keep-since", "30d",
                        "--roots-older-than", "90d", "--max-freed", "50G"], argv
    assert "ExecStartPre" not in gc
    assert gc["ReadWritePaths"] == ["/nix/var/nix/profiles", "-/home", "-/root", "-/tmp",
                                    "-/var/tmp"]
    # Root ages every user's links: homes and the real /tmp, with the two
    # capabilities that reach into them.
    assert gc["ProtectHome"] is False and gc["PrivateTmp"] is False
    assert gc["CapabilityBoundingSet"] == "CAP_DAC_OVERRIDE CAP_FOWNER"
    plain = evaluate_module({**COLLECTING_ON_NIXOS, "gc": {"automatic": True, "keep": 3}},
                            WRITABLE_STORE)["config"]["systemd"]["services"]["gcroots-gc"]
    assert plain["serviceConfig"]["ReadWritePaths"] == ["/nix/var/nix/profiles"]
    assert plain["serviceConfig"]["ProtectHome"] is True
    assert plain["serviceConfig"]["CapabilityBoundingSet"] == ""


def test_ip_address_allow_takes_a_configurations_own_entries():
    """Metrics over HTTP open gcrootsd to loopback; a configuration lets
    scrapers in by adding list entries, which NixOS appends to the module's
    (with a string in the module, any definition of its own conflicted)."""
    metrics = {"enable": True, "settings": {"metrics-address": "127.0.0.1:9847"}}
    own = {"systemd": {"services": {"gcrootsd": {"serviceConfig": {
        "IPAddressAllow": ["10.0.0.0/8", "192.168.1.7"]}}}}}
    daemon = evaluate_module(metrics, own)["config"]["systemd"]["services"]["gcrootsd"]
    assert daemon["serviceConfig"]["IPAddressAllow"] == ["localhost", "10.0.0.0/8", "192.168.1.7"]
    option = next(o for o in evaluate_module({"enable": True})["options"]
                  if o["name"] == "services.gcroots.settings.metrics-address")
    text = " ".join(option["description"].split())
    assert "list entries" in text and 'IPAddressAllow = [ "10.0.0.0/8" ];' in text
    # The stand-in merges as NixOS does: unequal single values conflict.
    clash = {"systemd": {"services": {"gcrootsd": {"serviceConfig": {"PrivateNetwork": True}}}}}
    with pytest.raises(NixError, match="conflicting definitions"):
        evaluate_module(metrics, clash)


# -- the module: command lines -----------------------------------------------------------

PARSE_ONLY = r"""
import argparse, importlib, json, sys

class Parsed(Exception):
    pass

init = argparse.ArgumentParser.__init__
def exact(self, *a, **k):  # no abbreviations: the flag must be spelled as declared
    k["allow_abbrev"] = False
    init(self, *a, **k)
argparse.ArgumentParser.__init__ = exact
parse = argparse.ArgumentParser.parse_args
def stop(self, args=None, namespace=None):
    ns = parse(self, args, namespace)
    raise Parsed(ns)
argparse.ArgumentParser.parse_args = stop

module, entry, argv = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
try:
    getattr(importlib.import_module(module), entry)(argv)
except Parsed as p:
    print(json.dumps(sorted(vars(p.args[0]))))
    sys.exit(0)
sys.exit(3)
"""

ENTRY = {name: tuple(ref.split(":")) for name, ref in PYPROJECT["project"]["scripts"].items()}


def check_command_line(line: str) -> None:
    argv = shlex.split(line)
    command = Path(argv[0]).name
    assert argv[0].startswith(str(VENV_BIN)), argv[0]
    module, entry = ENTRY[command]
    if entry == "entry":   # gcroots-query's entry() takes no argv; main() does
        entry = "main"
    out = subprocess.run([sys.executable, "-c", PARSE_ONLY, module, entry, json.dumps(argv[1:])],
                         capture_output=True, text=True)
    assert out.returncode == 0, f"{line}\n{out.stderr}"
    # And each flag is one that the command's --help (or a subcommand's) shows.
    path, helps = [], [_help(command, [])]
    for word in argv[1:]:
        if not word.startswith("-") and _is_subcommand(command, path + [word]):
            path.append(word)
            helps.append(_help(command, path))
    for flag in (w.partition("=")[0] for w in argv[1:] if w.startswith("--")):
        assert any(re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", h) for h in helps), (flag, line)


_HELP: dict[tuple, str | None] = {}


def _help(command: str, path: list[str]) -> str | None:
    key = (command, *path)
    if key not in _HELP:
        out = subprocess.run([str(VENV_BIN / command), *path, "--help"], capture_output=True,
                             text=True)
        _HELP[key] = out.stdout if out.returncode == 0 and out.stdout.startswith("usage:") else None
    return _HELP[key]


def _is_subcommand(command: str, path: list[str]) -> bool:
    return _help(command, path) is not None


def exec_lines(result: dict) -> list[str]:
    lines = []
    for unit in result["config"]["systemd"]["services"].values():
        for key in ("ExecStart", "ExecStartPre"):
            if key in unit.get("serviceConfig", {}):
                lines.append(FAKE_BIN.sub(f"{VENV_BIN}/", unit["serviceConfig"][key]))
    return lines


def test_exec_lines_are_valid_command_lines(configured):
    name, result, _, _ = configured
    lines = exec_lines(result)
    assert len(lines) == 3  # helper, gcrootsd, and the timer's one `clean`
    for line in lines:
        check_command_line(line)


def test_accept_unreadable_reaches_the_helper():
    result = evaluate_module({"enable": True, "acceptUnreadable": ["/home", "/srv/nfs"]})
    argv = shlex.split(result["config"]["systemd"]["services"]["gcroots-helper"]["serviceConfig"]
                       ["ExecStart"])
    assert argv[argv.index("--accept-unreadable") + 1:][:3] == ["/home", "--accept-unreadable",
                                                                 "/srv/nfs"]
    check_command_line(FAKE_BIN.sub(f"{VENV_BIN}/", " ".join(map(shlex.quote, argv))))


def test_settings_become_flags():
    result = evaluate_module({"enable": True, "settings": {
        "keep-outputs": False, "keep-derivations": True, "metrics-file": None,
        "metrics-interval": "1min"}})
    argv = shlex.split(result["config"]["systemd"]["services"]["gcrootsd"]["serviceConfig"]["ExecStart"])
    assert "--no-keep-outputs" in argv and "--keep-derivations" in argv
    assert argv[argv.index("--metrics-interval") + 1] == "1min"
    assert "--metrics-file" not in argv
    assert "--socket" not in argv   # socket activation: a --socket would replace systemd's


@pytest.mark.parametrize("line", [
    f"{VENV_BIN}/gcrootsd --helper-socket /run/x --metrics-fil /tmp/m",  # an abbreviation
    f"{VENV_BIN}/gcrootsd --no-such-flag",
    f"{VENV_BIN}/gcroots-helper serve --allow-user",                     # a value missing
    f"{VENV_BIN}/gcroots-query --socket /run/x gc --yes --max-freed",
    f"{VENV_BIN}/gcroots-query profiles prune --all --keep-since",
    f"{VENV_BIN}/gcroots-helper serve --no-runtime-check",               # another command's flag
])
def test_command_line_check_can_fail(line):
    with pytest.raises(AssertionError):
        check_command_line(line)


# -- the VM test -------------------------------------------------------------------------

# What the NixOS test driver puts in the testScript's namespace.
DRIVER_GLOBALS = {"machine", "machines", "start_all", "subtest", "log", "driver", "retry",
                  "join_all", "serial_stdout_on", "serial_stdout_off", "polling_condition",
                  "create_machine", "run_tests", "test_script", "vlans", "os", "Machine"}


@pytest.fixture(scope="module")
def vm_test() -> dict:
    return nix_eval("let t = import ./tests/nix/eval-vm-test.nix; in { inherit (t) name testScript imports etc; }")


def undefined_names(script: str) -> set[str]:
    """Names read but bound nowhere in the script (nor builtins, nor the driver's)."""
    tree = ast.parse(script)
    bound, read = set(DRIVER_GLOBALS) | set(dir(builtins)), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            (read if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
    return read - bound


def test_vm_test_script_compiles_and_names_are_defined(vm_test):
    assert vm_test["name"] == "gcroots-multi-user"
    compile(vm_test["testScript"], "testScript", "exec")
    assert undefined_names(vm_test["testScript"]) == set()
    assert vm_test["imports"] == [str(REPO / "nix" / "module.nix")]


def test_undefined_name_check_can_fail():
    assert undefined_names("machine.succeed('x')\nmachin.succeed('y')\n") == {"machin"}


def test_vm_test_files(vm_test, tmp_path):
    etc = vm_test["etc"]
    mk = tmp_path / "mk.nix"
    mk.write_text(etc["gcroots-test/mk.nix"])
    out = subprocess.run(["nix-instantiate", "--parse", str(mk)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    compile(etc["gcroots-test/many-roots.py"], "many-roots.py", "exec")
    script = tmp_path / "kill.sh"
    script.write_text(etc["gcroots-test/kill-helper-mid-scan.sh"])
    out = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


def test_vm_test_derivation_evaluates(vm_test, tmp_path):
    """mk.nix as the VM's nix-build reads it: a derivation with its
    dependencies in its arguments (instantiated here without building: Nix
    2.8 checks the builder's path only when building)."""
    text = vm_test["etc"]["gcroots-test/mk.nix"].replace(
        'builtins.storePath "/nix/store/00000000000000000000000000000000-busybox"', '"/bin"')
    mk = tmp_path / "mk.nix"
    mk.write_text(text)
    expr = (f'let mk = import {mk}; top = mk {{ name = "top"; deps = [ (mk {{ name = "dep"; }}) ]; }};'
            ' in { inherit (top) name builder args; }')
    got = nix_eval(expr)
    assert got["name"] == "top" and got["builder"] == "/bin/bin/sh"
    assert re.fullmatch(r"echo top /nix/store/[0-9a-z]{32}-dep > \$out", got["args"][1]), got


# -- the flake --------------------------------------------------------------------------

def test_flake_outputs():
    flake = nix_eval("import ./tests/nix/eval-flake.nix")
    assert flake["inputs"] == {"nixpkgs": "github:NixOS/nixpkgs/nixos-unstable"}
    assert {"packages", "nixosModules", "checks", "overlays", "formatter"} <= set(flake["outputs"])
    systems = {"x86_64-linux", "aarch64-linux"}
    assert set(flake["packages"]) == systems == set(flake["checks"])
    for system in systems:
        assert flake["packages"][system]["default"] == flake["packages"][system]["gcroots"]
        assert flake["packages"][system]["gcroots-helper"].startswith("gcroots-helper-")
        assert flake["checks"][system]["multi-user"] == f"test:{REPO}/nix/tests/multi-user.nix"
    module = str(REPO / "nix" / "module.nix")
    assert flake["nixosModules"] == {"default": module, "gcroots": module}
    assert flake["overlay"] == f"gcroots-{PYPROJECT['project']['version']}"
