"""Shared measurement of a reloading server: latency, failed requests, broken saves, idle CPU.

Each case starts a real server on 127.0.0.1 from the test helpers and drives it with real
edits and a real HTTP load. The numbers are printed, never asserted.
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from servers import BROKEN_SAVES, Load, Server, greeting, make_app, wait_for_body, write  # noqa: E402

BIG_APP_MODULES = 1500


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


def tree_cpu_seconds(pgid: int) -> float:
    """User plus system CPU of every live process in a process group."""
    ticks = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def measure(name: str, start: Callable[[Path, int], Server], edits: int, idle_seconds: float,
            broken_seconds: float = 5.0) -> dict[str, str]:
    """Run one server through idle time, ``edits`` reloads under load, and one broken save."""
    from servers import free_port

    app = big_app()
    port = free_port()
    server = start(app, port)
    row: dict[str, str] = {"server": name}
    try:
        server.start("v1", ready_timeout=120)
        time.sleep(3)
        assert server.proc is not None
        before = tree_cpu_seconds(server.proc.pid)
        time.sleep(idle_seconds)
        row["idle CPU %"] = f"{100 * (tree_cpu_seconds(server.proc.pid) - before) / idle_seconds:.2f}"

        latencies = []
        with Load(port, threads=4) as load:
            for n in range(2, 2 + edits):
                write(app / "greeting.py", greeting(f"v{n}"))
                latencies.append(wait_for_body(port, f"v{n}", timeout=60))
                time.sleep(1.5)  # let the reload finish before the next edit
            ok, failures, _ = load.snapshot()
        cuts = statistics.quantiles(latencies, n=20)
        row["latency p50 s"] = f"{statistics.median(latencies):.2f}"
        row["latency p95 s"] = f"{cuts[18]:.2f}"
        row["failed during reloads"] = f"{len(failures)} of {ok + len(failures)}"

        good = f"v{1 + edits}"
        with Load(port, threads=4) as load:
            write(app / "greeting.py", BROKEN_SAVES["syntax"])
            time.sleep(broken_seconds)
            ok, failures, bodies = load.snapshot()
        row["failed while broken"] = f"{len(failures)} of {ok + len(failures)}"
        kinds = sorted({f.split(":")[0] for f in failures})
        served = ["old code"] if ok and bodies <= {good} else sorted(bodies)
        row["served while broken"] = ", ".join(served + kinds)[:40]
        write(app / "greeting.py", greeting("fixed"))
        try:
            wait_for_body(port, "fixed", timeout=15)
            row["recovers after the fix"] = "yes"
        except AssertionError:
            row["recovers after the fix"] = "no (restart needed)"
    finally:
        server.stop()
    return row


def print_table(rows: list[dict[str, str]]) -> None:
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(r.get(c, "")) for r in rows)) for c in columns}
    print("| " + " | ".join(c.ljust(widths[c]) for c in columns) + " |")
    print("|" + "|".join("-" * (widths[c] + 2) for c in columns) + "|")
    for r in rows:
        print("| " + " | ".join(r.get(c, "").ljust(widths[c]) for c in columns) + " |")
