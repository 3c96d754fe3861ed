"""The README's two set-up commands stay true: CI runs exactly the test command README gives."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _sh_blocks(text: str) -> list[str]:
    return re.findall(r"```sh\n(.*?)```", text, flags=re.S)


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    setup = readme[readme.index("## Set-up"):readme.index("## Use")]
    install, test = [b.strip() for b in _sh_blocks(setup)]
    ci_lines = [l.strip() for l in (ROOT / ".ci" / "run").read_text().splitlines()
                if l.strip() and not l.lstrip().startswith("#")]
    assert ci_lines[-1] == test
    # The install pins the CPU torch wheel, as CI does.
    assert "torch==2.13.0" in install and "pip install torch==2.13.0" in "\n".join(ci_lines)
    assert "llmsh generate" in install
