"""Every ``--flag`` the library names (errors, hints, docstrings) is a flag the CLI defines."""

from __future__ import annotations

import argparse
import ast
import re
from pathlib import Path

import refusal_dir
from refusal_dir.cli import build_parser

FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9]*(?:-[a-z0-9]+)*")
# Strings that are another program's command line, not advice to a refusal-dir user.
NOT_OUR_CLI = {("config.py", "--write-defaults"), ("offline.py", "--quiet"), ("offline.py", "--no-deps"), ("offline.py", "--only-binary"), ("offline.py", "--dest")}


def cli_flags() -> set[str]:
    parser = build_parser()
    flags = set(parser._option_string_actions)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                flags |= set(subparser._option_string_actions)
    return {flag for flag in flags if flag.startswith("--")}


def named_flags(source: str) -> set[str]:
    """The ``--flags`` in the string literals (f-string parts included) of a module."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found |= set(FLAG.findall(node.value))
    return found


def test_named_flags_exist() -> None:
    known = cli_flags()
    assert {"--pairs-file", "--directions-dir", "--fresh"} <= known
    package = Path(refusal_dir.__file__).parent
    unknown = sorted(
        f"{path.relative_to(package)}: {flag}"
        for path in package.rglob("*.py")
        for flag in named_flags(path.read_text(encoding="utf-8"))
        if flag not in known and (path.name, flag) not in NOT_OUR_CLI
    )
    assert not unknown, f"flags the CLI does not define: {unknown}"


def test_the_check_sees_flags_in_f_strings() -> None:
    flags = named_flags('x = 1\nraise ValueError(f"bad {x}: pass --no-such-flag instead")\n')
    assert flags == {"--no-such-flag"} and "--no-such-flag" not in cli_flags()


def test_cross_entropy_flags_set_the_config(tmp_path: Path) -> None:
    from refusal_dir.cli import _config

    answers = tmp_path / "answers.jsonl"
    args = build_parser().parse_args(
        ["run", "--model", "m", "--output-dir", str(tmp_path / "o"), "--no-cross-entropy", "--harmless-answers-file", str(answers)]
    )
    config = _config(args)
    assert config.evaluation.cross_entropy is False and config.data.harmless_answers == str(answers)
    default = _config(build_parser().parse_args(["run", "--model", "m", "--output-dir", str(tmp_path / "o")]))
    assert default.evaluation.cross_entropy is True and default.data.harmless_answers == "shipped"
