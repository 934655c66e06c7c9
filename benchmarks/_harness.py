"""Shared measurement of a reloading server: latency, failed requests, broken saves, idle CPU.

Each case starts a real server on 127.0.0.1 from the test helpers and drives it with real
edits and a real HTTP load. The numbers are printed, never asserted.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from servers import (  # noqa: E402
    BROKEN_SAVES,
    HERE,
    Load,
    Server,
    free_port,
    greeting,
    make_app,
    processes,
    server_env,
    wait_for_body,
    watcher_processes,
    worker_pids,
    write,
)

from wsgi_reload._check.warm import WARM_TITLE as WARM_PROCESS  # noqa: E402

BIG_APP_MODULES = 1500


@dataclass
class Site:
    """An app to edit: each edit returns the body expected once it is served."""

    app: Path
    edit: Callable[[int], str]
    break_it: Callable[[], None]
    fix: Callable[[], str]
    path: str = "/"
    notes: list[str] = field(default_factory=list)


def big_app(modules: int = BIG_APP_MODULES) -> Path:
    """The test app plus a package of ``modules`` imported modules, about a Django site's count."""
    root = Path(tempfile.mkdtemp(prefix="wsgi-reload-bench-"))
    app = make_app(root)
    package = app / "bigpkg"
    package.mkdir()
    lines = []
    for n in range(modules):
        (package / f"m{n}.py").write_text(f"VALUE = {n}\n")
        lines.append(f"from . import m{n}  # noqa")
    (package / "__init__.py").write_text("\n".join(lines) + "\n")
    (app / "app.py").write_text("import bigpkg  # noqa: F401\n" + (app / "app.py").read_text())
    return app


def big_site(modules: int = BIG_APP_MODULES) -> Site:
    """:func:`big_app`, edited through greeting.py."""
    app = big_app(modules)

    def edit(n: int) -> str:
        write(app / "greeting.py", greeting(f"v{n}"))
        return f"v{n}"

    def fix() -> str:
        write(app / "greeting.py", greeting("fixed"))
        return "fixed"

    return Site(app, edit, lambda: write(app / "greeting.py", BROKEN_SAVES["syntax"]), fix)


def django_site(with_plugin: bool, writes: bool = False) -> Site:
    """A fresh copy of the example Django site, edited through its view's GREETING; without the
    plugin, "wsgi_reload.django" is taken out of INSTALLED_APPS (for the peers and the floor).
    With ``writes`` the view writes to ``db.sqlite3`` in ``BASE_DIR`` on every request, as a
    site that counts visits does: its journal comes and goes beside the code all the time."""
    import shutil

    root = Path(tempfile.mkdtemp(prefix="wsgi-reload-bench-"))
    site = root / "site"
    shutil.copytree(HERE.parent / "example_project", site, ignore=shutil.ignore_patterns("db.sqlite3", "__pycache__"))
    if not with_plugin:
        settings = site / "mysite" / "settings.py"
        settings.write_text(settings.read_text().replace('    "wsgi_reload.django",', ""))
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=site, check=True, env=server_env())
    views = site / "shop" / "views.py"
    original = views.read_text()
    if writes:
        original = original.replace('def hello(request):\n', 'def hello(request):\n'
                                    '    Item.objects.filter(name="visits").update(name="visits")\n')
        assert "visits" in original

    def with_greeting(text: str) -> str:
        return original.replace('GREETING = "hello"', f'GREETING = "{text}"')

    def edit(n: int) -> str:
        write(views, with_greeting(f"v{n}"))
        return f"v{n} from the template\n"

    def fix() -> str:
        write(views, with_greeting("fixed"))
        return "fixed from the template\n"

    return Site(site, edit, lambda: write(views, with_greeting("broken") + "\nundefined_name\n"), fix)


def tree_cpu_seconds(pgid: int) -> float:
    """User plus system CPU of every live process in a process group, plus wsgi_reload's own
    processes that lead sessions of their own (a watcher process, a warm check process): one
    server runs at a time here, so those are this server's."""
    ticks = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                ours = b"wsgi_reload" in f.read()
        except OSError:
            continue
        if int(fields[2]) == pgid or (ours and int(entry) != os.getpid()):
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def idle_cpu_per_minute(server: Server, seconds: float) -> float:
    """CPU-seconds per minute of the server's whole process tree while nothing changes."""
    assert server.proc is not None
    time.sleep(3)  # start-up work settles
    before = tree_cpu_seconds(server.proc.pid)
    time.sleep(seconds)
    return 60 * (tree_cpu_seconds(server.proc.pid) - before) / seconds


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def memory(server: Server, app: Path) -> dict[str, str]:
    """Resident memory, MB: a worker (the largest), the watcher process, the warm check process."""
    workers = [rss_mb(pid) for pid in worker_pids(server)]
    watchers = [rss_mb(pid) for pid in watcher_processes(app.resolve())]
    warm = [rss_mb(pid) for pid, (_, _, command) in processes().items()
            if WARM_PROCESS in command and _cwd(pid) == str(app.resolve())]
    show = lambda values: f"{max(values):.0f}" if values else "-"  # noqa: E731
    return {"RSS MB worker": show(workers), "watcher": show(watchers), "warm check": show(warm)}


def _cwd(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/cwd")
    except OSError:
        return None


def breakdown(log: str) -> dict[str, str]:
    """Where our reloads spent their time, from the watcher's own lines: the check, and the swap
    (from the check passing to every new worker serving); p50 over the edits."""
    checks = [float(ms) for ms in re.findall(r"check passed \(.*?, (\d+) ms\)", log)]
    swaps = [float(ms) for ms in re.findall(r"reload done: .*?(\d+) ms after", log)]
    median = lambda values: f"{statistics.median(values) / 1000:.2f}" if values else "-"  # noqa: E731
    return {"check p50 s": median(checks), "swap p50 s": median(swaps)}


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def measure(name: str, start: Callable[[Path, int], Server], site: Site, edits: int, idle_seconds: float,
            broken_seconds: float = 5.0, expect: str | None = None, ours: bool = False) -> dict[str, str]:
    """Run one server through idle time, ``edits`` reloads under load, and one broken save.

    :param ours: also say where the reloads spent their time, and the memory of our processes.
    """
    port = free_port()
    server = start(site.app, port)
    row: dict[str, str] = {"server": name}
    try:
        server.start(expect, ready_timeout=120)
        row["idle CPU-s/min"] = f"{idle_cpu_per_minute(server, idle_seconds):.3f}"
        latencies = []
        with Load(port, threads=4, path=site.path) as load:
            for n in range(2, 2 + edits):
                expected = site.edit(n)
                latencies.append(wait_for_body(port, expected, timeout=60, path=site.path))
                time.sleep(1.5)  # let the reload finish before the next edit
            ok, failures, _ = load.snapshot()
        row["save to served p50 s"] = f"{statistics.median(latencies):.2f}"
        row["p95 s"] = f"{percentile(latencies, 0.95):.2f}"
        row["p99 s"] = f"{percentile(latencies, 0.99):.2f}"
        row["failed, good saves"] = f"{len(failures)} of {ok + len(failures)}"
        if ours:
            row.update(breakdown(server.log()))
            row.update(memory(server, site.app))
        with Load(port, threads=4, path=site.path) as load:
            site.break_it()
            time.sleep(broken_seconds)
            ok, failures, bodies = load.snapshot()
        row["failed while broken"] = f"{len(failures)} of {ok + len(failures)}"
        expected = site.fix()
        try:
            wait_for_body(port, expected, timeout=15, path=site.path)
            row["recovers"] = "yes"
        except AssertionError:
            row["recovers"] = "no (restart needed)"
    finally:
        server.stop()
    return row


def measure_idle(name: str, start: Callable[[Path, int], Server], site: Site, idle_seconds: float,
                 expect: str | None = None) -> dict[str, str]:
    """A server with no reloader: only its idle CPU, the floor for the others."""
    port = free_port()
    server = start(site.app, port)
    try:
        server.start(expect, ready_timeout=120)
        return {"server": name, "idle CPU-s/min": f"{idle_cpu_per_minute(server, idle_seconds):.3f}"}
    finally:
        server.stop()


def table(rows: list[dict[str, str]]) -> str:
    columns = list(dict.fromkeys(c for r in rows for c in r))
    widths = {c: max(len(c), *(len(r.get(c, "")) for r in rows)) for c in columns}
    lines = ["| " + " | ".join(c.ljust(widths[c]) for c in columns) + " |",
             "|" + "|".join("-" * (widths[c] + 2) for c in columns) + "|"]
    lines += ["| " + " | ".join(r.get(c, "-").ljust(widths[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def print_table(rows: list[dict[str, str]]) -> None:
    print(table(rows))
