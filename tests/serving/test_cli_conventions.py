"""The CLI's conventions that need no live service: help on every option, `--version`, validated
choices, and one-line errors with distinct exit codes for a missing file or an unreachable URL."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from importlib.metadata import version

import pytest

from serving.cli import build_parser
from serving.cli_client import EXIT_UNREACHABLE, EXIT_USAGE
from serving.local_stack import free_port


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "serving.cli", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


def subcommands(parser: argparse.ArgumentParser, prefix: str = "") -> list[tuple[str, argparse.ArgumentParser]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                found.append((f"{prefix}{name}", sub))
                found.extend(subcommands(sub, f"{prefix}{name} "))
    return found


def test_every_command_and_option_has_help() -> None:
    parser = build_parser()
    commands = dict(subcommands(parser))
    assert {"submit", "status", "watch", "list", "cancel", "retry", "download"} <= set(commands)
    for name, sub in commands.items():
        if name == "bench":  # every argument belongs to scripts/bench_gpu.py's own parser
            continue
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help, f"svd-serve {name}: {action.option_strings or action.dest} has no help"


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0 and result.stdout == f"svd-serve {version('svd-serve')}\n"


@pytest.mark.parametrize("args", [
    ["submit", "x.png", "--priority", "urgent"],
    ["submit", "x.png", "--outputs", "mp4,avi"],
    ["list", "--status", "done"],
    ["submit", "x.png", "--num-frames", "0"],
])
def test_invalid_choices_are_usage_errors(args: list[str]) -> None:
    result = run(*args)
    assert result.returncode == EXIT_USAGE and result.stdout == ""
    assert "error: argument" in result.stderr and "Traceback" not in result.stderr


def test_a_missing_image_is_one_line_not_a_traceback(tmp_path: object) -> None:
    result = run("submit", "/no/such/image.png")
    assert result.returncode == EXIT_USAGE and result.stdout == ""
    assert result.stderr == "svd-serve submit: no such file: /no/such/image.png\n"


def test_an_unreachable_service_is_one_line_not_a_traceback() -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    for args in (["status", "abc"], ["submit", __file__, "--wait"], ["list", "--json"]):
        result = run(*args, env={"SVD_SERVE_URL": url})
        assert result.returncode == EXIT_UNREACHABLE, result.stderr
        assert result.stdout == ""
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"svd-serve {args[0]}: unreachable: ") and url in lines[0]
