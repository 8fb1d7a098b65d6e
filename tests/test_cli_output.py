"""stdout carries only the answer: with --standalone, where the collection
runs in gcroots-query's own process, everything it logs goes to stderr."""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import threading
import time

from . import support


def test_standalone_json_parses_after_every_log_event(scratch):
    """A store where a collection logs all it can: a stale auto link, a
    stale temp roots file, a dangling Refs row, an unreadable nix.conf, a
    Nix process announcing a root (and garbage) on gc-socket.  The --json
    answer of every command is one JSON document on stdout; the events are
    JSON lines on stderr."""
    root = scratch / "store"
    names = [f"p{i}" for i in range(40)]
    full = support.tiny_store(root, names, refs=[(0, 1)], derivers={}, roots=[0])
    state = root / "nix/var/nix"
    (state / "gcroots/auto").mkdir()
    os.symlink(scratch / "gone/result", state / "gcroots/auto/stale")
    (state / "temproots/4000000").write_bytes(full[5].encode() + b"\0")  # nobody holds it
    db = sqlite3.connect(state / "db/db.sqlite")
    db.execute("INSERT INTO Refs VALUES (1, 999999)")
    db.commit()
    db.close()
    conf = scratch / "etc"
    (conf / "nix.conf").mkdir(parents=True)  # unreadable as a file: Nix skips it, we warn
    env = dict(os.environ, NIX_CONF_DIR=str(conf))
    base = [support.QUERY, "--standalone", "--root", str(root), "--no-runtime"]

    def run(*args: str) -> tuple[object, list[dict]]:
        out = subprocess.run([*base, *args, "--json"], capture_output=True, env=env, timeout=120)
        assert out.returncode == 0, out.stderr
        events = [json.loads(line) for line in out.stderr.decode().splitlines()
                  if line.startswith("{")]
        return json.loads(out.stdout), events

    answers = {cmd: run(cmd)[0] for cmd in ("roots", "live", "dead", "cost", "stats")}
    assert answers["stats"]["dead_paths"] == 38
    answers["why"] = run("why", full[1])[0]
    answers["gc --dry-run"] = run("gc", "--dry-run")[0]
    assert answers["gc --dry-run"]["paths"] == 38

    announced = []

    def announce() -> None:  # a Nix process needing p7 while we collect
        sock = state / "gc-socket/socket"
        deadline = time.monotonic() + 60
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        while True:  # refused between bind() and listen(): Nix's client retries too
            c = socket.socket(socket.AF_UNIX)
            try:
                c.connect(str(sock))
                break
            except ConnectionRefusedError:
                c.close()
                time.sleep(0.005)
        c.sendall(b"not a store path\n" + full[7].encode() + b"\n")
        got = b""
        while len(got) < 2 and (more := c.recv(2)):
            got += more
        announced.append(got)
        c.close()

    t = threading.Thread(target=announce)
    t.start()
    done, events = run("gc", "--yes", "--throttle", "0.05")
    t.join()
    assert announced == [b"11"]
    kinds = {e["event"] for e in events}
    assert {"stale_link_removed", "stale_temproots_removed", "gc_socket_root",
            "gc_socket_garbage", "db_dangling_rows", "nix_conf_unreadable"} <= kinds, kinds
    assert full[7] not in done["paths_list"] and done["paths"] == 37
    answers["profiles list"] = run("profiles", "list", "--root", str(root))[0]
    assert answers["dead"] and answers["why"]["chains"]


def test_json_errors_are_json_objects_for_every_command(scratch):
    """With --json an error is one JSON object on stdout -- {"error", "exit"}
    -- with the same exit code as without (issue 15: they were plain text)."""
    nowhere = ["--socket", str(scratch / "no.sock")]
    cases = {  # argv -> exit code
        ("roots",): 1, ("live",): 1, ("dead",): 1, ("stats",): 1, ("cost",): 1,
        ("why", "/nix/store/" + "a" * 32 + "-x"): 1, ("gc", "--dry-run"): 1,
        ("gc", "--yes"): 1, ("delete", "/nix/store/" + "a" * 32 + "-x"): 1,
        ("clean", "--dry-run"): 1,
        ("why", ""): 2, ("cost", "--top", "-1"): 2, ("gc", "--max-freed", "10Q"): 2,
        ("gc",): 2,   # not a terminal, no --yes
        ("bogus",): 2, ("--root", "/x", "dead"): 2,
        ("profiles", "prune", "--all"): 2, ("roots", "prune"): 2,
        ("profiles", "delete-generations", "/nonexistent/p", "x"): 2,
        ("profiles", "delete-generations", "/nonexistent/p", "old"): 1,
    }
    for argv, code in cases.items():
        plain = subprocess.run([support.QUERY, *nowhere, *argv], capture_output=True,
                               stdin=subprocess.DEVNULL, timeout=60)
        out = subprocess.run([support.QUERY, *nowhere, "--json", *argv], capture_output=True,
                             stdin=subprocess.DEVNULL, timeout=60)
        assert plain.returncode == out.returncode == code, (argv, plain.stderr, out.stdout)
        doc = json.loads(out.stdout)
        assert doc["exit"] == code and doc["error"], (argv, doc)
        assert plain.stdout == b"" and doc["error"].split(": ")[-1] in plain.stderr.decode(), argv


def test_an_answer_that_cannot_be_written_is_one_line(scratch):
    """stdout on a full disk (`> report.txt` where the collection was to
    make room): one line naming the failure, exit 1, never a traceback (a
    collection that happened stays done)."""
    root = scratch / "store"
    support.make_store(root, paths=150, seed=135, quirks=0, roots=3, indirect=2, stale=0)
    base = [support.QUERY, "--standalone", "--root", str(root)]
    for argv in (["--no-runtime", "stats"], ["--no-runtime", "--json", "stats"],
                 ["--no-runtime", "gc", "--dry-run"], ["profiles", "list"],
                 ["clean", "--dry-run"], ["--no-runtime", "gc", "--yes"]):
        with open("/dev/full", "wb") as full:
            out = subprocess.run(base + argv, stdout=full, stderr=subprocess.PIPE, timeout=120,
                                 env=dict(os.environ, GCROOTS_SYSTEM_LINKS=""))
        err = out.stderr.decode()
        assert out.returncode == 1 and "Traceback" not in err, (argv, err)
        lines = [x for x in err.splitlines() if not x.startswith("{")]  # not the log's
        assert lines == ["gcroots-query: cannot write the answer to stdout: No space left on "
                         "device"], (argv, err)
    assert not support.standalone(root, "dead").stdout  # gc --yes did collect


def test_a_big_path_answer_grows_the_stdout_pipe_and_is_written_whole(scratch):
    """A list of paths of more than 64 KiB to a pipe: the client grows the
    pipe to take up to a MiB at once (fewer wake-ups of its reader), and
    what arrives is the whole answer, one path a line, as nix-store's."""
    import fcntl
    root = scratch / "store"
    support.make_store(root, paths=3000, seed=136, quirks=0, roots=3, indirect=0, stale=0)
    r, w = os.pipe()
    try:
        assert fcntl.fcntl(r, fcntl.F_GETPIPE_SZ) == 1 << 16
        p = subprocess.Popen([support.QUERY, "--standalone", "--root", str(root), "--no-runtime",
                              "dead"], stdout=w, stderr=subprocess.PIPE)
        os.close(w)
        w = -1
        with os.fdopen(r, "rb", closefd=False) as f:
            out = f.read()
        assert p.wait(120) == 0, p.stderr.read()
        p.stderr.close()
        size = fcntl.fcntl(r, fcntl.F_GETPIPE_SZ)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    assert len(out) > 1 << 16 and size >= min(len(out), 1 << 20)  # (the kernel rounds up)
    # A pipe made bigger by whoever reads it is never made smaller.
    r, w = os.pipe()
    try:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, 1 << 20)
        p = subprocess.Popen([support.QUERY, "--standalone", "--root", str(root), "--no-runtime",
                              "dead"], stdout=w, stderr=subprocess.DEVNULL)
        os.close(w)
        w = -1
        with os.fdopen(r, "rb", closefd=False) as f:
            assert f.read() == out
        assert p.wait(120) == 0 and fcntl.fcntl(r, fcntl.F_GETPIPE_SZ) == 1 << 20
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    nix = support.oracle(root, "nix-store", "--gc", "--print-dead").stdout
    assert sorted(out.splitlines()) == sorted(nix.splitlines())


def test_a_standalone_dead_answer_loads_neither_numpy_nor_trio(scratch):
    """A one-shot `--standalone dead` pays for no import it does not use:
    numpy is the daemon's graph (43 ms of start-up), trio the daemon's
    loop.  It answers, in a fresh interpreter that then lists what it
    loaded."""
    import sys
    support.make_store(scratch / "store", paths=200, seed=5, roots=5)
    code = ("import sys\nfrom gcroots.client import cli\n"
            "try:\n    cli.main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "sys.stdout.flush()\n"
            "print('LOADED', *sorted(m for m in sys.modules if m in ('numpy', 'trio')), "
            "file=sys.stderr)\n")
    out = subprocess.run([sys.executable, "-c", code, "--standalone", "--root",
                          str(scratch / "store"), "dead"], capture_output=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(b"\n") > 0
    assert out.stderr.decode().splitlines()[-1].strip() == "LOADED", out.stderr


def test_a_query_through_gcrootsd_loads_neither_dataclasses_nor_shutil(tmp_path):
    """`gcroots-query dead` through gcrootsd starts in ~33 ms instead of
    ~46: its protocol events are NamedTuples, StoreLayout is loaded only
    where a flag needs it, and argparse's formatters find the width
    without shutil (dataclasses and inspect were ~9 ms of every start,
    shutil with bz2 and lzma ~3).  A fresh interpreter asks a socket
    nobody serves, and then lists what it loaded."""
    import sys
    code = ("import sys\nfrom gcroots.client import cli\n"
            "try:\n    cli.main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
            "print('LOADED', *sorted(m for m in sys.modules if m in "
            "('dataclasses', 'inspect', 'shutil', 'gcroots.layout')), file=sys.stderr)\n")
    out = subprocess.run([sys.executable, "-c", code, "--socket", str(tmp_path / "none.sock"),
                          "dead"], capture_output=True)
    assert b"cannot connect to gcrootsd" in out.stderr, out.stderr
    assert out.stderr.decode().splitlines()[-1].strip() == "LOADED", out.stderr
