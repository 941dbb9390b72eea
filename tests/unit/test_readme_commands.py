"""Every `lmtrain` command the README shows parses as a shell would pass it and composes into its
typed config: no documented example fails on quoting, an unknown key or a bad value."""

from __future__ import annotations

import re
import shlex

import pytest

from lmtrain_testing import REPO, compose

README = REPO / "README.md"


def readme_commands() -> list[str]:
    """`lmtrain ...` lines of the README's code blocks (continuation lines joined); lines with `...`
    are sketches, not commands."""
    lines, in_block, pending = [], False, None
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            in_block = not in_block
            continue
        if pending is not None:
            line, pending = pending + " " + line.strip(), None
        elif not (in_block and line.startswith("lmtrain ")):
            continue
        if line.rstrip().endswith("\\"):
            pending = line.rstrip()[:-1]
        elif " ... " not in line:
            lines.append(line)
    return lines


def test_the_readme_shows_commands():
    commands = {line.split()[1] for line in readme_commands()}
    assert {"prepare", "train", "generate", "eval", "predict", "export", "plan"} <= commands


@pytest.mark.parametrize("line", readme_commands())
def test_a_readme_command_composes(line, tmp_path, monkeypatch):
    from lmtrain.cli import hydra_args
    from lmtrain.config import to_typed

    # <run> and the like stand for names the user fills in (in bash they would be redirections).
    # cluster=mysite stands for the user's own site file, of which conf/cluster/example_gpu_site.yaml is the model.
    line = re.sub(r"<[^>]+>", "x", line).replace("cluster=mysite", "cluster=example_gpu_site")
    argv = shlex.split(line, comments=True)
    command, args = argv[1], argv[2:]
    if "-m" in args:  # Hydra's multirun: compose the grid's first point
        args = [re.sub(r"=([^,\[\]]+),.*$", r"=\1", a) for a in args if a != "-m"]
    monkeypatch.chdir(tmp_path)
    cfg = compose(command.replace("-", "_"), hydra_args(command, args))
    typed = to_typed(cfg)
    for arg in args:  # a free-text value arrives whole, as the shell passed it
        key, _, value = arg.partition("=")
        if key in ("prompt", "text", "question", "context"):
            assert getattr(typed, key) == value, arg
