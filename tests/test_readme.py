"""What the README promises a newcomer, checked cheaply: it opens with the two commands (`.ci/run` runs
the second), every flag of `lorahive serve --help` is documented, its examples bound their output, the
CPU-only torch it suggests is the pinned one, and it sends nobody outside the repository."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
FENCED = re.compile(r"^```[a-z]*\n(.*?)^```", re.S | re.M)


def test_it_opens_with_the_install_and_serve_and_the_test_commands():
    serve, test = FENCED.findall(README)[:2]
    assert re.fullmatch(r"python3 -m venv \.venv && .* pip install torch==\S+ -e \. && lorahive serve\n", serve)
    assert re.fullmatch(r"python3 -m venv \.venv && .* pip install torch==\S+ -e '\.\[dev\]' && pytest\n", test)
    ci = (REPO / ".ci" / "run").read_text()
    pattern = re.search(r"grep -m1 -E '([^']+)' README\.md", ci).group(1)
    first_match = next(line for line in README.splitlines() if re.search(pattern, line))
    assert first_match + "\n" == test  # the line CI runs is the second command


def serve_flags() -> set[str]:
    env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    usage = subprocess.run([sys.executable, "-m", "server.cli", "serve", "--help"], cwd=REPO, env=env,
                           capture_output=True, text=True, check=True, timeout=120).stdout
    return set(re.findall(r"\[(--[a-z0-9-]+)", usage))


def test_every_serve_flag_is_documented():
    flags = serve_flags()
    assert {"--model", "--log-level", "--drain-timeout"} <= flags
    missing = sorted(flag for flag in flags if not re.search(rf"`{flag}[` ]", README))
    assert not missing, f"`lorahive serve --help` has flags the README does not document: {missing}"


def test_chat_examples_bound_their_output():
    calls = re.findall(r"chat\.completions\.create\((.*?)\n\)", README, re.S)
    assert calls and all("max_tokens=" in call for call in calls)


def test_the_cpu_torch_is_the_pinned_one():
    pinned = set(re.findall(r"torch==(\S+?)[ `]", README))
    assert len(pinned) == 1, pinned
    cpu = re.search(r"pip install torch==(\S+) --index-url https://download\.pytorch\.org/whl/cpu", README)
    assert cpu and cpu.group(1) in pinned


def test_it_names_no_path_outside_the_repository():
    assert "../" not in README
