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
