"""The README's first commands are what a newcomer runs: they must stay runnable as written."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks() -> list[str]:
    return re.findall(r"```(?:sh|bash)\n(.*?)```", README, re.S)


def _commands(block: str) -> list[str]:
    return [command.strip() for command in block.strip().split("&&")]


def test_the_test_command_installs_before_it_runs_the_tests_as_ci_does():
    (test_block,) = [block for block in _blocks() if "pytest" in block]
    commands = _commands(test_block)
    assert commands[:2] == ["python3 -m venv .venv", ". .venv/bin/activate"]
    install = commands.index('pip install -e ".[test]"')
    assert commands.index("pip install torch==2.13.0") < install < commands.index("python -m pytest -q")
    ci = (ROOT / ".ci" / "run").read_text()
    ci_lines = [line.strip() for line in ci.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    positions = []
    for command in commands:  # each README command, in order, in .ci/run (pip may get -q / -c there)
        pattern = re.escape(command).replace(r"pip\ install", r"pip\ install(?:\ -q)?(?:\ -c\ \S+)?")
        matches = [i for i, line in enumerate(ci_lines) if re.fullmatch(pattern, line)]
        assert matches, f".ci/run lacks the README's {command!r}"
        positions.append(matches[0])
    assert positions == sorted(positions)


def test_the_first_commands_run_in_a_posix_shell_and_make_a_virtual_environment():
    first = _blocks()[:3]
    assert len(first) == 3 and any("tiny-checkpoint" in block for block in first)
    for block in first:
        assert "<(" not in block, "process substitution is bash-only"
        assert block.startswith("python3 -m venv .venv && . .venv/bin/activate && ")
