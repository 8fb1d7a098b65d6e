"""The three commands document themselves: --version from the package's
metadata; every subcommand a description and examples, every flag a help
text naming its default and choices; man pages and bash/zsh/fish
completions generate from the same argparse definitions (scripts/manpages)."""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from importlib.metadata import version

import pytest

from gcroots.client.cli import build_parser as query_parser
from gcroots.daemon.cli import build_parser as daemon_parser
from gcroots.helper.cli import build_parser as helper_parser

from .support import DAEMON, HELPER, QUERY, REPO

PARSERS = {"gcroots-query": query_parser, "gcrootsd": daemon_parser,
           "gcroots-helper": helper_parser}


def all_parsers(parser: argparse.ArgumentParser, path: str):
    """(name, parser) of a command and every subcommand below it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from all_parsers(sub, f"{path} {name}")


def undocumented(parser: argparse.ArgumentParser, path: str) -> list[str]:
    problems = []
    if path.count(" ") and not (parser.description and len(parser.description) > 40):
        problems.append(f"{path}: no description")
    if path.count(" ") and "examples:" not in (parser.epilog or "") and not any(
            isinstance(a, argparse._SubParsersAction) for a in parser._actions):
        problems.append(f"{path}: no examples")
    formatter = parser._get_formatter()
    for a in parser._actions:
        if a.help == argparse.SUPPRESS or isinstance(a, argparse._SubParsersAction):
            continue
        flag = "/".join(a.option_strings) or a.dest
        if not a.help:
            problems.append(f"{path} {flag}: no help")
            continue
        text = formatter._expand_help(a) if a.option_strings else a.help
        default = a.default
        if (a.option_strings and default not in (None, False, argparse.SUPPRESS, [])
                and "default" not in text):
            problems.append(f"{path} {flag}: default {default!r} not said")
        if a.choices and a.option_strings and not a.metavar:
            continue  # argparse shows {a,b,c} itself
        if a.choices and a.metavar and not all(str(c) in text for c in a.choices):
            problems.append(f"{path} {flag}: choices not said")
    return problems


@pytest.mark.parametrize("prog", sorted(PARSERS))
def test_every_subcommand_and_flag_is_documented(prog):
    problems = []
    for path, parser in all_parsers(PARSERS[prog](), prog):
        problems += undocumented(parser, path)
    assert problems == []


def test_the_check_can_fail():
    p = argparse.ArgumentParser(prog="x")
    sub = p.add_subparsers()
    s = sub.add_parser("y", help="y")
    s.add_argument("--top", type=int, default=20, help="how many")
    s.add_argument("--bare")
    assert undocumented(s, "x y") == ["x y: no description", "x y: no examples",
                                      "x y --top: default 20 not said", "x y --bare: no help"]


@pytest.mark.parametrize("argv", [[QUERY], [DAEMON], [HELPER]])
def test_version_from_the_package_metadata(argv):
    out = subprocess.run([*argv, "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout == f"{argv[0].rsplit('/', 1)[1]} {version('gcroots')}\n"


def test_help_states_defaults_and_examples():
    out = subprocess.run([QUERY, "cost", "--help"], capture_output=True, text=True).stdout
    assert re.search(r"--top N\s+show the N biggest \(0: all\) \(default: 20\)", out), out
    assert "examples:\n  gcroots-query cost --top 10" in out
    out = subprocess.run([QUERY, "roots", "--help"], capture_output=True, text=True).stdout
    assert not re.search(r"^\s+--(older-than|match|ask)", out, re.M)  # prune's (issue 15)
    out = subprocess.run([DAEMON, "--help"], capture_output=True, text=True).stdout
    assert "--log-level {debug,info,warning,error}" in out and "(default: info)" in out


def test_man_pages_and_completions_generate(tmp_path):
    out = subprocess.run([str(REPO / "scripts/manpages"), str(tmp_path), str(support_python())],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    for prog in PARSERS:
        page = tmp_path / "man/man1" / f"{prog}.1"
        text = page.read_text()
        assert text.startswith(".TH") and version("gcroots") in text
        if shutil.which("man"):
            shown = subprocess.run(["man", "-l", str(page)], capture_output=True, text=True,
                                   env={"MANWIDTH": "100", "PATH": "/usr/bin:/bin"}).stdout
            assert "SYNOPSIS" in shown and "examples:" in shown
        bash = tmp_path / "completions/bash" / prog
        assert subprocess.run(["bash", "-n", str(bash)]).returncode == 0
        assert re.search(rf"complete .*-F _shtab_{prog.replace('-', '_')} {prog}\n", bash.read_text())
        assert (tmp_path / "completions/zsh" / f"_{prog}").read_text().startswith(f"#compdef {prog}")
        assert f"complete -c {prog}" in (tmp_path / "completions/fish" / f"{prog}.fish").read_text()
    query = (tmp_path / "man/man1/gcroots-query.1").read_text().replace("\\-", "-")
    for command in ("clean", "gc", "why", "profiles prune", "roots prune"):
        assert f"gcroots-query {command}" in query
    # bash completes subcommands and flags.
    script = tmp_path / "completions/bash/gcroots-query"
    words = subprocess.run(
        ["bash", "-c", f"source {script}; COMP_WORDS=(gcroots-query cl); COMP_CWORD=1; "
                       "_shtab_gcroots_query; printf '%s\\n' \"${COMPREPLY[@]}\"; "
                       "COMP_WORDS=(gcroots-query gc --ensure); COMP_CWORD=2; "
                       "_shtab_gcroots_query; printf '%s\\n' \"${COMPREPLY[@]}\""],
        capture_output=True, text=True).stdout.split()
    assert words == ["clean", "--ensure-free"], words


def support_python():
    import sys
    return sys.executable


LEAN_ARGV = [["dead"], ["--socket", "/s", "live", "--json"], ["--json", "why", "/nix/store/x", "--all"],
             ["cost", "--top", "3"], ["--standalone", "--root", "/mnt", "stats"]]


@pytest.mark.parametrize("argv", LEAN_ARGV)
def test_lean_parser_parses_as_the_whole_one(argv):
    """`dead` and its kind parse without gc/clean/profiles' modules, to the
    same arguments."""
    assert vars(query_parser(lean=True).parse_args(argv)) == vars(query_parser().parse_args(argv))


def test_dead_loads_no_other_command_and_errors_name_every_command():
    code = ("import sys\nfrom gcroots.client import cli\n"
            "rc = cli.main(['--socket', '/nonexistent/gcrootsd.sock', 'dead'])\n"
            "print(rc, sorted(m for m in sys.modules if m.endswith(('_cmd', 'profiles', 'indirect'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.split("\n")[0] == "1 []", out
    # A lean argv that does not parse: the error is the whole parser's.
    out = subprocess.run([QUERY, "--socket", "/x", "nosuch", "dead"], capture_output=True, text=True)
    assert out.returncode == 2 and "'stats', 'gc', 'delete', 'clean', 'profiles')" in out.stderr, out
    assert "\n" not in out.stderr.split("error: ")[1].rstrip("\n")
