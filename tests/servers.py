"""Helpers for the integration tests: real servers on 127.0.0.1, a real HTTP load, real file edits."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
APPS = HERE / "apps"
BIN = Path(sys.executable).parent

LIVENESS_TIMEOUT = 30.0
"""Generous: only a hung server should ever hit it."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def get(port: int, path: str = "/", timeout: float = 10.0) -> tuple[int, str]:
    """One real HTTP request; returns (status, body). A negative port speaks the uwsgi protocol."""
    if port < 0:
        return get_uwsgi(-port, path, timeout)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        response = conn.getresponse()
        return response.status, response.read().decode(errors="replace")
    finally:
        conn.close()


def get_uwsgi(port: int, path: str = "/", timeout: float = 10.0) -> tuple[int, str]:
    """One request over uWSGI's own binary protocol (``--socket``), as nginx's uwsgi_pass sends it."""
    env = {"REQUEST_METHOD": "GET", "PATH_INFO": path, "QUERY_STRING": "", "SERVER_NAME": "127.0.0.1",
           "SERVER_PORT": str(port), "SERVER_PROTOCOL": "HTTP/1.1", "HTTP_HOST": "127.0.0.1"}
    body = b"".join(
        len(k).to_bytes(2, "little") + k.encode() + len(v).to_bytes(2, "little") + v.encode() for k, v in env.items()
    )
    packet = b"\x00" + len(body).to_bytes(2, "little") + b"\x00" + body
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
        conn.sendall(packet)
        chunks = []
        while chunk := conn.recv(65536):
            chunks.append(chunk)
    raw = b"".join(chunks).decode(errors="replace")
    head, _, content = raw.partition("\r\n\r\n")
    if not head.startswith("HTTP/"):
        raise ConnectionError(f"not an HTTP answer: {raw[:80]!r}")
    return int(head.split()[1]), content


def wait_for_body(port: int, expected: str, timeout: float = LIVENESS_TIMEOUT, path: str = "/",
                  every: float = 0.02) -> float:
    """Poll until the body is ``expected``; returns the seconds it took.

    :param every: seconds between requests (the benchmarks poll more often, for resolution).
    """
    start = time.monotonic()
    last: object = None
    while time.monotonic() - start < timeout:
        try:
            last = get(port, path, timeout=5)
            if last == (200, expected):
                return time.monotonic() - start
        except OSError as exc:
            last = exc
        time.sleep(every)
    raise AssertionError(f"never served {expected!r} within {timeout} s; last answer {last!r}")


def write(path: Path, text: str) -> None:
    """Save a file the way an editor does: write and flush, bytes on disk."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def make_app(tmp_path: Path, name: str = "plain") -> Path:
    """Copy a test app into a fresh directory."""
    target = tmp_path / "app"
    shutil.copytree(APPS / name, target)
    return target


def greeting(version: str, setup: str = "pass", head: str = "") -> str:
    """The source of greeting.py answering ``version``."""
    return f'{head}def setup():\n    {setup}\n\n\ndef text():\n    return "{version}"\n'


BROKEN_SAVES = {
    "syntax": greeting("broken").replace('"broken"', '"broken'),
    "name_error": greeting("broken", head="undefined_name\n\n"),
    "missing_import": greeting("broken", head="import no_such_module_here\n\n"),
    "app_build_error": greeting("broken", setup='raise RuntimeError("cannot build the app")'),
}
"""Saves that break the app in each way the issue names; each must keep the old code serving."""


def hold_broken_saves(server: Server, app: Path, load: Load, wait_reloaded: Callable[[int], None],
                      hold: float = 5.0) -> None:
    """Each kind of broken save, held ``hold`` seconds under load, then fixed with the next version.

    While broken: no failed request, only the last good version served, the server alive and
    the log naming greeting.py with a line. After each fix: the new version is served.
    """
    good = "v1"
    for n, (kind, source) in enumerate(sorted(BROKEN_SAVES.items()), start=2):
        load.reset_bodies()
        write(app / "greeting.py", source)
        time.sleep(hold)
        _, failures, bodies = load.snapshot()
        assert failures == [], kind
        assert bodies == {good}, f"{kind}: served {bodies} while the save was broken"
        assert server.alive()
        assert f"{app / 'greeting.py'}:" in server.log(), f"{kind}: the log does not name the file and line"
        good = f"v{n}"
        write(app / "greeting.py", greeting(good))
        wait_for_body(load.port, good)
        wait_reloaded(n)


class Load:
    """Client threads sending requests in a loop, counting failures (errors or non-200)."""

    def __init__(self, port: int, threads: int = 4, path: str = "/") -> None:
        self.port = port
        self.threads = threads
        self.path = path
        self.ok = 0
        self.failures: list[str] = []
        self.bodies: set[str] = set()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers: list[threading.Thread] = []

    def _run(self) -> None:
        deadline = time.monotonic() + 600  # a bounded loop, whatever happens to the test
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                status, body = get(self.port, self.path, timeout=10)
            except (OSError, http.client.HTTPException) as exc:  # a cut response counts too
                with self._lock:
                    self.failures.append(f"{type(exc).__name__}: {exc}")
                time.sleep(0.05)
                continue
            with self._lock:
                if status == 200:
                    self.ok += 1
                    self.bodies.add(body)
                else:
                    self.failures.append(f"HTTP {status}: {body[:200]}")

    def __enter__(self) -> Load:
        for _ in range(self.threads):
            t = threading.Thread(target=self._run, daemon=True)
            t.start()
            self._workers.append(t)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._workers:
            t.join(15)

    def snapshot(self) -> tuple[int, list[str], set[str]]:
        with self._lock:
            return self.ok, list(self.failures), set(self.bodies)

    def reset_bodies(self) -> None:
        with self._lock:
            self.bodies.clear()


class Server:
    """A real server process group with its log file."""

    def __init__(self, argv: Sequence[str], port: int, cwd: Path, log: Path, env: dict[str, str]) -> None:
        self.argv = list(argv)
        self.port = port
        self.cwd = cwd
        self.log_path = log
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    ready_pattern: str | None = None
    """A log line that says every worker has loaded the code, so a test's first edit races no boot."""
    ready_count = 1

    def start(self, expect: str | None = None, ready_timeout: float = LIVENESS_TIMEOUT) -> Server:
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(self.argv, cwd=self.cwd, env=self.env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        if expect is not None:
            wait_for_body(self.port, expect, ready_timeout)
            if self.ready_pattern:
                self.wait_for_log(self.ready_pattern, self.ready_count, timeout=ready_timeout)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def count(self, pattern: str) -> int:
        return len(re.findall(pattern, self.log()))

    def wait_for_log(self, pattern: str, count: int = 1, timeout: float = LIVENESS_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.count(pattern) >= count:
                return
            time.sleep(0.05)
        raise AssertionError(f"log never showed {pattern!r} x{count}:\n{self.log()[-4000:]}")

    def alive(self) -> bool:
        try:
            return get(self.port, timeout=5)[0] == 200
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            pass
        # A re-executed gunicorn master (USR2) is in the same process group but not our child.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        if self.proc.poll() is None:
            self.proc.wait(5)


def server_env(**settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WSGI_RELOAD_")}
    env["PYTHONUNBUFFERED"] = "1"
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env.update({f"WSGI_RELOAD_{k.upper()}": v for k, v in settings.items()})
    return env


@contextmanager
def running(server: Server, expect: str | None) -> Iterator[Server]:
    try:
        yield server.start(expect)
    except BaseException:
        print(server.log()[-6000:])
        raise
    finally:
        server.stop()


def gunicorn(app_dir: Path, port: int, args: Sequence[str] = (), config: str | None = None,
             env: dict[str, str] | None = None, app: str = "app:app") -> Server:
    config = config or str(HERE.parent / "configs" / "reload_config.py")
    argv = [str(BIN / "gunicorn"), "-c", config, "-b", f"127.0.0.1:{port}", "--no-control-socket",
            "--graceful-timeout", "10", *args, app]
    server = Server(argv, port, app_dir, app_dir.parent / "server.log", env or server_env())
    server.ready_pattern = r"wsgi_reload: workers up|reloading is off"
    return server


def uwsgi(
    app_dir: Path, port: int, args: Sequence[str] = (), *, lazy: bool = False, enable: str = "import",
    processes: int = 2, env: dict[str, str] | None = None, target: Sequence[str] = ("--module", "app:application"),
    socket_option: str = "--http-socket", request_log: Path | None = None,
) -> Server:
    """A real uWSGI instance with the plugin enabled by ``--import`` or by an import in the app module.

    :param request_log: log every request into this file (else request logging is off).
    """
    if enable == "in-app":
        app_file = app_dir / "app.py"
        app_file.write_text("import wsgi_reload.uwsgi  # noqa: F401\n" + app_file.read_text())
    if "--threads" not in args:
        # Single-threaded uWSGI workers can drop a connection accepted in the instant the reload
        # signal lands (see the README); two threads per worker finish what they accepted.
        args = [*args, "--threads", "2"]
    argv = [str(BIN / "uwsgi"), "--master", "--processes", str(processes), socket_option, f"127.0.0.1:{port}",
            *target, "--chdir", str(app_dir), "--die-on-term",
            *(["--req-logger", f"file:{request_log}"] if request_log else ["--disable-logging"]),
            *(["--lazy-apps"] if lazy else []), *(["--import", "wsgi_reload.uwsgi"] if enable == "import" else []),
            *args]
    http = socket_option in ("--http-socket", "--http")  # --http: uWSGI's router process speaks HTTP
    server = Server(argv, port if http else -port, app_dir, app_dir.parent / "server.log",
                    env or server_env())
    if lazy:
        server.ready_pattern, server.ready_count = r"WSGI app 0 \(mountpoint=''\) ready", processes
    else:
        server.ready_pattern, server.ready_count = r"publishes its modules to the watcher", processes
    return server


def processes() -> dict[int, tuple[str, int, str]]:
    """Every process: pid -> (state, parent pid, command line), read from /proc."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="ascii", errors="replace") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{name}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        found[int(name)] = (fields[0], int(fields[1]), command)
    return found


def watcher_processes(cwd: Path) -> list[int]:
    """The live watcher processes started for a server whose directory is ``cwd``."""
    found = []
    for pid, (state, _, command) in processes().items():
        if state == "Z" or "wsgi_reload._server.watcher_process import main" not in command:
            continue
        try:
            if os.readlink(f"/proc/{pid}/cwd") == str(cwd):
                found.append(pid)
        except OSError:
            continue
    return found


def the_watcher(cwd: Path) -> int:
    """The one watcher process of the server whose directory is ``cwd``, once it is the only one
    three reads in a row: a process the watcher is spawning (posix_spawn) carries the watcher's
    command line until its exec, and so does the watcher's own first process, which forks it and
    exits."""
    deadline = time.monotonic() + LIVENESS_TIMEOUT
    seen: list[list[int]] = []
    while True:
        seen = [*seen[-2:], watcher_processes(cwd)]
        if len(seen) == 3 and len(seen[0]) == 1 and seen[0] == seen[1] == seen[2]:
            return seen[0][0]
        assert time.monotonic() < deadline, f"not one watcher process: {seen[-1]}"
        time.sleep(0.02)


def zombies_of(parents: set[int]) -> list[int]:
    return [pid for pid, (state, ppid, _) in processes().items() if state == "Z" and ppid in parents]


def kill_the_watcher_under_load(server: Server, cwd: Path, save: Callable[[], str], path: str = "/") -> None:
    """kill -9 of the server's watcher process under load: the next save is served soon after,
    with no failed request, exactly one watcher runs again, and no process is left a zombie."""
    the_watcher(cwd)
    with Load(server.port, threads=4, path=path) as load:
        time.sleep(0.5)
        watcher = the_watcher(cwd)
        os.kill(watcher, signal.SIGKILL)
        killed = time.monotonic()
        expected = save()
        wait_for_body(server.port, expected, path=path)
        served = time.monotonic() - killed
        time.sleep(3)  # every worker has had time to look for the watcher
        _, failures, _ = load.snapshot()
    assert failures == []
    # Typically 1 to 3 s (a worker looks for the watcher every second); a loaded CI machine running
    # Django's reload can take longer, and a test asserts liveness, not speed.
    assert served < 15, f"the save was served {served:.1f} s after the watcher was killed"
    the_watcher(cwd)  # exactly one
    # Killed before the save: the next watcher's reload of it is the only one (the old workers
    # still publishing while they retire are no workers left behind to reload again).
    assert "older code than generation" not in server.log()
    assert server.proc is not None
    family = {server.proc.pid} | {pid for pid, (_, ppid, _) in processes().items() if ppid == server.proc.pid}
    assert zombies_of(family) == []
    assert "had stopped; worker" in server.log()


def _runtime_bases() -> set[Path]:
    """Where runtime directories are made: the temporary directory, and $XDG_RUNTIME_DIR if set."""
    import tempfile

    bases = {Path(tempfile.gettempdir())}
    if os.environ.get("XDG_RUNTIME_DIR"):
        bases.add(Path(os.environ["XDG_RUNTIME_DIR"]))
    return bases


def runtime_dir_of(app: Path) -> Path:
    """The private runtime directory of the server running ``app``: the one whose generations
    name a file of it."""
    deadline = time.monotonic() + LIVENESS_TIMEOUT
    while time.monotonic() < deadline:
        for base in _runtime_bases():
            for candidate in base.glob("wsgi-reload-*"):
                try:
                    if any(str(app) in r.read_text() for r in (candidate / "generations").glob("*.json")):
                        return candidate
                except OSError:
                    continue
        time.sleep(0.1)
    raise AssertionError(f"no runtime directory names {app}")


def watcher_state(app: Path) -> str:
    """For a failure message: the replacement under way (``replacing.json``) and what each worker's
    record says, from the runtime directory of the server running ``app`` (looked for once)."""
    for candidate in (c for base in _runtime_bases() for c in base.glob("wsgi-reload-*")):
        try:
            if not any(str(app) in r.read_text() for r in (candidate / "generations").glob("*.json")):
                continue
            replacing = candidate / "replacing.json"
            state = [f"replacing: {replacing.read_text() if replacing.exists() else 'none'}"]
            for record in sorted(candidate.glob("[0-9]*.json")):
                body = json.loads(record.read_text())
                state.append(f"{record.stem}: app_loaded={body.get('app_loaded')} "
                             f"generation={body.get('generation')}")
            return "; ".join(state)
        except (OSError, ValueError):
            continue
    return "no runtime directory found"


def remove_the_runtime_directory_under_load(server: Server, app: Path, saves: Sequence[Callable[[], str]],
                                            path: str = "/") -> None:
    """rm -rf of the server's runtime directory under load (a temp-file cleaner): the next saves are
    served with no failed request, and the log says once what happened."""
    directory = runtime_dir_of(app)
    with Load(server.port, threads=4, path=path) as load:
        time.sleep(0.5)
        shutil.rmtree(directory)
        for save in saves:
            expected = save()
            wait_for_body(server.port, expected, path=path)
            time.sleep(1)
        _, failures, _ = load.snapshot()
    assert failures == []
    assert server.count(r"the runtime directory .* was removed") == 1


def every_worker_answers(port: int, path: str, expected: str, workers: int = 2, seconds: float = 3.0) -> int:
    """Under load for ``seconds``: no request fails, every body is ``expected@<pid>``, and
    ``workers`` different workers answered (bodies name the pid). Returns the requests served."""
    with Load(port, threads=4, path=path) as load:
        time.sleep(seconds)
        ok, failures, bodies = load.snapshot()
    assert failures == []
    assert {b.split("@")[0] for b in bodies} == {expected}
    assert len({b.split("@")[1] for b in bodies}) == workers, f"every worker must have served {path}"
    return ok


def wait_for_prefix(port: int, path: str, expected: str, timeout: float = LIVENESS_TIMEOUT) -> None:
    """Poll until ``path`` answers ``expected@<pid>``."""
    deadline = time.monotonic() + timeout
    while get(port, path)[1].split("@")[0] != expected:
        assert time.monotonic() < deadline, f"never served {expected!r} at {path} within {timeout} s"
        time.sleep(0.05)


WORKER_PIDS = r"Booting worker with pid: (\d+)|spawned uWSGI worker \d+ \(pid: (\d+)|new pid: (\d+)"
"""gunicorn's and uWSGI's log lines for a worker started (a check process is the master's child too)."""


def spares() -> set[int]:
    """The pids that hold a spare's claim in some runtime directory (``wsgi_reload._server.spare``).
    Another test's server can remove its directory while this one lists it."""
    pids = set()
    for candidate in (c for base in _runtime_bases() for c in base.glob("wsgi-reload-*")):
        try:
            names = os.listdir(candidate)
        except OSError:
            continue
        pids.update(int(pid) for name in names
                    if name.startswith("spare.") and (pid := name.split(".", 1)[1]).isdigit())
    return pids


def worker_pids(server: Server) -> set[int]:
    """The live workers that serve, as host pids: the master's children that its log says it
    started as workers, less a spare waiting for the next save (Django under gunicorn). Under
    ``unshare`` the master is the unshare process's child and logs the pids of its own
    namespace (the last ``NSpid``)."""
    assert server.proc is not None
    booted = {int(next(filter(None, m))) for m in re.findall(WORKER_PIDS, server.log())}
    table = processes()
    master = server.proc.pid
    if server.argv[0] == "unshare":
        master = next(pid for pid, (_, ppid, _) in table.items() if ppid == server.proc.pid)
    live = set()
    for pid, (state, ppid, _) in table.items():
        if ppid != master or state == "Z":
            continue
        try:
            with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
                nspid = next(line for line in f if line.startswith("NSpid:")).split()[-1]
        except (OSError, StopIteration):
            continue
        if int(nspid) in booted:
            live.add(pid)
    return live - spares()


def settled_workers(server: Server, count: int) -> set[int]:
    """Wait until the master runs exactly ``count`` workers, the same ones for a second (after
    a refused save gunicorn runs one more for a few seconds: the worker started beside the
    check exited unserved, and its replacement serves until the surplus is retired)."""
    deadline = time.monotonic() + LIVENESS_TIMEOUT
    while True:
        pids = worker_pids(server)
        if len(pids) == count:
            time.sleep(1)
            if worker_pids(server) == pids:
                return pids
        assert time.monotonic() < deadline, \
            f"the master runs {len(pids)} workers, not {count}; the watcher's state: {watcher_state(server.cwd)}"
        time.sleep(0.2)


def kill_every_worker(server: Server, expected: str, path: str = "/", workers: int = 2) -> None:
    """kill -9 of every worker (the OOM killer) while a broken save is on the disk: the
    replacements load the last verified code, ``expected``, and serve it with nothing failed."""
    killed = settled_workers(server, workers)
    for pid in killed:
        os.kill(pid, signal.SIGKILL)
    wait_for_body(server.port, expected, path=path)
    with Load(server.port, threads=4, path=path) as load:
        time.sleep(3)
        ok, failures, bodies = load.snapshot()
    assert failures == []
    assert bodies == {expected}
    assert ok > 20
    assert not killed & worker_pids(server)
    assert "Worker failed to boot" not in server.log()


PAIR_GAPS = [0.08, 0.6, 0.15, 0.45, 0.1, 0.3, 0.2, 0.55, 0.12, 0.35]
"""Seconds between a good save and the broken one after it, and on to the next pair."""


def good_then_broken_pairs(port: int, save_good: Callable[[str], str], save_broken: Callable[[], None],
                           path: str = "/") -> None:
    """Under load: ten good-then-broken pairs, then a final good save. Nothing fails, every body
    is a version that was saved good (and so could pass a check); once the final one is served
    no older one is; and it is served well before ``check_timeout`` (30 s) would have run out.
    ``save_good(name)`` saves version ``name`` and returns the body it serves."""
    with Load(port, threads=4, path=path) as load:
        goods = {get(port, path)[1]}
        for n, gap in enumerate(PAIR_GAPS, start=2):
            goods.add(save_good(f"v{n}"))
            time.sleep(gap)
            save_broken()
            time.sleep(gap)
        saved = time.monotonic()
        final = save_good("final")
        wait_for_body(port, final, timeout=20, path=path)
        served_after = time.monotonic() - saved
        _, failures, bodies = load.snapshot()
        assert failures == []
        assert bodies <= goods | {final}, f"served versions that were never saved good: {bodies - goods - {final}}"
        # The swap goes on until every new worker has loaded (two versions serve meanwhile, by
        # design); once every answer is the final one, no older one may come back.
        deadline, in_a_row = time.monotonic() + 15, 0
        while in_a_row < 20 and time.monotonic() < deadline:
            in_a_row = in_a_row + 1 if get(port, path)[1] == final else 0
        time.sleep(0.5)  # the old workers finish their last requests
        load.reset_bodies()
        answers = [get(port, path)[1] for _ in range(40)]
        time.sleep(1)
        _, failures, bodies = load.snapshot()
    assert failures == []
    assert set(answers) == {final}
    assert bodies == {final}
    assert served_after < 15, f"the final save was served {served_after:.1f} s after it was made"


def refused_under_load(server: Server, save: Callable[[], object], refused: str, serving: str,
                       fix: Callable[[], str], seconds: float = 1.0, path: str = "/") -> None:
    """Under load: ``save()``, and the log shows ``refused``; for ``seconds`` after it only
    ``serving`` is served and nothing fails; then ``fix()`` is saved and the body it returns is
    served."""
    with Load(server.port, threads=4, path=path) as load:
        save()
        server.wait_for_log(refused)
        time.sleep(seconds)
        _, failures, bodies = load.snapshot()
    assert failures == []
    assert bodies == {serving}
    wait_for_body(server.port, fix(), path=path)
