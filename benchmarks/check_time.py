"""The pre-reload check's own time, cold (a fresh interpreter) against warm (forked from a process
that has imported the installed packages), on the example Django site and a 1,500-module app.

    python benchmarks/check_time.py [--rounds 10]

Both run the same probe and must give the same answer; each row checks a good save and a
broken one. Printed, never asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from _harness import big_app, django_site, print_table
from servers import server_env

from wsgi_reload._check.check import import_app
from wsgi_reload._check.warm import checks_forked, close_all, wait_ready

WORKER_FILES = """
import json, sys
sys.path.insert(0, {directory!r})
{setup}
print(json.dumps([m.__file__ for m in list(sys.modules.values()) if isinstance(getattr(m, "__file__", None), str)]))
"""


def worker_files(directory: Path, setup: str, env: dict[str, str]) -> list[str]:
    """The module files a worker of this app would have loaded (what the records say)."""
    import json

    code = WORKER_FILES.format(directory=str(directory), setup=setup)
    out = subprocess.run([sys.executable, "-c", code], cwd=directory, env=env, check=True, capture_output=True)
    return list(json.loads(out.stdout))


def time_checks(name: str, directory: Path, app: str, files: list[str], env: dict[str, str], broken: Path,
                rounds: int) -> dict[str, str]:
    sys_path = [str(directory), *sys.path[1:]]
    row = {"app": name}
    for mode in ("cold", "warm"):
        close_all()
        warm_from = files if mode == "warm" else None
        if warm_from is not None:
            import_app(app, cwd=str(directory), sys_path=sys_path, env=env, warm_from=warm_from)
            wait_ready(60)
        forked = checks_forked()
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            result = import_app(app, cwd=str(directory), sys_path=sys_path, env=env, warm_from=warm_from)
            times.append(time.perf_counter() - started)
            assert result.ok, result
        original = broken.read_text()
        broken.write_text(original + "\nundefined_name\n")
        refused = import_app(app, cwd=str(directory), sys_path=sys_path, env=env, warm_from=warm_from)
        broken.write_text(original)
        assert not refused.ok and refused.file == str(broken), refused
        if mode == "warm":
            assert checks_forked() - forked == rounds + 1, "the warm rows must not fall back to cold checks"
        row[f"{mode} p50 ms"] = f"{1000 * statistics.median(times):.0f}"
        row[f"{mode} max ms"] = f"{1000 * max(times):.0f}"
    close_all()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    env = server_env()
    site = django_site(with_plugin=True).app
    django_env = dict(env, DJANGO_SETTINGS_MODULE="mysite.settings")
    setup = "import django; django.setup(); from django.urls import get_resolver; get_resolver().url_patterns"
    files = worker_files(site, setup, django_env)
    rows = [time_checks("Django example site", site, "mysite.wsgi:application", files, env,
                        site / "shop" / "views.py", args.rounds)]
    app = big_app()
    files = worker_files(app, "import app", env)
    rows.append(time_checks("1,500-module app", app, "app:application", files, env, app / "greeting.py", args.rounds))
    print(f"{os.cpu_count()} cores, Python {sys.version.split()[0]}; {args.rounds} good checks and 1 broken each\n")
    print_table(rows)


if __name__ == "__main__":
    main()
