"""One full scan, for this scanner and its peers, measured in the same run.

    python benchmarks/scan.py [--sizes 1000 10000] [--idle-seconds 20]

Builds a synthetic package of N imported modules, then times, best of several rounds:
a raw ``os.stat`` loop (the floor), ``wsgi_reload.Scanner.scan()``, gunicorn's
``Reloader`` walk (``get_files()`` plus its stat loop), Django's
``StatReloader.snapshot_files()`` and the seed-style ``code_changed()`` (stat every
``sys.modules`` file, compare ``st_mtime``). Each is timed per full scan, over the files
it chooses to watch (counted beside it): the peers watch every ``sys.modules`` file,
including the standard library's; ours skips the standard library and counts what it does
not skip. Our ratio is to the raw loop over our own files. Then the CPU an idle monitor uses
per minute with the polling and the event backends.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from wsgi_reload import Monitor, Scanner, Settings


def build_package(root: Path, name: str, count: int) -> list[str]:
    package = root / name
    package.mkdir()
    (package / "__init__.py").write_text("")
    per_dir = 100
    for d in range(0, count, per_dir):
        sub = package / f"d{d // per_dir}"
        sub.mkdir()
        (sub / "__init__.py").write_text("")
        for n in range(d, min(d + per_dir, count)):
            (sub / f"m{n}.py").write_text(f"VALUE = {n}\n")
    sys.path.insert(0, str(root))
    for d in range(0, count, per_dir):
        for n in range(d, min(d + per_dir, count)):
            importlib.import_module(f"{name}.d{d // per_dir}.m{n}")
    return [m.__file__ for m in list(sys.modules.values()) if getattr(m, "__file__", None)]  # type: ignore[misc]


def best(func: Callable[[], object], rounds: int = 7) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return min(times)


def best_of_both(first: Callable[[], object], second: Callable[[], object], rounds: int = 15) -> tuple[float, float]:
    """The best time of each, their rounds taken in turn: on a shared machine the load moves
    between two blocks of rounds, and their ratio with it."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(rounds):
        for func, taken in zip((first, second), times, strict=True):
            start = time.perf_counter()
            func()
            taken.append(time.perf_counter() - start)
    return min(times[0]), min(times[1])


def raw_stat_loop(files: list[str]) -> Callable[[], object]:
    def run() -> None:
        for path in files:
            try:
                os.stat(path)
            except OSError:
                pass

    return run


def seed_code_changed() -> Callable[[], int]:
    mtimes: dict[str, float] = {}

    def run() -> int:
        for module in list(sys.modules.values()):
            filename = getattr(module, "__file__", None)
            if not filename:
                continue
            if filename.endswith((".pyc", ".pyo")):
                filename = filename[:-1]
            try:
                mtime = os.stat(filename).st_mtime
            except OSError:
                continue
            mtimes.setdefault(filename, mtime)
        return len(mtimes)

    return run


def gunicorn_walk() -> Callable[[], int] | None:
    try:
        from gunicorn.reloader import Reloader
    except ImportError:
        return None
    reloader = Reloader()

    def run() -> int:  # the body of Reloader.run() without its sleep
        mtimes: dict[str, float] = {}
        for filename in reloader.get_files():
            try:
                mtimes[filename] = os.stat(filename).st_mtime
            except OSError:
                continue
        return len(mtimes)

    return run


def django_snapshot() -> Callable[[], int] | None:
    try:
        import django
        from django.conf import settings
    except ImportError:
        return None
    if not settings.configured:
        settings.configure(INSTALLED_APPS=[])
        django.setup()
    from django.utils.autoreload import StatReloader

    reloader = StatReloader()
    return lambda: len(list(reloader.snapshot_files()))


def idle_cpu_per_minute(backend: str, seconds: float) -> tuple[str, float]:
    monitor = Monitor(Scanner(Settings(backend=backend)), lambda batch: None).start()
    time.sleep(1.5)  # the baseline scan and, for events, the watcher start
    start = time.process_time()
    time.sleep(seconds)
    used = time.process_time() - start
    monitor.stop()
    return monitor.backend, used * 60 / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000])
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="wsgi-reload-bench-"))
    print(f"Python {sys.version.split()[0]}, {os.cpu_count()} cores; ms per full scan (files it stats), "
          "best of 7 (the raw loop and wsgi_reload: best of 15, their rounds in turn)\n")
    headers = ["imported modules", "raw os.stat, our files", "wsgi_reload", "gunicorn Reloader",
               "Django StatReloader", "seed code_changed"]
    print("| " + " | ".join(headers) + " |")
    print("|" + "|".join("-" * (len(h) + 2) for h in headers) + "|")
    imported = 0
    for size in args.sizes:
        build_package(root, f"bench_pkg_{size}", size - imported if imported < size else size)
        imported = size
        scanner = Scanner(Settings())
        scanner.scan()
        files = list(scanner.watched_files())
        floor, ours = best_of_both(raw_stat_loop(files), scanner.scan)
        cells = [f"{floor * 1e3:.2f} ({len(files)})", f"{ours * 1e3:.2f} ({ours / floor:.2f}x)"]
        for peer in (gunicorn_walk(), django_snapshot(), seed_code_changed()):
            if peer is None:
                cells.append("n/a")
                continue
            count = peer()  # the first call records a baseline
            cells.append(f"{best(peer) * 1e3:.2f} ({count})")
        print(f"| {len(sys.modules)} | " + " | ".join(cells) + " |")

    print(f"\nIdle CPU of a monitor over {len(sys.modules)} modules, CPU-seconds per minute:")
    for backend in ("poll", "events"):
        used_backend, cpu = idle_cpu_per_minute(backend, args.idle_seconds)
        print(f"- {backend} (ran as {used_backend}): {cpu:.3f}")


if __name__ == "__main__":
    main()
