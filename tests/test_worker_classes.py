"""Every gunicorn worker class, WSGI and ASGI, with real HTTP under load.

For each: a good save is served with no failed request, a broken save is refused while the
old code serves, the fix is served, every worker killed while the disk is broken comes back
with the verified code, and the same under --preload (for gevent also with the master patched
in the config first, as gunicorn's users of gevent with --preload do).
"""

from __future__ import annotations

import importlib.util
import os
import signal
import sys
import time
from pathlib import Path

import pytest
from servers import (
    BROKEN_SAVES,
    Load,
    free_port,
    greeting,
    gunicorn,
    make_app,
    running,
    wait_for_body,
    worker_pids,
    write,
)

pytestmark = pytest.mark.slow

CLASSES = {
    "sync": ("plain", []),
    "gthread": ("plain", ["-k", "gthread", "--threads", "4"]),
    "gevent": ("plain", ["-k", "gevent"]),
    # gunicorn's advice for gevent with --preload: patch in the config, before the master imports the app.
    "gevent-patched": ("plain", ["-k", "gevent"]),
    "asgi": ("asgi", ["-k", "asgi"]),
    "uvicorn": ("asgi", ["-k", "uvicorn_worker.UvicornWorker"]),
    "asgi-fastapi": ("fastapi", ["-k", "asgi"]),
    "uvicorn-fastapi": ("fastapi", ["-k", "uvicorn_worker.UvicornWorker"]),
}
NEEDS = {"gevent": "gevent", "gevent-patched": "gevent", "uvicorn": "uvicorn_worker",
         "uvicorn-fastapi": "uvicorn_worker", "asgi-fastapi": "fastapi"}


GEVENT_CONFIG = """\
from gevent import monkey

monkey.patch_all()

from wsgi_reload.gunicorn import *  # noqa: E402,F403

import sys  # noqa: E402
print("the config patched:", monkey.is_module_patched("socket"), file=sys.stderr)
"""
"""The config the README gives for gevent with --preload, and a line to show it patched."""


@pytest.mark.parametrize("preload", [False, True], ids=["", "preload"])
@pytest.mark.parametrize("worker_class", sorted(CLASSES))
def test_every_worker_class(tmp_path: Path, worker_class: str, preload: bool) -> None:
    module = NEEDS.get(worker_class)
    if module is not None and importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed")
    if preload and worker_class.endswith("-fastapi"):
        pytest.skip("the plain ASGI app covers --preload for this class")
    if worker_class == "gevent-patched" and not preload:
        pytest.skip("a master patched in the config matters with --preload only")
    app_kind, args = CLASSES[worker_class]
    app = make_app(tmp_path, app_kind)
    config = None
    if worker_class == "gevent-patched":
        config = str(tmp_path / "gevent_config.py")
        Path(config).write_text(GEVENT_CONFIG)
    port = free_port()
    server = gunicorn(app, port, ["-w", "2", *args, *(["--preload"] if preload else [])], config=config)
    with running(server, "v1"), Load(port, threads=4) as load:
        write(app / "greeting.py", greeting("v2"))  # a good save
        wait_for_body(port, "v2")
        server.wait_for_log(r"reload done")
        time.sleep(1)  # the old workers finish their last requests
        load.reset_bodies()
        write(app / "greeting.py", BROKEN_SAVES["name_error"])  # a broken save
        server.wait_for_log(r"not reloading, the new code does not load: .*greeting.py:1: NameError")
        time.sleep(1)
        killed = worker_pids(server)  # every worker killed while the disk is broken
        for pid in killed:
            os.kill(pid, signal.SIGKILL)
        time.sleep(3)
        _, failures, bodies = load.snapshot()
        assert bodies == {"v2"}
        # Only requests in flight in a killed worker may fail.
        in_flight = ("RemoteDisconnected", "IncompleteRead", "ConnectionResetError")
        assert all(f.startswith(in_flight) for f in failures), failures
        assert len(failures) <= 4 * len(killed)
        failed_before = len(failures)
        write(app / "greeting.py", greeting("v3"))  # the fix
        wait_for_body(port, "v3")
        time.sleep(1)
        _, failures, _ = load.snapshot()
        assert len(failures) == failed_before, failures[failed_before:]
    log = server.log()
    assert "Worker failed to boot" not in log
    # stop() sends SIGTERM to the whole group, as systemd does, and the master sends its own.
    # An asyncio worker's loop closes its self-pipe before it removes its signal handlers
    # (CPython's _UnixSelectorEventLoop.close), so the second SIGTERM can land in between and
    # print this one harmless traceback at shutdown. Any other traceback fails the test.
    shutdown_race = log.count("Exception ignored when trying to write to the signal wakeup fd")
    assert log.count("Traceback") == shutdown_race, log
    if worker_class == "gevent-patched":  # the first master image, and the ones re-executed in place
        assert log.count("the config patched: True") == 3, log


def test_the_asgi_example_runs_from_its_command(tmp_path: Path) -> None:
    """example_asgi/app.py's own command (from a copy of the repository), then an edit."""
    pytest.importorskip("uvicorn_worker")
    import re
    import shutil

    from servers import HERE, Server, server_env

    root = tmp_path / "repo"
    shutil.copytree(HERE.parent / "example_asgi", root / "example_asgi")
    command = re.search(r"\.venv/bin/(gunicorn .*)", (root / "example_asgi" / "app.py").read_text())
    assert command is not None
    port = free_port()
    argv = [str(Path(sys.executable).parent / "gunicorn"), *command.group(1).split()[1:], "-b", f"127.0.0.1:{port}"]
    with running(Server(argv, port, root, tmp_path / "server.log", server_env()), "hello from ASGI\n"):
        greeting_file = root / "example_asgi" / "greeting.py"
        write(greeting_file, greeting_file.read_text().replace("hello", "edited"))
        wait_for_body(port, "edited from ASGI\n")


@pytest.mark.parametrize("worker_class", ["asgi", "uvicorn_worker.UvicornWorker"])
def test_django_asgi_under_each_asgi_worker_class(tmp_path: Path, worker_class: str) -> None:
    """The example Django site's ASGI application (mysite.asgi) under gunicorn's config hooks:
    a good view edit served, a broken one refused while the old view serves, the fix served,
    0 failed requests."""
    if worker_class.startswith("uvicorn"):
        pytest.importorskip("uvicorn_worker")
    import shutil
    import subprocess

    from servers import HERE, Server, server_env

    site = tmp_path / "site"
    shutil.copytree(HERE.parent / "example_project", site, ignore=shutil.ignore_patterns("db.sqlite3", "__pycache__"))
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=site, check=True, env=server_env())
    views = site / "shop" / "views.py"
    original = views.read_text()

    def greet(text: str) -> str:
        return original.replace('GREETING = "hello"', f'GREETING = "{text}"')

    port = free_port()
    argv = [str(Path(sys.executable).parent / "gunicorn"), "-c", "python:wsgi_reload.gunicorn", "-k", worker_class,
            "-w", "2", "-b", f"127.0.0.1:{port}", "--chdir", str(site), "mysite.asgi:application"]
    with running(Server(argv, port, site, tmp_path / "server.log", server_env()), "hello from the template\n") \
            as server, Load(port, threads=4) as load:
        write(views, greet("v2"))
        wait_for_body(port, "v2 from the template\n")
        write(views, greet("broken") + "\nundefined_name\n")
        server.wait_for_log(r"not reloading, the new code does not load: .*views.py:\d+: NameError")
        time.sleep(2)
        write(views, greet("v3"))
        wait_for_body(port, "v3 from the template\n")
        time.sleep(1)
        _, failures, bodies = load.snapshot()
    assert failures == []
    assert not any("broken" in body for body in bodies)  # the refused save never served
