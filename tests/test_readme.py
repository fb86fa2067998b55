"""The README's set-up commands are what CI runs."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _bash_blocks(text: str) -> list[str]:
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", text, flags=re.S)]


def test_ci_runs_exactly_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    blocks = _bash_blocks(readme)
    test_cmds = [b for b in blocks if "pytest" in b]
    assert len(test_cmds) == 1, "the README must have exactly one test command block"
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmds[0] in ci.splitlines(), "the README test command and .ci/run differ"
    assert "torch==2.13.0" in test_cmds[0], "torch must be pinned (an unpinned one pulls CUDA)"


def test_readme_first_command_runs_the_demo():
    blocks = _bash_blocks((ROOT / "README.md").read_text())
    assert "rfmpc demo" in blocks[0]
