"""What another local user can do to a watcher: nothing. Run as root, acting as nobody."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from second_user import NOBODY, needs_root, run_as_nobody, shared_tmp

from wsgi_reload._server import runtime
from wsgi_reload._server.signals import Target, TargetError, from_pidfile

pytestmark = needs_root


def test_the_runtime_directory_is_closed_to_other_users(monkeypatch: pytest.MonkeyPatch) -> None:
    with shared_tmp() as tmp:
        monkeypatch.setenv("TMPDIR", tmp)
        monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
        monkeypatch.setattr("tempfile.tempdir", None)
        path = runtime.create()
        runtime.write_atomic(path, "1.json", b"{}")
        assert stat.S_IMODE(os.lstat(path).st_mode) == 0o700
        done = run_as_nobody(f"""
            import os
            for attempt in (lambda: os.listdir({path!r}), lambda: open({path!r} + "/x", "w"),
                            lambda: open({path!r} + "/1.json")):
                try:
                    attempt()
                except PermissionError:
                    print("refused")
        """)
        assert done.stdout.split() == ["refused"] * 3  # type: ignore[union-attr]
        runtime.remove(path)
        assert not os.path.exists(path)


def test_another_user_cannot_reach_the_watchers_channel(monkeypatch: pytest.MonkeyPatch) -> None:
    """The watcher's socket, where the workers' keepers connect, is in the private runtime
    directory: another user can neither connect to it (and so neither read the lines it hands
    out nor hold a connection) nor put a socket of theirs in its place."""
    from wsgi_reload._server.launch import CHANNEL_NAME
    from wsgi_reload._server.watcher_process import _KeeperChannel

    with shared_tmp() as tmp:
        monkeypatch.setenv("TMPDIR", tmp)
        monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
        monkeypatch.setattr("tempfile.tempdir", None)
        path = runtime.create()
        channel = _KeeperChannel(path)
        channel.listen()
        done = run_as_nobody(f"""
            def connect():
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.connect({os.path.join(path, CHANNEL_NAME)!r})
            def plant():
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.bind({os.path.join(path, "x.sock")!r})
            for attempt in (connect, plant):
                try:
                    attempt()
                except PermissionError:
                    print("refused")
        """, imports=["socket"])
        assert done.stdout.split() == ["refused"] * 2  # type: ignore[union-attr]
        channel.tend()
        assert channel.keepers == []
        runtime.remove(path)


def test_a_planted_name_is_never_used_or_written_through(monkeypatch: pytest.MonkeyPatch) -> None:
    """Even a user who guessed the derived name (nobody can) gets no use of it: a directory of
    theirs, or a symlink to a file of root's, is refused and nothing is written."""
    with shared_tmp() as tmp:
        monkeypatch.setenv("TMPDIR", tmp)
        monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
        monkeypatch.setattr("tempfile.tempdir", None)
        name = runtime.shared_by_siblings("test-scope")
        os.rmdir(name)
        victim = Path(tmp) / "roots-file"
        victim.write_text("root's data\n")
        victim.chmod(0o644)
        plants = (f"os.mkdir({name!r}, 0o777); os.chmod({name!r}, 0o777)", f"os.symlink({str(victim)!r}, {name!r})")
        for plant in plants:
            run_as_nobody(f"import os\n{plant}\n")
            with pytest.raises(runtime.RuntimeDirError, match="not a private directory"):
                runtime.shared_by_siblings("test-scope")
            assert victim.read_text() == "root's data\n"
            assert os.lstat(name).st_uid == NOBODY
            run_as_nobody(f"import os\nos.unlink({name!r}) if os.path.islink({name!r}) else os.rmdir({name!r})\n")


def test_a_pidfile_of_another_user_is_refused(tmp_path: Path) -> None:
    pidfile = tmp_path / "app.pid"
    pidfile.write_text(f"{os.getpid()}\n")
    os.chown(pidfile, NOBODY, NOBODY)
    with pytest.raises(TargetError, match="belongs to another user"):
        from_pidfile(str(pidfile))


def test_a_pidfile_others_can_write_is_refused(tmp_path: Path) -> None:
    pidfile = tmp_path / "app.pid"
    pidfile.write_text(f"{os.getpid()}\n")
    pidfile.chmod(0o666)
    with pytest.raises(TargetError, match="writable by other users"):
        from_pidfile(str(pidfile))


def test_the_cli_refuses_a_pidfile_another_user_wrote(tmp_path: Path) -> None:
    """The attack: nobody writes the pid of a root process into a pidfile of theirs."""
    victim = subprocess.Popen(["sleep", "60"])
    try:
        with shared_tmp() as tmp:
            pidfile = os.path.join(tmp, "app.pid")
            run_as_nobody(f"open({pidfile!r}, 'w').write('{victim.pid}\\n')")
            (tmp_path / "a.py").write_text("A = 1\n")
            done = subprocess.run([str(Path(sys.executable).parent / "wsgi-reload"), "watch", "--pidfile", pidfile,
                                   str(tmp_path / "a.py")], capture_output=True, text=True, timeout=30)
        assert done.returncode == 2
        assert "belongs to another user (uid 65534); refusing to trust it" in done.stderr
        assert victim.poll() is None
    finally:
        victim.kill()
        victim.wait()


def _spawn_with_pid(pid: int, argv: list[str], attempts: int = 50) -> subprocess.Popen[bytes] | None:
    """Start a process that gets exactly ``pid`` (root may set the next pid through ns_last_pid)."""
    for _ in range(attempts):
        try:
            with open("/proc/sys/kernel/ns_last_pid", "w") as f:
                f.write(str(pid - 1))
        except OSError:
            return None
        proc = subprocess.Popen(argv)
        if proc.pid == pid:
            return proc
        proc.kill()
        proc.wait()
    return None


def test_a_reused_pid_is_never_signalled(tmp_path: Path) -> None:
    first = subprocess.Popen(["sleep", "60"])
    target = Target(first.pid)
    first.kill()
    first.wait()
    second = _spawn_with_pid(first.pid, ["sleep", "60"])
    if second is None:
        pytest.skip("could not have the kernel hand out the same pid again (ns_last_pid)")
    try:
        with pytest.raises(TargetError, match="has exited"):
            target.send(signal.SIGTERM)
        time.sleep(0.2)
        assert second.poll() is None, "the process that reused the pid was signalled"
    finally:
        second.kill()
        second.wait()
        target.close()


def test_a_pidfile_naming_a_reused_pid_is_refused(tmp_path: Path) -> None:
    first = subprocess.Popen(["sleep", "60"])
    pidfile = tmp_path / "app.pid"
    pidfile.write_text(f"{first.pid}\n")
    first.kill()
    first.wait()
    time.sleep(2)  # the reused pid starts measurably after the pidfile was written
    second = _spawn_with_pid(first.pid, ["sleep", "60"])
    if second is None:
        pytest.skip("could not have the kernel hand out the same pid again (ns_last_pid)")
    try:
        with pytest.raises(TargetError, match="started after the pidfile was written"):
            from_pidfile(str(pidfile))
        assert second.poll() is None
    finally:
        second.kill()
        second.wait()


PLANT = """
import os, sys
tmp, victim, first = sys.argv[1], sys.argv[2], int(sys.argv[3])
held = []
for pid in range(first, first + 400):
    for name in (f"wsgi-reload-django-gunicorn-{pid}.lock", f"wsgi-reload-uwsgi-{pid}.lock"):
        fd = os.open(os.path.join(tmp, name), os.O_RDWR | os.O_CREAT, 0o644)
        os.lockf(fd, os.F_LOCK, 0)
        held.append(fd)
    for name in (f"wsgi-reload-uwsgi-{pid}.json", f"{pid}.json", f"wsgi-reload-{pid}.json"):
        os.symlink(victim, os.path.join(tmp, name))
print("planted", flush=True)
sys.stdin.read()
"""


def _plant(tmp: str, victim: Path) -> subprocess.Popen[str]:
    """nobody fills the shared temp directory with the names the old code used, for the next 400
    pids: lock files it holds locked, and symlinks to a file of root's."""
    with open("/proc/sys/kernel/ns_last_pid") as f:
        first = int(f.read()) + 1
    args = [tmp, str(victim), str(first)]
    planter = run_as_nobody(f"import sys\nsys.argv[1:] = {args!r}\n{PLANT}", background=True)
    assert isinstance(planter, subprocess.Popen)
    assert planter.stdout is not None and planter.stdout.readline().strip() == "planted"
    return planter


def _leftovers(tmp: str) -> list[str]:
    """What root left in the shared temp directory."""
    left = []
    for name in os.listdir(tmp):
        try:
            owner = os.lstat(os.path.join(tmp, name)).st_uid
        except FileNotFoundError:
            continue  # removed while we looked: a clean stop finishing its work
        if owner != NOBODY:
            left.append(name)
    return sorted(left)


@pytest.mark.slow
@pytest.mark.parametrize("server_kind", ["gunicorn", "uwsgi", "django-gunicorn"])
def test_plants_and_locks_in_the_temp_directory_change_nothing(tmp_path: Path, server_kind: str) -> None:
    from servers import free_port, greeting, gunicorn, make_app, running, server_env, uwsgi, wait_for_body, write

    victim = tmp_path / "victim"
    victim.write_text("root's data\n")
    with shared_tmp() as tmp:
        planter = _plant(tmp, victim)
        try:
            port = free_port()
            env = server_env()
            env["TMPDIR"] = tmp
            env.pop("XDG_RUNTIME_DIR", None)
            if server_kind in ("gunicorn", "uwsgi"):
                app = make_app(tmp_path)
                server = uwsgi(app, port, env=env) if server_kind == "uwsgi" else gunicorn(app, port, env=env)
                first, edit, second = "v1", lambda: write(app / "greeting.py", greeting("v2")), "v2"
            else:
                from test_django import django_gunicorn, greeting_view, make_site, page

                site = make_site(tmp_path)
                server = django_gunicorn(site, port, ["-w", "2"], env)
                first, edit, second = page("hello"), lambda: greeting_view(site, "planted"), page("planted")
            with running(server, first):
                edit()
                wait_for_body(port, second)
                assert victim.read_text() == "root's data\n"
            deadline = time.monotonic() + 10  # the watcher process removes the runtime directory as it exits
            while _leftovers(tmp) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert _leftovers(tmp) == []
        finally:
            planter.kill()
            planter.wait()
    assert victim.read_text() == "root's data\n"


@pytest.mark.slow
def test_the_watcher_process_gets_no_settings_on_its_command_line(tmp_path: Path) -> None:
    """Every user can read a command line (ps); the settings go to the watcher on standard input."""
    from servers import free_port, make_app, processes, running, server_env, uwsgi, watcher_processes

    app = make_app(tmp_path)
    marker = tmp_path / "private-extra-file.txt"
    marker.write_text("x")
    port = free_port()
    env = server_env(extra_files=str(marker), check_timeout="7")
    with running(uwsgi(app, port, env=env), "v1") as server:
        server.wait_for_log(r"wsgi_reload: watching .+ by ")
        lines = [command for pid, (_, _, command) in processes().items() if pid in watcher_processes(app)]
    assert len(lines) == 1, lines  # one watcher for the server
    assert str(marker) not in lines[0] and "check_timeout" not in lines[0] and "settings" not in lines[0]


def test_a_fifo_planted_as_the_pidfile_never_blocks_the_watcher(tmp_path: Path) -> None:
    """The server removes its pidfile from a sticky shared directory and nobody puts a FIFO under
    that name: the next save is refused in one line instead of blocking the watcher in open(),
    and once the real pidfile is back the pending reload is sent."""
    from test_cli import CLI, SIGNAL_RECORDER, hups, wait_for_hups, wait_for_log

    record = tmp_path / "record.txt"
    server = subprocess.Popen([sys.executable, "-c", SIGNAL_RECORDER, str(record)])
    (tmp_path / "a.py").write_text("A = 1\n")
    try:
        deadline = time.monotonic() + 10
        while not (record.exists() and "ready" in record.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        with shared_tmp() as tmp:
            pidfile = os.path.join(tmp, "app.pid")
            Path(pidfile).write_text(f"{server.pid}\n")
            watcher = subprocess.Popen([*CLI, "watch", "--pidfile", pidfile, "--interval", "0.1", "--backend", "poll",
                                        str(tmp_path / "a.py")], stderr=subprocess.PIPE, text=True)
            log: list[str] = []
            try:
                wait_for_log(watcher, log, "wsgi_reload: watching")
                os.unlink(pidfile)
                run_as_nobody(f"import os\nos.mkfifo({pidfile!r}, 0o666)\n")
                (tmp_path / "a.py").write_text("A = 2\n")
                wait_for_log(watcher, log, "is not a regular file")
                assert hups(record) == 0
                os.unlink(pidfile)
                Path(pidfile).write_text(f"{server.pid}\n")
                wait_for_hups(record, 1)
                (tmp_path / "a.py").write_text("A = 3\n")
                wait_for_hups(record, 2)
            finally:
                watcher.terminate()
                watcher.wait(10)
    finally:
        server.kill()
        server.wait()
