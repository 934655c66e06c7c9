"""What a new user sees first: the lines each adapter writes, started as the README says.

Each server is started, served one good save and one broken one, and its log is read as a
person reads it: every line of ours starts with ``wsgi_reload:``, none says it watches 0
files, and "reload done" is timed from the save.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from servers import BROKEN_SAVES, Server, free_port, greeting, gunicorn, make_app, running, uwsgi, wait_for_body, write

pytestmark = pytest.mark.slow

OURS = re.compile(r"wsgi_reload\S*:")


def first_contact(server: Server, app: Path, port: int) -> list[str]:
    """One good save and one broken one; returns our lines."""
    with running(server, "v1"):
        write(app / "greeting.py", greeting("v2"))
        wait_for_body(port, "v2")
        server.wait_for_log(r"reload done")
        write(app / "greeting.py", BROKEN_SAVES["name_error"])
        server.wait_for_log(r"not reloading, the new code does not load: .*greeting.py:1: NameError")
    log = server.log()  # with the lines written as it stopped
    return [line for line in log.splitlines() if OURS.search(line)]


def assert_reads_well(lines: list[str]) -> None:
    assert lines
    for line in lines:
        assert " wsgi_reload: " in line or line.startswith("wsgi_reload: "), f"another prefix: {line}"
        assert "watching 0 files" not in line and not re.search(r"\b1 files\b", line), line
        assert "file events stopped" not in line, line  # not when the server stops, either
    done = [line for line in lines if "reload done" in line]
    assert done and all(re.search(r"reload done: .* [\d.]+ s after the save", line) for line in done), done
    assert sum(bool(re.search(r"wsgi_reload: watching .*; check: ", line)) for line in lines) == 1, \
        "one start line per server"


@pytest.mark.parametrize("config", ["configs/reload_config.py", "python:wsgi_reload.gunicorn"])
def test_gunicorn_as_the_readme_starts_it(tmp_path: Path, config: str) -> None:
    app = make_app(tmp_path)
    port = free_port()
    from servers import HERE

    path = config if config.startswith("python:") else str(HERE.parent / config)
    assert_reads_well(first_contact(gunicorn(app, port, ["-w", "2"], config=path), app, port))


@pytest.mark.parametrize("enable", ["import", "in-app"])
def test_uwsgi_as_the_readme_starts_it(tmp_path: Path, enable: str) -> None:
    app = make_app(tmp_path)
    port = free_port()
    assert_reads_well(first_contact(uwsgi(app, port, enable=enable), app, port))
