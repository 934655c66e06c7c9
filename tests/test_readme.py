"""The README's first command, run from the root of a fresh copy of the repository."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
from servers import HERE, server_env

pytestmark = pytest.mark.slow

ROOT = HERE.parent


def first_command() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Two commands"):]
    return re.findall(r"```sh\n(.*?)\n```", section, re.S)[0].strip()


def fresh_copy(target: Path) -> Path:
    """The files git tracks, as they are in the working tree (what a fresh clone of it holds)."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in tracked.decode().split("\0"):
        if name and (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)
    return target


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git to list the repository's files")
def test_the_first_command_installs_migrates_and_has_a_valid_gunicorn_config(tmp_path: Path) -> None:
    command = first_command()
    assert command.startswith("python3 -m venv .venv && ")
    assert command.endswith(".venv/bin/gunicorn -c example_project/gunicorn.conf.py --chdir example_project")
    repo = fresh_copy(tmp_path / "clone")
    # Everything as written, but gunicorn checks its config and the app instead of serving forever.
    done = subprocess.run(["bash", "-c", command + " --check-config"], cwd=repo, env=server_env(),
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert (repo / "example_project" / "db.sqlite3").exists()
