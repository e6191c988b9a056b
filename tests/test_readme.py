"""The README's two set-up commands stay true: CI runs the test command verbatim."""

import re
from pathlib import Path

ROOT = Path(__file__).parent.parent


def readme_command(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    after = text[text.index(heading) :]
    return re.search(r"```bash\n(.*?)\n```", after, re.S).group(1).strip()


def test_ci_runs_the_readme_test_command():
    command = readme_command("**Run the tests**")
    assert command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_main_job_command_installs_then_samples():
    command = readme_command("**Run the main job**")
    assert command.startswith("python3 -m venv .venv") and "pip install torch==2.13.0" in command
    assert command.endswith("fastddpm sample --png-scale 4")  # the bundled model, no download
