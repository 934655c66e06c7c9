"""gunicorn patch mode against restart mode on the same app, in one run.

    python benchmarks/patch_vs_restart.py [--edits 10]

The counter test app under -w 2 sync workers with the event backend. Two kinds of edit:
one function body changed; and a function body changed together with a new helper function
it calls (the previous edit's helper removed). Prints save-to-served latency (p50, p95, until
a request gets the new body) and how many workers were started for it, for
WSGI_RELOAD_MODE=patch with each kind of edit, and restart.
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
from pathlib import Path

from _harness import print_table
from servers import free_port, get, gunicorn, make_app, server_env, write

COUNTING = 'LABEL = "count"\nTITLE = LABEL.title()\n\n\ndef text(hits):\n    return f"{version} {{hits}}"\n'
WITH_HELPER = ('LABEL = "count"\nTITLE = LABEL.title()\n\n\ndef joined_{n}(version, hits):\n'
               '    return f"{{version}} {{hits}}"\n\n\ndef text(hits):\n    return joined_{n}("{version}", hits)\n')
EDITS = {
    "function body": lambda n: COUNTING.format(version=f"v{n}"),
    "body + new helper": lambda n: WITH_HELPER.format(n=n, version=f"v{n}"),
}


def served(port: int, version: str, timeout: float = 30.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if re.fullmatch(rf"{version} \d+", get(port)[1]):
                return time.monotonic() - start
        except OSError:
            pass
        time.sleep(0.005)
    raise RuntimeError(f"{version} never served")


def run(mode: str, edit: str, edits: int) -> dict[str, str]:
    app = make_app(Path(tempfile.mkdtemp(prefix="wsgi-reload-bench-")), "counter")
    port = free_port()
    server = gunicorn(app, port, ["-w", "2"], env=server_env(mode=mode, backend="events"))
    try:
        server.start(None)
        served(port, "v1")
        server.wait_for_log(r"workers up")
        booted = server.count(r"Booting worker")
        latencies = []
        for n in range(2, 2 + edits):
            time.sleep(1.5)
            write(app / "counting.py", EDITS[edit](n))
            latencies.append(served(port, f"v{n}"))
        time.sleep(2)
        cuts = statistics.quantiles(latencies, n=20)
        return {"mode": mode, "edit": edit, "latency p50 ms": f"{1000 * statistics.median(latencies):.0f}",
                "latency p95 ms": f"{1000 * cuts[18]:.0f}",
                "workers started": str(server.count(r"Booting worker") - booted)}
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--edits", type=int, default=10)
    args = parser.parse_args()
    print_table([run("patch", "function body", args.edits), run("patch", "body + new helper", args.edits),
                 run("restart", "function body", args.edits)])


if __name__ == "__main__":
    main()
