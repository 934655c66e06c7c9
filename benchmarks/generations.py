"""What a code generation costs: building it, storing it, and booting a worker from it.

    python benchmarks/generations.py [--sizes 1500 10000] [--rounds 5]

For a synthetic project of N modules (each a function, a class and a constant, about 30
lines) it prints, side by side in one run:

- one full scan (``wsgi_reload.Scanner.scan()``) and a raw ``os.stat`` loop over the same files;
- building the first generation (every file read, hashed and stored) and rebuilding after one
  file changed (the stat walk plus one read), the goal being no longer than one full scan;
- the store's size on disk next to the project's;
- a worker's boot, a fresh interpreter importing every module: from the disk with its
  ``__pycache__`` written, against from the generation with its compiled-code cache written.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from scan import best  # one timing helper for the benchmarks that time a function

from wsgi_reload import Scanner, Settings
from wsgi_reload._server.generations import Store

MODULE = '''"""Module {n}."""

import os

LIMIT = {n}


def compute(values):
    total = 0
    for value in values:
        if value > LIMIT:
            total += value * 2
        else:
            total -= value
    return total


class Thing{n}:
    """A small class."""

    def __init__(self, name):
        self.name = name

    def describe(self):
        return f"{{self.name}} in {{os.getcwd()}}"

    @property
    def size(self):
        return len(self.name)
'''


def project(root: Path, count: int, per_dir: int = 100) -> list[str]:
    package = root / "proj"
    package.mkdir()
    (package / "__init__.py").write_text("")
    files = [str(package / "__init__.py")]
    for d in range(0, count, per_dir):
        sub = package / f"d{d // per_dir}"
        sub.mkdir()
        (sub / "__init__.py").write_text("")
        files.append(str(sub / "__init__.py"))
        for n in range(d, min(d + per_dir, count)):
            path = sub / f"m{n}.py"
            path.write_text(MODULE.format(n=n))
            files.append(str(path))
    # A checkout made more than 2 s ago, as a real project is: the store trusts a directory's
    # cached listing only once its mtime is older than that (see generations.RACY_NS).
    hour_ago = time.time() - 3600
    for directory, _, _ in os.walk(package):
        os.utime(directory, (hour_ago, hour_ago))
    return files


def tree_size(root: str) -> int:
    return sum(os.lstat(os.path.join(d, f)).st_size for d, _, names in os.walk(root) for f in names)


def boot_seconds(root: Path, count: int, store: str | None, rounds: int) -> float:
    """p50 of a fresh interpreter importing every module (after one warm-up run that writes the
    __pycache__ or the store's code cache)."""
    install = ""
    if store is not None:
        install = (f"from wsgi_reload._server.generations import Store; s = Store({store!r}); "
                   "s.install(s.load(s.current_id()))\n")
    code = (f"import sys, time, importlib\nsys.path.insert(0, {str(root)!r})\n{install}"
            "t = time.perf_counter()\n"
            f"for n in range({count}):\n    importlib.import_module(f'proj.d{{n // 100}}.m{{n}}')\n"
            "print(time.perf_counter() - t)\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    samples = []
    for _ in range(rounds + 1):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        samples.append(float(out.stdout.strip()))
    return statistics.median(samples[1:])


def measure(count: int, rounds: int) -> dict[str, str]:
    with tempfile.TemporaryDirectory(prefix="wsgi-reload-gen-") as scratch:
        root = Path(scratch) / "src"
        root.mkdir()
        files = project(root, count)
        scanner = Scanner(Settings(), watch_modules=False, sources=[lambda: files])
        scanner.scan()
        scan = best(scanner.scan, rounds)

        def raw() -> None:
            for path in files:
                os.stat(path)

        raw_stat = best(raw, rounds)
        store = Store(str(Path(scratch) / "store"))
        start = time.perf_counter()
        first = store.build([str(root)])
        cold = time.perf_counter() - start
        store.publish(first)
        edited = files[len(files) // 2]
        generation = first

        def rebuild() -> None:
            nonlocal generation
            with open(edited, "a") as f:
                f.write("# edit\n")
            generation = store.build([str(root)], base=generation)

        incremental = best(rebuild, rounds)
        store.publish(generation)
        disk_boot = boot_seconds(root, count, None, rounds)
        generation_boot = boot_seconds(root, count, store.directory, rounds)
        return {
            "modules": str(count),
            "files": str(len(files)),
            "full scan ms": f"{scan * 1000:.1f}",
            "raw stat ms": f"{raw_stat * 1000:.1f}",
            "first build ms": f"{cold * 1000:.0f}",
            "rebuild, 1 file ms": f"{incremental * 1000:.1f} ({incremental / scan:.2f}x scan)",
            "store MB": f"{store.size() / 1e6:.1f} (project {tree_size(str(root)) / 1e6:.1f})",
            "boot from disk s": f"{disk_boot:.3f}",
            "boot from generation s": f"{generation_boot:.3f} ({generation_boot / disk_boot:.2f}x)",
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1500, 10000])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    rows = [measure(count, args.rounds) for count in args.sizes]
    header = list(rows[0])
    widths = [max(len(h), *(len(r[h]) for r in rows)) for h in header]
    print(f"Python {sys.version.split()[0]}, {os.cpu_count()} cores; best of {args.rounds} (boot: median)")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print("| " + " | ".join(row[h].ljust(w) for h, w in zip(header, widths, strict=True)) + " |")


if __name__ == "__main__":
    main()
