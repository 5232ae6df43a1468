"""Every Makefile target works from a fresh clone: its recipe parses (``make -n``), the modules it
runs exist and answer ``--help``, and every file it names is inside the repository."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAKEFILE = ROOT / "Makefile"
PROJECT_PACKAGES = ("analysis", "bench", "engram_jax", "sweeps")


def _lines() -> list[str]:
    """The Makefile's lines with backslash continuations joined."""
    return MAKEFILE.read_text().replace("\\\n", " ").splitlines()


def targets() -> dict[str, list[str]]:
    """Rule name -> recipe lines (the tab-indented lines under it)."""
    rules: dict[str, list[str]] = {}
    current = None
    for line in _lines():
        if line.startswith("\t") and current is not None:
            rules[current].append(line.strip())
            continue
        m = re.match(r"^([A-Za-z$][\w.$()/-]*)\s*:(?!=)", line)
        current = m.group(1) if m else None
        if current is not None:
            rules.setdefault(current, [])
    return rules


def phony() -> list[str]:
    for line in _lines():
        if line.startswith(".PHONY:"):
            return line.split(":", 1)[1].split()
    return []


def recipe(target: str) -> list[str]:
    return targets()[target]


def _defaults() -> dict[str, str]:
    """``NAME ?= value`` and ``NAME := value`` defaults of the Makefile's variables."""
    out = {}
    for line in _lines():
        m = re.match(r"^([A-Z_]+)\s*[:?]?=\s*(.*)$", line)
        if m:
            out[m.group(1)] = m.group(2).strip()
    return out


def _modules(line: str) -> list[tuple[str, str | None]]:
    """(module, subcommand or None) for every ``-m module [subcommand]`` of a recipe line."""
    found = []
    for m in re.finditer(r"-m\s+([\w.]+)(?:\s+([a-z][\w-]*))?", line):
        found.append((m.group(1), m.group(2)))
    return found


def test_every_phony_target_has_a_rule():
    rules = targets()
    assert phony(), "no .PHONY line"
    missing = [t for t in phony() if t not in rules]
    assert not missing, f".PHONY names targets without a rule: {missing}"


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
@pytest.mark.parametrize("target", phony())
def test_target_dry_runs(target):
    out = subprocess.run(["make", "-n", "-C", str(ROOT), target], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr


def test_recipes_stay_inside_the_clone():
    """No recipe reads a file outside the repository (a clone has nothing beside it)."""
    for target, lines in targets().items():
        for line in lines:
            for tok in line.split():
                tok = tok.strip("\"'")
                assert not tok.startswith("../") and "/../" not in tok, \
                    f"make {target} reaches outside the repository: {line}"


def test_files_named_by_recipes_and_defaults_exist():
    names = []
    for target, lines in targets().items():
        for line in lines:
            names += [(target, t) for t in line.split()
                      if re.fullmatch(r"[\w./-]+\.(py|yaml|yml|toml|txt|md|json)", t)]
    grid = _defaults()["GRID"]
    names.append(("GRID default", grid))
    missing = [(t, n) for t, n in names if not (ROOT / n).is_file()]
    assert not missing, f"files named by the Makefile that do not exist: {missing}"


def test_modules_run_by_recipes_exist():
    seen = set()
    for target, lines in targets().items():
        for line in lines:
            for mod, _ in _modules(line):
                seen.add(mod)
                assert importlib.util.find_spec(mod) is not None, \
                    f"make {target} runs python -m {mod}, which is not installed"
    assert {"analysis", "pytest", "sweeps.run", "bench.run"} <= seen


def _project_commands() -> list[tuple[str, list[str]]]:
    out = []
    for target, lines in targets().items():
        for line in lines:
            for mod, sub in _modules(line):
                if mod.split(".")[0] in PROJECT_PACKAGES:
                    out.append((target, [mod] + ([sub] if sub and mod == "analysis" else [])))
    return out


@pytest.mark.parametrize("target,cmd", _project_commands(),
                         ids=[" ".join(c) for _, c in _project_commands()])
def test_project_commands_answer_help(target, cmd):
    """``python -m <module> [subcommand] --help`` exits 0: the module and subcommand exist."""
    out = subprocess.run([sys.executable, "-m", *cmd, "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, f"make {target}: python -m {' '.join(cmd)} --help\n{out.stderr}"
