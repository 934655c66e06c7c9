"""gunicorn's patch mode under real gunicorn: body-only edits go in place, the rest reloads."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from servers import Load, Server, free_port, get, gunicorn, make_app, running, server_env, write

pytestmark = pytest.mark.slow

COUNTING = 'LABEL = "count"\nTITLE = LABEL.title()\n\n\ndef text(hits):\n    return f"{version} {{hits}}"\n'
WITH_HELPER = ('LABEL = "count"\nTITLE = LABEL.title()\nSEPARATOR = " "\n\n\ndef joined(version, hits):\n'
               '    return version + SEPARATOR + str(hits)\n\n\n'
               'def text(hits):\n    return joined("{version}", hits)\n')


def counting(version: str, label: str = "count") -> str:
    return COUNTING.format(version=version).replace('"count"', f'"{label}"')


def wait_for_version(port: int, version: str, timeout: float = 10.0, suffix: str = "") -> int:
    """Poll until the app answers ``version N`` (then ``suffix``); returns N."""
    deadline = time.monotonic() + timeout
    body = ""
    while time.monotonic() < deadline:
        try:
            status, body = get(port)
        except OSError:  # still starting
            time.sleep(0.05)
            continue
        match = re.fullmatch(rf"{version} (\d+){re.escape(suffix)}", body)
        if status == 200 and match:
            return int(match.group(1))
        time.sleep(0.02)
    raise AssertionError(f"never served {version!r}; last {body!r}")


@contextmanager
def patching_server(tmp_path: Path, args: list[str]) -> Iterator[tuple[Path, Server, int]]:
    """The counter app under gunicorn in patch mode, answering v1 with every worker up."""
    app = make_app(tmp_path, "counter")
    port = free_port()
    with running(gunicorn(app, port, args, env=server_env(mode="patch")), None) as server:
        wait_for_version(port, "v1")
        server.wait_for_log(r"workers up")
        yield app, server, port


def test_a_body_only_edit_is_patched_and_the_state_is_kept(tmp_path: Path) -> None:
    with patching_server(tmp_path, ["-w", "1"]) as (app, server, port):
        for _ in range(5):
            get(port)
        write(app / "counting.py", counting("v2"))
        hits = wait_for_version(port, "v2")
        assert hits > 6  # the in-memory count went on: no restart
        server.wait_for_log(r"patched in place")
        assert server.count(r"Hang up|Handling signal: ttin") == 0


def test_a_body_edit_with_a_new_helper_and_constant_is_patched(tmp_path: Path) -> None:
    with patching_server(tmp_path, ["-w", "1"]) as (app, server, port):
        for _ in range(5):
            get(port)
        write(app / "counting.py", WITH_HELPER.format(version="v2"))
        hits = wait_for_version(port, "v2")
        assert hits > 6  # the in-memory count went on: no restart
        server.wait_for_log(r"patched in place")
        assert server.count(r"Hang up|Handling signal: ttin|not patchable|could not take") == 0


def test_a_value_computed_from_a_changed_one_is_patched_by_running_it_again(tmp_path: Path) -> None:
    """TITLE = LABEL.title() is unchanged but computed from LABEL, which changes: the workers run
    that line again too, keeping their in-memory count."""
    with patching_server(tmp_path, ["-w", "1"]) as (app, server, port):
        for _ in range(5):
            get(port)
        write(app / "counting.py", counting("v2", label="changed").replace("{hits}", "{hits} {TITLE}"))
        hits = wait_for_version(port, "v2", suffix=" Changed")
        assert hits > 6
        server.wait_for_log(r"patched in place")
        assert server.count(r"reload done") == 0


def test_a_module_level_change_that_cannot_run_alone_falls_back_to_a_reload(tmp_path: Path) -> None:
    """A comprehension reads LABEL, which changes in the same save: only the whole module gives
    the workers the right NAMES, so they are replaced."""
    with_names = "\nNAMES = [LABEL + str(n) for n in range(2)]\n"
    app = make_app(tmp_path, "counter")
    write(app / "counting.py", counting("v1") + with_names)
    port = free_port()
    with running(gunicorn(app, port, ["-w", "1"], env=server_env(mode="patch")), None) as server:
        wait_for_version(port, "v1")
        server.wait_for_log(r"workers up")
        for _ in range(5):
            get(port)
        write(app / "counting.py", counting("v1b") + with_names)  # first a patch
        wait_for_version(port, "v1b")
        write(app / "counting.py", counting("v2", label="changed") + with_names)
        server.wait_for_log(r"not patchable .*reads LABEL from a nested scope")
        assert wait_for_version(port, "v2") < 5  # a fresh worker started counting again
        server.wait_for_log(r"reload done")
        write(app / "counting.py", counting("v3", label="changed") + with_names)  # the new worker takes patches
        wait_for_version(port, "v3")
        server.wait_for_log(r"patched in place", count=2)
        assert server.count(r"reload done") == 1


def test_patches_under_load_fail_no_request(tmp_path: Path) -> None:
    with patching_server(tmp_path, ["-w", "2", "-k", "gthread", "--threads", "4"]) as (app, server, port):
        with Load(port, threads=4) as load:
            for n in range(2, 7):
                write(app / "counting.py", counting(f"v{n}"))
                server.wait_for_log(r"patched in place", count=n - 1)
                for _ in range(20):  # every worker answers with the new body
                    wait_for_version(port, f"v{n}")
            _, failures, _ = load.snapshot()
    assert failures == []
    assert server.count(r"Hang up|Handling signal: ttin") == 0


def test_a_broken_save_is_neither_patched_nor_reloaded(tmp_path: Path) -> None:
    with patching_server(tmp_path, ["-w", "1"]) as (app, server, port):
        write(app / "counting.py", counting("v2").replace("return f", "return (f"))
        server.wait_for_log(r"not reloading, the new code does not load")
        time.sleep(1)
        wait_for_version(port, "v1")
        write(app / "counting.py", counting("v3"))
        wait_for_version(port, "v3")
        assert server.count(r"Hang up|Handling signal: ttin") == 0


DECORATED = '''def plus(n):
    def deco(fn):
        def wrapper(hits):
            return fn(hits) + n
        return wrapper
    return deco


class Label:
    def __init__(self):
        self._prefix = ""

    @property
    def value(self):
        return self._prefix + "{version}"

    @value.setter
    def value(self, prefix):
        self._prefix = prefix


@plus({offset})
def count(hits):
    return hits


def text(hits):
    return f"{{Label().value}} {{count(hits)}}"
'''


def test_a_property_and_a_decorator_without_wraps_are_patched_to_the_new_code(tmp_path: Path) -> None:
    """A property's getter (which shares its name with the setter) and the argument of a
    decorator that does not use functools.wraps: each worker runs exactly the new code."""
    app = make_app(tmp_path, "counter")
    write(app / "counting.py", DECORATED.format(version="v1", offset=0))
    port = free_port()
    with running(gunicorn(app, port, ["-w", "1"], env=server_env(mode="patch")), None) as server:
        wait_for_version(port, "v1")
        server.wait_for_log(r"workers up")
        write(app / "counting.py", DECORATED.format(version="v2", offset=0))  # the getter's body
        assert wait_for_version(port, "v2") < 1000
        write(app / "counting.py", DECORATED.format(version="v3", offset=1000))  # the decorator's argument
        assert wait_for_version(port, "v3") > 1000
        server.wait_for_log(r"patched in place", count=2)
        assert server.count(r"Hang up|Handling signal: ttin|not patchable|could not take") == 0
