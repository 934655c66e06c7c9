"""The Django app under real gunicorn, real uWSGI and real runserver, with the example project."""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from servers import (
    BIN,
    BROKEN_SAVES,
    HERE,
    Load,
    Server,
    every_worker_answers,
    free_port,
    get,
    good_then_broken_pairs,
    greeting,
    gunicorn,
    kill_every_worker,
    kill_the_watcher_under_load,
    make_app,
    refused_under_load,
    running,
    server_env,
    settled_workers,
    the_watcher,
    uwsgi,
    wait_for_body,
    wait_for_prefix,
    watcher_processes,
    worker_pids,
    write,
)

pytestmark = pytest.mark.slow

EXAMPLE = HERE.parent / "example_project"
VIEWS = Path("shop") / "views.py"
HAS_UWSGI = shutil.which("uwsgi", path=str(BIN)) is not None
LIVENESS = 10.0
"""Seconds a change may take to be served before a test calls it hung. Speed is measured by
benchmarks/, not asserted here (typical: 1 to 3 s with polling defaults)."""


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A fresh copy of the example project with its SQLite database created."""
    return make_site(tmp_path)


def make_site(tmp_path: Path) -> Path:
    target = tmp_path / "site"
    shutil.copytree(EXAMPLE, target, ignore=shutil.ignore_patterns("db.sqlite3", "__pycache__"))
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=target, check=True, env=server_env())
    return target


def greeting_view(site: Path, greeting: str) -> None:
    views = site / VIEWS
    source = views.read_text()
    start = source.index('GREETING = "') + len('GREETING = "')
    end = source.index('"', start)
    write(views, source[:start] + greeting + source[end:])


def page(greeting: str) -> str:
    return f"{greeting} from the template\n"


def django_gunicorn(site: Path, port: int, args: list[str], env: dict[str, str] | None = None) -> Server:
    config = site / "gunicorn.conf.py"
    server = gunicorn(site, port, ["--chdir", str(site), *args], config=str(config), env=env,
                      app="mysite.wsgi:application")
    server.ready_pattern = r"wsgi_reload: worker \d+ publishes its modules|wsgi_reload: workers up"
    return server


def django_uwsgi(site: Path, port: int, lazy: bool, env: dict[str, str] | None = None,
                 args: tuple[str, ...] = ()) -> Server:
    server = uwsgi(site, port, args, lazy=lazy, enable="django", target=["--module", "mysite.wsgi:application"],
                   env=env)
    return server


SERVERS = ["gunicorn-sync", "gunicorn-gthread", "uwsgi-prefork", "uwsgi-lazy"]
RESTARTS = r"Autorestarting worker|The work of process \d+ is done"
"""gunicorn's and uWSGI's log lines for a worker recycled by --max-requests."""


def start(kind: str, site: Path, port: int, env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> Server:
    if kind == "gunicorn-sync":
        return django_gunicorn(site, port, ["-w", "2", *args], env)
    if kind == "gunicorn-gthread":
        return django_gunicorn(site, port, ["-w", "2", "-k", "gthread", "--threads", "4", *args], env)
    if kind == "gunicorn-preload":
        return django_gunicorn(site, port, ["-w", "2", "--preload", *args], env)
    if not HAS_UWSGI:
        pytest.skip("uWSGI is not installed")
    return django_uwsgi(site, port, lazy=kind == "uwsgi-lazy", env=env, args=args)


def wait_generation(server: Server, kind: str, n: int) -> None:
    """Wait until both workers of the n-th generation have the views loaded and told the watcher.

    A worker that starts while a save is broken loads the broken view (see the README's
    limits), so a test saves only once every worker of the generation is up.
    """
    if kind == "gunicorn-preload":
        server.wait_for_log(r"wsgi_reload: workers up|wsgi_reload: reload done", count=n)
        return
    if kind.startswith("gunicorn") and n > 1:
        # Not counted by the lines below: after a refused save, the worker started beside the
        # check is replaced by one more that publishes, until the surplus is retired.
        server.wait_for_log(r"wsgi_reload: reload done", count=n - 1)
        return
    server.wait_for_log(r"wsgi_reload: worker \d+ publishes its modules", count=2 * n)
    server.wait_for_log(r"has the views loaded", count=2 * n)


@pytest.mark.parametrize("kind", SERVERS)
def test_a_view_change_is_served_with_no_failed_request(site: Path, kind: str) -> None:
    port = free_port()
    with running(start(kind, site, port), page("hello")) as server, Load(port, threads=4) as load:
        wait_generation(server, kind, 1)
        for n in range(1, 6):
            greeting_view(site, f"hello-{n}")
            wait_for_body(port, page(f"hello-{n}"), timeout=LIVENESS)
            wait_generation(server, kind, n + 1)
        time.sleep(0.5)
        ok, failures, _ = load.snapshot()
    assert failures == []
    assert ok > 50


def test_preload_reexecs_and_serves_the_new_view(site: Path) -> None:
    port = free_port()
    with running(start("gunicorn-preload", site, port), page("hello")) as server:
        greeting_view(site, "preloaded")
        wait_for_body(port, page("preloaded"))
        server.wait_for_log(r"Handling signal: usr2")
        server.wait_for_log(r"reload done: 2 new workers serving, same master pid")
        time.sleep(1)
        assert {get(port)[1] for _ in range(20)} == {page("preloaded")}
        assert server.count(r"Handling signal: usr2") == 1


@pytest.mark.parametrize("kind", ["gunicorn-sync", "uwsgi-prefork"])
def test_a_template_change_reaches_every_cached_loader(site: Path, kind: str) -> None:
    port = free_port()
    env = server_env()
    env["DJANGO_DEBUG"] = "0"  # the cached template loader, as in production
    with running(start(kind, site, port, env), page("hello")) as server:
        wait_generation(server, kind, 1)
        assert {get(port)[1] for _ in range(20)} == {page("hello")}  # every worker has it cached
        write(site / "shop" / "templates" / "shop" / "hello.html", "{{ greeting }} from the new template\n")
        wait_for_body(port, "hello from the new template\n")
        wait_generation(server, kind, 2)
        time.sleep(0.5)
        assert {get(port)[1] for _ in range(20)} == {"hello from the new template\n"}


BROKEN = {
    "views_syntax": (VIEWS, lambda s: s.replace("def hello(request):", "def hello(request)")),
    "models_exception": (Path("shop") / "models.py", lambda s: s + '\nraise RuntimeError("models cannot load")\n'),
    "settings_error": (Path("mysite") / "settings.py", lambda s: s + "\nINSTALLED_APPS += undefined_apps\n"),
    "views_name_error": (VIEWS, lambda s: s + "\nundefined_name\n"),
    "views_missing_import": (VIEWS, lambda s: "import no_such_module_here\n" + s),
    "template_syntax": (Path("shop") / "templates" / "shop" / "hello.html", lambda s: "{% if %}{% endif %}\n" + s),
}


@pytest.mark.parametrize("kind", ["gunicorn-sync", "uwsgi-prefork"])
def test_broken_saves_keep_the_old_site_serving(site: Path, kind: str) -> None:
    port = free_port()
    with running(start(kind, site, port), page("hello")) as server, Load(port, threads=4) as load:
        wait_generation(server, kind, 1)
        good = "hello"
        for n, (name, (relative, breaker)) in enumerate(BROKEN.items(), start=1):
            target = site / relative
            original = target.read_text()
            write(target, breaker(original))
            load.reset_bodies()
            time.sleep(5)
            _, failures, bodies = load.snapshot()
            assert failures == [], name
            assert bodies == {page(good)}, f"{name}: served {bodies} while broken"
            assert f"{target}:" in server.log(), f"{name}: the log does not name the file and line"
            write(target, original)
            good = f"fixed-{n}"
            greeting_view(site, good)
            wait_for_body(port, page(good))
            wait_generation(server, kind, n + 1)
            time.sleep(0.5)
        _, failures, _ = load.snapshot()
    assert failures == []


def test_a_broken_view_module_imported_lazily_is_refused(site: Path) -> None:
    """Django under gunicorn with no config: a module a view imports inside the function is not
    touched by importing the app or the URLconf; the check imports the changed ones the workers
    had loaded."""
    lazy = site / "shop" / "lazy_part.py"
    write(lazy, 'def text():\n    return "lazy-1"\n')
    views = site / VIEWS
    write(views, views.read_text() + "\n\ndef lazy(request):\n    from . import lazy_part\n\n"
                 '    return HttpResponse(lazy_part.text(), content_type="text/plain")\n')
    urls = site / "mysite" / "urls.py"
    write(urls, urls.read_text().replace("urlpatterns = [", 'urlpatterns = [\n    path("lazy/", views.lazy),'))
    port = free_port()
    with running(start("gunicorn-sync", site, port), page("hello")) as server, \
            Load(port, threads=4, path="/lazy/") as load:
        wait_generation(server, "gunicorn-sync", 1)
        time.sleep(3)  # every worker imported lazy_part and published it (workers publish every 2 s)
        write(lazy, 'def text():\n    return "lazy-2"\n')
        wait_for_body(port, "lazy-2", timeout=LIVENESS, path="/lazy/")
        wait_generation(server, "gunicorn-sync", 2)
        time.sleep(3)
        load.reset_bodies()
        write(lazy, 'undefined_name\n\n\ndef text():\n    return "broken"\n')
        server.wait_for_log(rf"not reloading, the new code does not load: {lazy}:1: NameError")
        time.sleep(2)
        _, failures, bodies = load.snapshot()
        assert failures == []
        assert bodies == {"lazy-2"}
        write(lazy, 'def text():\n    return "lazy-3"\n')
        wait_for_body(port, "lazy-3", timeout=LIVENESS, path="/lazy/")


@pytest.mark.parametrize("kind", SERVERS)
def test_a_lazy_view_module_saved_broken_while_one_worker_never_imported_it(site: Path, kind: str) -> None:
    """One worker has imported the module a view imports inside its function, the other has not.
    It is saved broken: the check refuses it, and the worker that imports it afterwards gets the
    checked bytes, so both answer lazy-1 and nothing fails."""
    lazy = site / "shop" / "lazy_part.py"
    write(lazy, 'def text():\n    return "lazy-1"\n')
    views = site / VIEWS
    write(views, views.read_text() + "\n\ndef lazy(request):\n    import os\n\n    from . import lazy_part\n\n"
                 '    return HttpResponse(f"{lazy_part.text()}@{os.getpid()}", content_type="text/plain")\n')
    urls = site / "mysite" / "urls.py"
    write(urls, urls.read_text().replace("urlpatterns = [", 'urlpatterns = [\n    path("lazy/", views.lazy),'))
    port = free_port()
    with running(start(kind, site, port), page("hello")) as server:
        wait_generation(server, kind, 1)
        status, body = get(port, "/lazy/")  # exactly one worker has imported lazy_part now
        assert (status, body.split("@")[0]) == (200, "lazy-1")
        time.sleep(2.5)  # that worker publishes it (every 2 s), so the check imports it
        write(lazy, 'undefined_name\n\n\ndef text():\n    return "broken"\n')
        server.wait_for_log(rf"not reloading, the new code does not load: {lazy}:1: NameError")
        settled_workers(server, 2)
        every_worker_answers(port, "/lazy/", "lazy-1")
        write(lazy, 'def text():\n    return "lazy-3"\n')
        wait_for_prefix(port, "/lazy/", "lazy-3", timeout=LIVENESS)


@pytest.mark.parametrize("kind", SERVERS)
def test_a_template_saved_broken_that_one_worker_never_rendered(site: Path, kind: str) -> None:
    """With the cached loader (production): one worker has rendered other.html, the other has
    not. It is saved broken: the check refuses it, and the worker that renders it afterwards
    reads the checked template, so both answer other-1 and nothing fails."""
    template = site / "shop" / "templates" / "shop" / "other.html"
    write(template, "other-1@{{ pid }}")
    views = site / VIEWS
    write(views, views.read_text() + "\n\ndef other(request):\n    import os\n\n"
                 '    return render(request, "shop/other.html", {"pid": os.getpid()})\n')
    urls = site / "mysite" / "urls.py"
    write(urls, urls.read_text().replace("urlpatterns = [", 'urlpatterns = [\n    path("other/", views.other),'))
    port = free_port()
    env = server_env()
    env["DJANGO_DEBUG"] = "0"
    with running(start(kind, site, port, env), page("hello")) as server:
        wait_generation(server, kind, 1)
        status, body = get(port, "/other/")  # exactly one worker has rendered other.html now
        assert (status, body.split("@")[0]) == (200, "other-1")
        write(template, "{% if %}{% endif %}other-broken@{{ pid }}")
        server.wait_for_log(rf"not reloading, the new template does not compile: {template}")
        settled_workers(server, 2)
        every_worker_answers(port, "/other/", "other-1")
        write(template, "other-3@{{ pid }}")
        wait_for_prefix(port, "/other/", "other-3", timeout=LIVENESS)


def add_view(site: Path, name: str, body: str) -> None:
    """A view ``name`` at /<name>/ whose function body is ``body``."""
    views = site / VIEWS
    write(views, views.read_text() + f"\n\ndef {name}(request):\n{textwrap.indent(body, '    ')}\n")
    urls = site / "mysite" / "urls.py"
    write(urls, urls.read_text().replace("urlpatterns = [", f'urlpatterns = [\n    path("{name}/", views.{name}),'))


def break_views(site: Path) -> None:
    views = site / VIEWS
    write(views, views.read_text() + "\nundefined_name\n")


def mend_views(site: Path) -> None:
    views = site / VIEWS
    write(views, views.read_text().replace("\nundefined_name\n", ""))


@pytest.mark.parametrize("kind", SERVERS)
def test_good_then_broken_view_saves_never_serve_an_older_version_after_the_final_one(site: Path, kind: str) -> None:
    port = free_port()
    views = site / VIEWS
    original = views.read_text()

    def save_good(version: str) -> str:
        write(views, original.replace('GREETING = "hello"', f'GREETING = "{version}"'))
        return page(version)

    with running(start(kind, site, port), page("hello")) as server:
        wait_generation(server, kind, 1)
        good_then_broken_pairs(port, save_good, lambda: break_views(site))


@pytest.mark.parametrize("kind", SERVERS)
def test_every_worker_killed_while_a_view_is_broken(site: Path, kind: str) -> None:
    port = free_port()
    with running(start(kind, site, port), page("hello")) as server:
        wait_generation(server, kind, 1)
        greeting_view(site, "v2")
        wait_for_body(port, page("v2"), timeout=LIVENESS)
        wait_generation(server, kind, 2)
        break_views(site)
        server.wait_for_log(r"not reloading, the new code does not load")
        time.sleep(1)  # the old workers of the v2 reload have retired
        kill_every_worker(server, page("v2"))
        mend_views(site)
        greeting_view(site, "v3")
        wait_for_body(port, page("v3"), timeout=LIVENESS)


def save_greeting(site: Path, greeting: str) -> Callable[[], str]:
    def save() -> str:
        greeting_view(site, greeting)
        return page(greeting)

    return save


@pytest.mark.parametrize("kind", SERVERS)
def test_ready_path_answering_500_refuses_the_swap(site: Path, kind: str) -> None:
    add_view(site, "healthz", 'return HttpResponse(status=500 if GREETING == "sick" else 200)')
    port = free_port()
    with running(start(kind, site, port, server_env(ready_path="/healthz/")), page("hello")) as server:
        wait_generation(server, kind, 1)
        refused_under_load(server, save_greeting(site, "sick"),
                           r"not reloading, the new code does not load: NotReady: GET /healthz/ answered 500",
                           page("hello"), save_greeting(site, "v3"))


def test_each_new_worker_asks_ready_path_itself(site: Path) -> None:
    """Django under gunicorn with no config: the check's call to ready_path passes, the new
    workers' own call answers 500 (what differs is the environment, as with a database only
    workers reach). The swap ends at once, the old views serve on, and the fix is served."""
    from wsgi_reload._check.check import PROBE_ENV

    add_view(site, "healthz", 'import os\n\n'
             f'return HttpResponse(status=500 if GREETING == "sick" and not os.environ.get("{PROBE_ENV}") else 200)')
    port = free_port()
    with running(start("gunicorn-sync", site, port, server_env(ready_path="/healthz/")), page("hello")) as server:
        wait_generation(server, "gunicorn-sync", 1)
        refused_under_load(server, save_greeting(site, "sick"),
                           r"a new worker cannot serve the code that passed the check \(NotReady: GET /healthz/ "
                           r"answered 500", page("hello"), save_greeting(site, "v3"))


@pytest.mark.parametrize("broken", ["views_name_error", "models_exception"])
def test_started_broken_under_gunicorn_with_no_config_stays_up_and_serves_the_fix(site: Path, broken: str) -> None:
    """Django under gunicorn with no config, started with a view or the models broken: one line
    with the file and line, the server stays up, and the fix is served. Nothing halts the arbiter."""
    relative, breaker = BROKEN[broken]
    target = site / relative
    original = target.read_text()
    write(target, breaker(original))
    port = free_port()
    server = start("gunicorn-sync", site, port)
    with running(server, None):
        server.wait_for_log(rf"{target}:\d+: (NameError|RuntimeError)")
        time.sleep(2)
        assert server.proc is not None and server.proc.poll() is None
        write(target, original)
        greeting_view(site, "fixed")
        wait_for_body(port, page("fixed"), timeout=LIVENESS)
        with Load(port, threads=4) as load:
            time.sleep(1)
            _, failures, bodies = load.snapshot()
        assert failures == []
        assert bodies == {page("fixed")}
        log = server.log()
        assert "Worker failed to boot" not in log and "Shutting down: Master" not in log
        assert len(re.findall(rf"wsgi_reload: .*{target}:\d+", log)) == 1, "one line names the file and line"


@pytest.mark.parametrize("kind", ["gunicorn-sync", "uwsgi-prefork"])
def test_the_files_read_from_the_disk_are_named_once_at_start(site: Path, kind: str) -> None:
    """Our code first runs from django.setup() here: the settings and the WSGI module were read
    from the disk before it, so one start-up line names them and how to cover them."""
    port = free_port()
    with running(start(kind, site, port), page("hello")) as server:
        wait_generation(server, kind, 1)
        greeting_view(site, "v2")
        wait_for_body(port, page("v2"), timeout=LIVENESS)
        lines = re.findall(r"wsgi_reload: \d+ files of the project \(.*\) loaded before wsgi_reload.*", server.log())
        assert len(lines) == 1, lines
        assert str(site / "mysite" / "settings.py") in lines[0]
        assert ("-c python:wsgi_reload.gunicorn" if kind.startswith("gunicorn") else "--import wsgi_reload.uwsgi") \
            in lines[0]


SELF_CONFIGURED = """import django
from django.conf import settings

settings.configure(INSTALLED_APPS=["django.contrib.contenttypes"], DATABASES={})
django.setup()

import greeting


def app(environ, start_response):
    body = greeting.text().encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
"""


def test_an_app_that_configures_django_itself_is_reloaded(tmp_path: Path) -> None:
    """settings.configure() at import, no settings module and no URLconf (Django as a library):
    the check loads no URLconf it does not have, so a good save is served, and a repeated
    refusal is still said once per save."""
    app = make_app(tmp_path)
    write(app / "app.py", SELF_CONFIGURED)
    port = free_port()
    with running(gunicorn(app, port, ["-w", "2"]), "v1") as server:
        write(app / "greeting.py", greeting("v2"))
        wait_for_body(port, "v2", timeout=LIVENESS)
        for n in (1, 2):
            write(app / "greeting.py", BROKEN_SAVES["name_error"] + f"# save {n}\n")
            server.wait_for_log(r"not reloading, (the new code does not load|still the same error)", count=n)
        assert server.count(r"not reloading, still the same error: .*greeting.py:1: NameError") == 1
        write(app / "greeting.py", greeting("v3"))
        wait_for_body(port, "v3", timeout=LIVENESS)


def test_without_wsgi_application_the_check_imports_gunicorns_app(site: Path) -> None:
    """gunicorn needs no WSGI_APPLICATION (it was started as mysite.wsgi:application), so the
    check must import what gunicorn imports: a NameError in a view is refused, not reloaded."""
    settings = site / "mysite" / "settings.py"
    write(settings, settings.read_text().replace('WSGI_APPLICATION = "mysite.wsgi.application"\n', ""))
    views = site / VIEWS
    port = free_port()
    with running(start("gunicorn-sync", site, port), page("hello")) as server, Load(port, threads=4) as load:
        wait_generation(server, "gunicorn-sync", 1)
        server.wait_for_log(r"check: import mysite\.wsgi:application")
        original = views.read_text()
        write(views, original + "\nundefined_name\n")
        server.wait_for_log(r"not reloading, the new code does not load: .*views.py:\d+: NameError")
        time.sleep(1)
        _, failures, bodies = load.snapshot()
        assert failures == []
        assert bodies == {page("hello")}
        assert server.count(r"check passed") == 0
        write(views, original.replace('GREETING = "hello"', 'GREETING = "v2"'))
        wait_for_body(port, page("v2"), timeout=LIVENESS)


def test_a_view_broken_after_the_check_never_reaches_the_workers(site: Path) -> None:
    """Django under gunicorn with no config: the views break after the check passed and before
    the new workers read them (the URLconf imports a slow module first). The new workers import
    the checked views (v2), never the broken file, which its own check then refuses."""
    write(site / "shop" / "slow.py", "import time\ntime.sleep(1.5)\n")
    urls = site / "mysite" / "urls.py"
    write(urls, "import shop.slow  # noqa: F401\n" + urls.read_text())
    views = site / VIEWS
    port = free_port()
    with running(start("gunicorn-sync", site, port), page("hello")) as server, Load(port, threads=4) as load:
        wait_generation(server, "gunicorn-sync", 1)
        greeting_view(site, "v2")
        server.wait_for_log(r"check passed")
        original = views.read_text()
        write(views, original + "\nundefined_name\n")
        server.wait_for_log(r"not reloading, the new code does not load: .*views.py:\d+: NameError")
        server.wait_for_log(r"reload done: 2 new workers serving")
        wait_for_body(port, page("v2"), timeout=LIVENESS)
        time.sleep(1)
        _, failures, bodies = load.snapshot()
        assert failures == []
        assert bodies <= {page("hello"), page("v2")}
        write(views, original.replace('GREETING = "v2"', 'GREETING = "v3"'))
        wait_for_body(port, page("v3"), timeout=LIVENESS)
        server.wait_for_log(r"reload done: 2 new workers serving", count=2)
        time.sleep(0.5)  # the old workers finish their last requests
        _, failures, bodies = load.snapshot()
        assert failures == []
        assert bodies <= {page("hello"), page("v2"), page("v3")}
        assert "Worker failed to boot" not in server.log()
        assert server.alive()


def test_a_worker_respawning_while_models_are_broken_loads_the_verified_models(site: Path) -> None:
    """Django under gunicorn with no config: a crashed worker respawns while models.py is broken
    on disk. It imports the models of the verified generation and serves."""
    models = site / "shop" / "models.py"
    port = free_port()
    with running(start("gunicorn-sync", site, port), page("hello")) as server:
        wait_generation(server, "gunicorn-sync", 1)
        original = models.read_text()
        write(models, original + '\nraise RuntimeError("models cannot load")\n')
        server.wait_for_log(r"not reloading, the new code does not load")
        booted = server.count(r"Booting worker with pid")
        worker_pids = [int(p) for p in re.findall(r"Booting worker with pid: (\d+)", server.log())]
        os.kill(worker_pids[0], signal.SIGKILL)
        server.wait_for_log(r"Booting worker with pid", count=booted + 1)
        with Load(port, threads=4) as load:
            time.sleep(3)
            ok, failures, bodies = load.snapshot()
        assert failures == []
        assert bodies == {page("hello")}
        assert "Worker failed to boot" not in server.log()
        assert server.count(r"cannot load the app") == 0
        write(models, original)
        greeting_view(site, "fixed")
        wait_for_body(port, page("fixed"), timeout=LIVENESS)
        assert server.alive()


@pytest.mark.parametrize("kind", SERVERS)
def test_max_requests_restarts_load_the_verified_views_while_a_view_is_broken(site: Path, kind: str) -> None:
    """Workers restart every 100 requests (uWSGI: --min-worker-lifetime 1, its default of 10 s
    would recycle none in this test) and load the verified views."""
    port = free_port()
    args = ("--max-requests", "100") if kind.startswith("gunicorn") else \
        ("--max-requests", "100", "--min-worker-lifetime", "1")
    with running(start(kind, site, port, args=args), page("hello")) as server, Load(port, threads=4) as load:
        wait_generation(server, kind, 1)
        greeting_view(site, "v2")  # the views change and are broken at once
        views = site / VIEWS
        write(views, views.read_text() + "\nundefined_name\n")
        server.wait_for_log(r"not reloading, the new code does not load")
        load.reset_bodies()
        # Two restarts after the refusal, each loading the views anew (a bound, not a timing: on a
        # busy machine 100 requests per worker take longer than on an idle one).
        server.wait_for_log(RESTARTS, count=server.count(RESTARTS) + 2)
        ok, failures, bodies = load.snapshot()
        assert failures == []
        assert bodies == {page("hello")}
        write(views, views.read_text().replace("\nundefined_name\n", ""))
        wait_for_body(port, page("v2"), timeout=LIVENESS)
        assert server.alive()


# --- runserver -----------------------------------------------------------------------------


@pytest.fixture
def runserver(site: Path) -> Iterator[tuple[Server, int]]:
    port = free_port()
    server = Server([sys.executable, "manage.py", "runserver", f"127.0.0.1:{port}"], port, site,
                    site.parent / "server.log", server_env())
    with running(server, page("hello")):
        yield server, port


def test_runserver_restarts_on_a_view_edit(site: Path, runserver: tuple[Server, int]) -> None:
    server, port = runserver
    time.sleep(1)
    greeting_view(site, "restarted")
    wait_for_body(port, page("restarted"))
    assert server.count(r"shop/views.py changed, reloading") == 1


def test_runserver_keeps_serving_the_old_code_through_a_broken_save(site: Path,
                                                                   runserver: tuple[Server, int]) -> None:
    server, port = runserver
    views = site / VIEWS
    original = views.read_text()
    write(views, original + "\nundefined_name\n")
    server.wait_for_log(rf"{views}:\d+: NameError")
    restarts = server.count(r"Watching for file changes")
    for _ in range(20):  # Django alone would have restarted into it and refused every connection
        assert get(port) == (200, page("hello"))
        time.sleep(0.1)
    write(views, original.replace('GREETING = "hello"', 'GREETING = "fixed"'))  # the fix: now it restarts
    wait_for_body(port, page("fixed"), timeout=LIVENESS)
    assert server.count(r"Watching for file changes") == restarts + 1


def test_runserver_restarts_refuse_no_connection(site: Path, runserver: tuple[Server, int]) -> None:
    """Django's own restart closes the port until the new process binds it (about 5 refused
    connections per restart under this load) and exits with responses in flight; here the
    reloader process holds the port and the old process answers what it took first."""
    server, port = runserver
    views = site / VIEWS
    # Slow responses, so that some are in flight at every restart.
    write(views, views.read_text().replace("def hello(request):\n", "def hello(request):\n    import time\n\n"
                                           "    time.sleep(0.2)\n"))
    server.wait_for_log(r"Watching for file changes", count=2)
    starts = server.count(r"Watching for file changes")
    with Load(port, threads=4) as load:
        for n in range(1, 4):
            greeting_view(site, f"restart-{n}")
            wait_for_body(port, page(f"restart-{n}"), timeout=LIVENESS)
            server.wait_for_log(r"Watching for file changes", count=starts + n)
        # Restarts are quick now; keep the load on until it has made enough requests to count.
        deadline = time.monotonic() + LIVENESS
        while load.snapshot()[0] <= 50 and time.monotonic() < deadline:
            time.sleep(0.1)
        ok, failures, _ = load.snapshot()
    assert failures == []  # Django's own restart: 50+ refused or reset
    assert ok > 50


def test_runserver_answers_a_request_still_arriving_when_a_restart_begins(site: Path,
                                                                         runserver: tuple[Server, int]) -> None:
    """A request whose headers are still on their way when the restart begins (the old process
    had accepted its connection) is answered by the old process before it exits; a connection
    on which nothing was sent (a browser's preconnect) is closed, and does not hold the restart."""
    server, port = runserver
    slow = socket.create_connection(("127.0.0.1", port), timeout=LIVENESS)
    idle = socket.create_connection(("127.0.0.1", port), timeout=LIVENESS)
    with slow, idle:
        slow.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # the rest of the headers comes later
        time.sleep(0.5)  # both accepted by the serving process
        greeting_view(site, "restarted")
        time.sleep(3)  # settle, check, and the restart under way: it waits for what it accepted
        slow.sendall(b"Connection: close\r\n\r\n")
        answer = b""
        while chunk := slow.recv(65536):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        assert answer.endswith(page("hello").encode())
        assert idle.recv(1) == b""  # closed by the server, not left to the drain's time limit
    wait_for_body(port, page("restarted"))


def test_runserver_answers_clients_that_send_a_moment_after_they_connect(site: Path,
                                                                          runserver: tuple[Server, int]) -> None:
    """A client's request comes a moment after its connect returns, and the old process accepts
    the connection at once: a restart that begins in between must answer it, not close it for a
    preconnect. Clients here wait 0.1 s between connect and request, through three restarts."""
    server, port = runserver
    starts = server.count(r"Watching for file changes")
    stop = threading.Event()
    answers: list[bytes] = []

    def client() -> None:
        while not stop.is_set():
            with socket.create_connection(("127.0.0.1", port), timeout=LIVENESS) as conn:
                time.sleep(0.1)
                conn.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                answer = b""
                with contextlib.suppress(OSError):
                    while chunk := conn.recv(65536):
                        answer += chunk
                answers.append(answer)

    clients = [threading.Thread(target=client, daemon=True) for _ in range(3)]
    for thread in clients:
        thread.start()
    try:
        for n in range(1, 4):
            greeting_view(site, f"restart-{n}")
            wait_for_body(port, page(f"restart-{n}"), timeout=LIVENESS)
            server.wait_for_log(r"Watching for file changes", count=starts + n)
            time.sleep(0.3)
    finally:
        stop.set()
        for thread in clients:
            thread.join(LIVENESS)
    assert len(answers) > 20
    assert [a[:60] for a in answers if not a.startswith(b"HTTP/1.1 200 ")] == []


def test_runserver_resets_templates_without_a_restart(site: Path, runserver: tuple[Server, int]) -> None:
    server, port = runserver
    time.sleep(1)
    restarts = server.count(r"Watching for file changes")
    write(site / "shop" / "templates" / "shop" / "hello.html", "{{ greeting }} from the edited template\n")
    wait_for_body(port, "hello from the edited template\n")
    assert server.count(r"Watching for file changes") == restarts


def test_runserver_uses_the_wsgi_reload_reloader(site: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", "import django; django.setup(); from django.utils import autoreload; "
         "print(type(autoreload.get_reloader()).__name__)"],
        cwd=site, env={**server_env(), "DJANGO_SETTINGS_MODULE": "mysite.settings"}, capture_output=True, text=True,
    )
    assert done.stdout.strip() == "WsgiReloadReloader", done.stderr


def test_a_worker_old_or_new_imports_nothing_of_the_watchers_side(site: Path) -> None:
    """A new worker's boot is on the path from a save to the first request served with it: the
    scanner, the gate, the swap, the patching code and runserver's reloader stay out of every
    worker, the first ones and those a reload starts."""
    from test_layout import WATCHER_SIDE

    write(site / "shop" / "modules.py",
          "import os, sys\nfrom django.http import HttpResponse\n\n\ndef modules(request):\n"
          f"    found = sorted(m for m in sys.modules if m.startswith({WATCHER_SIDE!r}))\n"
          "    return HttpResponse(f'{os.getpid()} {found}')\n")
    urls = site / "mysite" / "urls.py"
    write(urls, urls.read_text().replace("urlpatterns = [", "from shop.modules import modules\n\n"
                                         "urlpatterns = [\n    path('modules/', modules),"))

    def answers(pids: set[int]) -> set[int]:
        seen: set[int] = set()
        deadline = time.monotonic() + LIVENESS
        while len(seen - pids) < 2:
            assert time.monotonic() < deadline, f"two workers never answered; saw {seen}"
            status, body = get(port, "/modules/")
            pid, found = body.split(" ", 1)
            assert status == 200 and found == "[]", body
            seen.add(int(pid))
        return seen

    port = free_port()
    with running(start("gunicorn-sync", site, port), page("hello")) as server:
        wait_generation(server, "gunicorn-sync", 1)
        first = answers(set())
        greeting_view(site, "again")
        wait_for_body(port, page("again"), timeout=LIVENESS)
        server.wait_for_log(r"reload done")
        assert answers(first) - first


# --- settings and hosts --------------------------------------------------------------------


def test_a_bad_setting_is_a_warning_that_stops_nothing(site: Path) -> None:
    settings = site / "mysite" / "settings.py"
    settings.write_text(settings.read_text() + '\nWSGI_RELOAD = {"interval": "abc"}\n')
    done = subprocess.run([sys.executable, "manage.py", "check"], cwd=site, capture_output=True, text=True,
                          env=server_env())
    assert done.returncode == 0
    assert "wsgi_reload.W001" in done.stderr and "interval='abc' is not a number" in done.stderr
    migrate = subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=site, capture_output=True,
                             text=True, env=server_env())
    assert migrate.returncode == 0, migrate.stderr
    port = free_port()
    runserver = Server([sys.executable, "manage.py", "runserver", f"127.0.0.1:{port}"], port, site,
                       site.parent / "runserver.log", server_env())
    with running(runserver, page("hello")):
        greeting_view(site, "still-reloads")
        wait_for_body(port, page("still-reloads"), timeout=LIVENESS)


def test_an_unknown_host_starts_nothing(site: Path) -> None:
    code = ("import django, threading; django.setup(); "
            "print(sorted(t.name for t in threading.enumerate() if t.name.startswith('wsgi_reload')))")
    done = subprocess.run([sys.executable, "-c", code], cwd=site, capture_output=True, text=True,
                          env={**server_env(), "DJANGO_SETTINGS_MODULE": "mysite.settings"})
    assert done.stdout.strip() == "[]", done.stderr
    assert os.path.exists(site / "db.sqlite3")


def test_the_watcher_killed_at_random_through_saves(site: Path) -> None:
    """Django under gunicorn with no config: the watcher process killed with -9 at a random moment
    after each of six saves (mid-check, mid-swap or idle). A worker starts a new one, which carries
    on a swap the killed one left under way; every save is served, nothing fails, and the server
    ends with one watcher and its two workers, all serving the last save."""
    random.seed(os.getpid())
    port = free_port()
    with running(start("gunicorn-sync", site, port), page("hello")) as server, Load(port, threads=4) as load:
        wait_generation(server, "gunicorn-sync", 1)
        for n in range(2, 8):
            greeting_view(site, f"v{n}")
            time.sleep(random.uniform(0, 1.0))
            for pid in watcher_processes(site):
                os.kill(pid, signal.SIGKILL)
            wait_for_body(port, page(f"v{n}"), timeout=20)  # liveness: typically 2 to 4 s
        deadline, steady = time.monotonic() + 40, 0
        while steady < 10 and time.monotonic() < deadline:  # two workers for 2 s
            steady = steady + 1 if len(worker_pids(server)) == 2 else 0
            time.sleep(0.2)
        _, failures, _ = load.snapshot()
        the_watcher(site)  # exactly one
        assert {get(port)[1] for _ in range(10)} == {page("v7")}
        assert len(worker_pids(server)) == 2
    assert failures == []


def test_the_watcher_killed_under_load_comes_back(site: Path) -> None:
    """Django under gunicorn with no config: kill -9 of the watcher process under load."""
    port = free_port()
    with running(start("gunicorn-sync", site, port), page("hello")) as server:
        wait_generation(server, "gunicorn-sync", 1)
        assert server.count(r"started this server's watcher process") == 1

        def save() -> str:
            greeting_view(site, "v2")
            return page("v2")

        kill_the_watcher_under_load(server, site, save)
