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
import threading
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
    runtime_dir_of,
    server_env,
    wait_for_body,
    watcher_processes,
    worker_pids,
    write,
)

from wsgi_reload._check.warm import WARM_TITLE as WARM_PROCESS  # noqa: E402
from wsgi_reload._server.signals import start_time  # noqa: E402

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


STAGES = ("change seen", "check passed", "new worker forked", "new worker ready", "new body served",
          "all new serving")
"""The moments of one reload, each in seconds after the save (see :meth:`Timeline.stages`)."""


class Timeline(threading.Thread):
    """Timestamps, as they happen, the server's log lines and the first appearance of each
    worker record in the runtime directory: the stages of each reload, read from outside.

    Polls every 5 ms (a few syscalls), only while the edits run.
    """

    def __init__(self, log_path: Path, runtime: Path) -> None:
        super().__init__(daemon=True)
        self.log_path = log_path
        self.runtime = runtime
        self.lines: list[tuple[float, str]] = []
        self.workers: dict[int, tuple[float, float]] = {}
        """pid: (when the process started, when its first record was written), epoch seconds."""
        self._done = threading.Event()
        self._offset = log_path.stat().st_size
        self._pending = b""
        # /proc/PID/stat counts clock ticks since boot; this turns them into epoch seconds.
        self._boot = time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)
        self._tick = os.sysconf("SC_CLK_TCK")

    def run(self) -> None:
        while not self._done.wait(0.005):
            now = time.time()
            with open(self.log_path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
            self._offset += len(data)
            *complete, self._pending = (self._pending + data).split(b"\n")
            self.lines += [(now, line.decode(errors="replace")) for line in complete]
            try:
                names = os.listdir(self.runtime)
            except OSError:
                continue
            for name in names:
                pid = name.removesuffix(".json")
                if name.endswith(".json") and pid.isdigit() and int(pid) not in self.workers:
                    try:
                        written = os.stat(self.runtime / name).st_mtime
                    except OSError:
                        continue
                    ticks = start_time(int(pid))
                    if ticks is not None:
                        self.workers[int(pid)] = (self._boot + ticks / self._tick, written)

    def stop(self) -> None:
        self._done.set()
        self.join()

    def _line(self, pattern: str, after: float) -> float | None:
        return next((t for t, line in self.lines if t >= after and re.search(pattern, line)), None)

    def stages(self, saved: float, served: float) -> dict[str, float] | None:
        """When each moment of the reload of a save at ``saved`` (first served at ``served``)
        came, in seconds after the save: the watcher's "changed" line (the settle window and
        the scan), "check passed", the start of the first new worker process (the first to write
        a record after the change was seen; under gunicorn it may start beside the check), its
        first record (its app loaded, and the verdict it waited for, if any), the new body
        served, and the watcher's "reload done" (every new worker serves). Moments, not
        durations: with the first new worker started beside the check, two stages overlap."""
        seen = self._line(r"wsgi_reload: \d+ files? changed", saved)
        passed = None if seen is None else self._line(r"wsgi_reload: check passed", seen)
        done = None if passed is None else self._line(r"wsgi_reload: reload done", passed)
        if seen is None or passed is None or done is None:
            return None
        # The first new worker: started after the change was seen, or, a spare started before the
        # save (Django with no gunicorn config, which writes no record while it waits), the first
        # to write its record after it; its start is then a negative moment. (A line the watcher
        # logs through a worker, as under uWSGI's logger, can be read after that worker wrote.)
        new = [(written, started) for started, written in self.workers.values()
               if started >= seen - 0.01 or written >= seen - 0.01]
        if not new:
            return None
        written, started = min(new)
        moments = (seen, passed, started, written, served, done)
        return dict(zip(STAGES, (moment - saved for moment in moments), strict=True))


def stage_row(name: str, stages: list[dict[str, float]]) -> dict[str, str]:
    """p50 of each moment over the edits whose every moment was seen."""
    row = {"server": name, "reloads seen": str(len(stages))}
    for stage in STAGES:
        values = [s[stage] for s in stages]
        row[stage] = f"{statistics.median(values):.3f}" if values else "-"
    return row


def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


def measure(name: str, start: Callable[[Path, int], Server], site: Site, edits: int, idle_seconds: float,
            broken_seconds: float = 5.0, expect: str | None = None, ours: bool = False) -> dict[str, str]:
    """Run one server through idle time, ``edits`` reloads under load, and one broken save.

    :param ours: also say where the reloads spent their time (:data:`STAGES`), and the memory
        of our processes.
    """
    port = free_port()
    server = start(site.app, port)
    row: dict[str, str] = {"server": name}
    try:
        server.start(expect, ready_timeout=120)
        row["idle CPU-s/min"] = f"{idle_cpu_per_minute(server, idle_seconds):.3f}"
        latencies, saves = [], []
        timeline = Timeline(server.log_path, runtime_dir_of(site.app.resolve())) if ours else None
        if timeline is not None:
            timeline.start()
        with Load(port, threads=4, path=site.path) as load:
            for n in range(2, 2 + edits):
                saved = time.time()
                expected = site.edit(n)
                latencies.append(wait_for_body(port, expected, timeout=60, path=site.path, every=0.005))
                saves.append((saved, saved + latencies[-1]))
                time.sleep(1.5)  # let the reload finish before the next edit
            ok, failures, _ = load.snapshot()
        if timeline is not None:
            # A swap can end after the next save (each new Django worker imports the framework):
            # its "reload done" line comes later. Read on until the last one has come.
            deadline = time.monotonic() + 30
            while timeline.stages(*saves[-1]) is None and time.monotonic() < deadline:
                time.sleep(0.1)
            timeline.stop()
            stages = [moments for moments in (timeline.stages(*save) for save in saves) if moments]
            row.update(stage_row(name, stages))
        row["save to served p50 s"] = f"{statistics.median(latencies):.2f}"
        row["p95 s"] = f"{percentile(latencies, 0.95):.2f}"
        row["p99 s"] = f"{percentile(latencies, 0.99):.2f}"
        row["failed, good saves"] = f"{len(failures)} of {ok + len(failures)}"
        if ours:
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
