"""The helper's Landlock read set on a NixOS-like installation: the
interpreter, the standard library, each Python package (cffi's backend too)
and libseccomp in
prefixes of their own, none under /usr, found through PYTHONHOME,
PYTHONPATH and LD_LIBRARY_PATH as NixOS's wrappers and RUNPATHs find them.

Built under a temp dir from copies (distinct inodes, so a rule on a copy
grants nothing of the original): Debian's python3.11 and its stdlib, cffi's
_cffi_backend extension (with the libffi it links, if it links one: the
wheel's has it built in, NixOS's links libffi.so.8) and libseccomp.so.2 (each
copied to a prefix of its own), the gcroots sources, and trio, which the helper never
imports (as a full gcroots package would have it on
the path).  The helper must serve and scan there with --require-sandbox,
import nothing after restrict_self, and be able to read exactly where its
code came from: not trio, not the interpreter."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import tomllib
from pathlib import Path

import pytest

from gcroots.helper import sandbox

from . import support
from .support import HELPER, lines, read_root_stream, roots_of
from .test_helper_scan import private_homes

PY = f"python{sys.version_info.major}.{sys.version_info.minor}"
SECRET = "only-for-code-that-was-loaded\n"

AUDIT = """\
import os, sys
if os.environ.get("GCROOTS_TEST_AUDIT_IMPORTS"):
    def _hook(event, args):
        if event == "import":
            sys.stderr.write("IMPORT %s\\n" % args[0])
            sys.stderr.flush()
    sys.addaudithook(_hook)
"""


def _copy_package(name: str, dest: Path) -> None:
    """A top-level package or module of the running venv, copied with its
    files into dest."""
    dest.mkdir(parents=True, exist_ok=True)
    spec = importlib.util.find_spec(name)
    if spec.submodule_search_locations:
        src = Path(next(iter(spec.submodule_search_locations)))
        shutil.copytree(src, dest / src.name, ignore=shutil.ignore_patterns("__pycache__"))
    else:
        shutil.copy2(spec.origin, dest)


@pytest.fixture(scope="module")
def layout():
    top = Path(tempfile.mkdtemp(prefix="gcroots-test-split-", dir="/tmp"))
    os.chmod(top, 0o755)
    t = {name: top / name for name in ("python", "stdlib", "libffi", "libseccomp", "cffi",
                                       "gcroots", "trio", "audit")}
    base_exe = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    (t["python"] / "bin").mkdir(parents=True)
    shutil.copy2(base_exe, t["python"] / "bin" / PY)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    shutil.copytree(stdlib, t["stdlib"] / "lib" / PY, symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__", "site-packages", "dist-packages",
                                                  "test", "idlelib", "tkinter", "turtledemo"))
    for name, lib in LIBS.items():
        (t[name] / "lib").mkdir(parents=True)
        found = lib if "/" in lib else next(m for m in _mapped(os.getpid()) if "/" + lib in m)
        shutil.copy2(found, t[name] / "lib" / Path(lib).name)
    site = {name: t[name] / "lib" / PY / "site-packages"
            for name in ("cffi", "gcroots", "trio", "audit")}
    _copy_package("_cffi_backend", site["cffi"])
    _copy_package("trio", site["trio"])
    (site["trio"] / "trio" / "secret.txt").write_text(SECRET)
    # The helper's build (nix/package.nix's passthru.helper): the packages
    # it imports, from the sources, as pyproject.toml maps them.
    root = support.REPO / tomllib.loads((support.REPO / "pyproject.toml").read_text())["tool"][
        "setuptools"]["package-dir"][""]
    for package in ("gcroots", "gcroots.protocol", "gcroots.helper"):
        # (gcroots/'s links to the sub-packages' folders left out: each is
        # copied from the folder its link names, as the wheel has them)
        shutil.copytree((root / package.replace(".", "/")).resolve(),
                        site["gcroots"] / package.replace(".", "/"),
                        ignore=shutil.ignore_patterns("__pycache__", "protocol", "helper",
                                                      "daemon", "client"))
    (site["gcroots"] / "gcroots" / "secret.txt").write_text(SECRET)
    site["audit"].mkdir(parents=True)
    (site["audit"] / "sitecustomize.py").write_text(AUDIT)
    (t["gcroots"] / "bin").mkdir()
    helper = t["gcroots"] / "bin" / "gcroots-helper"
    helper.write_text(f"#!{t['python']}/bin/{PY}\nimport sys\nfrom gcroots.helper.cli import main\n"
                      "sys.exit(main())\n")
    helper.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "PYTHONHOME": str(t["stdlib"]),
           "PYTHONPATH": ":".join(str(p) for p in site.values()),
           "LD_LIBRARY_PATH": f"{t['libffi'] / 'lib'}:{t['libseccomp'] / 'lib'}",
           "PYTHONNOUSERSITE": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}
    yield {"top": top, "helper": helper, "env": env, "python": t["python"] / "bin" / PY,
           "prefixes": t, "site": site}
    subprocess.run(["rm", "-rf", "--one-file-system", str(top)], check=True)


@pytest.fixture(scope="module")
def store(users):
    top = Path(tempfile.mkdtemp(prefix="gcroots-test-split-store-", dir="/tmp"))
    os.chmod(top, 0o755)
    root = top / "store"
    support.make_store(root, paths=400, seed=43, roots=30, indirect=8, stale=2, quirks=1)
    private_homes(root)
    yield root
    subprocess.run(["rm", "-rf", "--one-file-system", str(top)], check=True)


def _libffi() -> str | None:
    """The libffi that cffi's backend links, or None: built in (the wheel's)."""
    import _cffi_backend
    libs = subprocess.run(["ldd", _cffi_backend.__file__], capture_output=True, text=True,
                          check=True).stdout
    return next((line.split("=>")[1].split()[0] for line in libs.splitlines()
                 if "libffi.so" in line), None)


# The shared libraries the helper loads from prefixes of their own.
LIBS = {name: lib for name, lib in (("libffi", _libffi()), ("libseccomp", sandbox.LIBSECCOMP)) if lib}


def _mapped(pid: int) -> set[str]:
    with open(f"/proc/{pid}/maps") as f:
        return {line.split(maxsplit=5)[5].strip() for line in f if len(line.split()) == 6}


def test_the_layout_is_split(layout):
    """Faithful: nothing of the helper's Python comes from /usr, cffi's
    backend, libffi (if linked) and libseccomp come from prefixes of their
    own (as in a NixOS closure)."""
    code = ("import _cffi_backend, gcroots.helper.sandbox, os, sys\n"
            "print(sys.prefix)\n"
            "for m in (_cffi_backend, gcroots.helper.sandbox, os):\n"
            "    print(m.__file__)\n"
            "print(open('/proc/self/maps').read())\n")
    out = subprocess.run([layout["python"], "-P", "-c", code], env=layout["env"], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    out, p = out.stdout, layout["prefixes"]
    prefix, *files = out.splitlines()[:4]
    assert prefix == str(p["stdlib"])
    for f, where in zip(files, ("cffi", "gcroots", "stdlib")):
        assert f.startswith(str(p[where]) + "/"), (f, where)
    for lib in LIBS:
        mapped = [line.split()[-1] for line in out.splitlines() if f"{lib}.so" in line]
        assert mapped and all(f.startswith(str(p[lib]) + "/") for f in mapped), mapped


def test_reads_only_where_its_code_came_from(layout, store):
    """Under the sandbox, a file beside the loaded gcroots modules is
    readable (tracebacks, later imports), one in trio's prefix -- on the
    path, never imported -- is not, nor the interpreter."""
    trio_secret = layout["site"]["trio"] / "trio" / "secret.txt"
    own = layout["site"]["gcroots"] / "gcroots" / "secret.txt"
    code = (
        "import json, os, sys\n"
        "from gcroots import log\n"
        "from gcroots.helper import sandbox\n"
        "from gcroots.layout import StoreLayout\n"
        "log.configure('test', json=True, plain=True)\n"
        f"box = sandbox.apply_for_serving(StoreLayout.make(None, None, {str(store)!r}),\n"
        "                                 require=True, log=log.get('t'))\n"
        "def read(path):\n"
        "    try:\n"
        "        with open(path, 'rb') as f:\n"
        "            return f.read().decode()\n"
        "    except OSError as e:\n"
        "        return e.errno\n"
        f"print(json.dumps([read(p) for p in ({str(own)!r}, {str(trio_secret)!r},\n"
        "                                      os.path.realpath(sys.executable))]))\n")
    out = subprocess.run([layout["python"], "-P", "-c", code], env=layout["env"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == [SECRET, 13, 13]   # EACCES
    granted = next(json.loads(line) for line in out.stderr.splitlines()
                   if '"landlock"' in line and '"read"' in line)["read"]
    top = str(layout["top"])
    ours = {g for g in granted if g.startswith(top)}
    site = layout["site"]
    # cffi's backend sits at the top of its site-packages: that directory.
    assert ours == {*(str(layout["prefixes"][lib] / "lib") for lib in LIBS),
                    str(layout["prefixes"]["stdlib"] / "lib" / PY), str(site["cffi"]),
                    str(site["gcroots"] / "gcroots"), str(site["audit"])}, granted


def _wait_for(log: Path, proc: subprocess.Popen, event: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if f'"event": "{event}"' in log.read_text():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the helper exited {proc.returncode}:\n{log.read_text()}")
        time.sleep(0.05)
    raise TimeoutError(log.read_text())


def _send_junk(sock: Path) -> None:
    """A peer that sends garbage and goes away: the error path is served too."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(sock))
        s.sendall(b"not the protocol" * 8)
        try:
            s.recv(100)
        except OSError:
            pass


def test_serves_and_scans_with_the_full_sandbox(layout, store, tmp_path):
    """`serve --require-sandbox` from the split layout: complete streams with
    the private homes' roots and a runtime root read through the /proc
    reader, equal to the venv's unsandboxed scan; `scan --require-sandbox`
    (which also reads the DB) prints the same; and nothing is imported
    once the sandbox is on."""
    valid = sorted(p.name for p in (store / "nix/store").iterdir() if not p.name.startswith("."))
    held = f"/nix/store/{valid[0]}"
    holder = subprocess.Popen(["env", f"GCROOTS_TEST_HELD={held}", "sleep", "300"])
    sock, log = tmp_path / "helper.sock", tmp_path / "helper.log"
    env = {**layout["env"], "GCROOTS_TEST_AUDIT_IMPORTS": "1"}
    try:
        with open(log, "wb") as f:
            proc = subprocess.Popen([layout["helper"], "serve", "--root", str(store), "--socket",
                                     str(sock), "--require-sandbox"], env=env, stderr=f)
        try:
            _wait_for(log, proc, "helper_listening")
            mapped = _mapped(proc.pid)
            for name, lib in LIBS.items():
                assert str(layout["prefixes"][name] / "lib" / Path(lib).name) in mapped
            backend = Path(importlib.util.find_spec("_cffi_backend").origin).name
            assert str(layout["site"]["cffi"] / backend) in mapped
            events, end, _ = read_root_stream(sock)
            assert end.complete, end.reason
            _send_junk(sock)
            again, end, _ = read_root_stream(sock)
            assert end.complete, end.reason
        finally:
            proc.terminate()
            proc.wait(10)
        out = subprocess.run([layout["helper"], "scan", "--root", str(store),
                              "--require-sandbox"], env=env, capture_output=True, timeout=120)
    finally:
        holder.kill()
        holder.wait()
    served = roots_of(events)
    assert roots_of(again) == served
    assert (f"/proc/{holder.pid}/environ".encode(), held.encode()) in served
    def venv_scan(*args: str) -> set[bytes]:
        return lines(subprocess.run([HELPER, "scan", "--root", str(store), "--no-runtime", *args],
                                    capture_output=True, check=True).stdout)
    static = {tuple(line.split(b" -> ", 1)) for line in venv_scan("--all-candidates")}
    assert {r for r in served if not r[0].startswith(b"/proc/")} == static
    assert any(b"/home/alice/" in label for label, _ in static)
    assert out.returncode == 0, out.stderr.decode()
    assert {line for line in lines(out.stdout) if not line.startswith(b"/proc/")} == venv_scan()
    for text in (log.read_text(), out.stderr.decode()):
        after = text[text.index('"event": "sandbox_applied"'):]
        assert "IMPORT " not in after, after[:3000]
