"""The package as PyPI would get it: built, checked, installed into a fresh venv, reloading a real server."""

from __future__ import annotations

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest
from servers import Server, free_port, greeting, make_app, running, server_env, wait_for_body, write
from test_readme import fresh_copy

pytestmark = pytest.mark.slow


def test_the_built_wheel_installs_and_reloads(tmp_path: Path) -> None:
    source = fresh_copy(tmp_path / "source")
    dist = tmp_path / "dist"
    built = subprocess.run([sys.executable, "-m", "build", "--outdir", str(dist), str(source)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    [wheel] = dist.glob("*.whl")
    [sdist] = dist.glob("*.tar.gz")
    checked = subprocess.run([sys.executable, "-m", "twine", "check", "--strict", str(wheel), str(sdist)],
                             capture_output=True, text=True, timeout=120)
    assert checked.returncode == 0, checked.stdout + checked.stderr

    names = zipfile.ZipFile(wheel).namelist()
    assert "wsgi_reload/py.typed" in names and "wsgi_reload/_server/genimport.py" in names
    assert not [n for n in names if n.startswith(("tests/", "docs/", "benchmarks/"))]
    members = tarfile.open(sdist).getnames()
    root = members[0].split("/")[0]
    for needed in ("tests/test_generations.py", "docs/design.md", "mkdocs.yml", "LICENSE", "example_project/manage.py"):
        assert f"{root}/{needed}" in members, needed
    assert not [m for m in members if "__pycache__" in m or m.endswith("db.sqlite3")]

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    installed = subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet", f"{wheel}[gunicorn]"],
                               capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stdout[-3000:] + installed.stderr[-3000:]
    version = subprocess.run([str(venv / "bin" / "wsgi-reload"), "--version"], capture_output=True, text=True)
    assert version.stdout == "wsgi-reload 0.1.0\n"

    app = make_app(tmp_path)
    port = free_port()
    argv = [str(venv / "bin" / "gunicorn"), "-c", "python:wsgi_reload.gunicorn", "-b", f"127.0.0.1:{port}",
            "-w", "2", "--no-control-socket", "app:app"]
    env = server_env()
    env["PATH"] = f"{venv / 'bin'}:{env['PATH']}"
    with running(Server(argv, port, app, tmp_path / "server.log", env), "v1") as server:
        write(app / "greeting.py", greeting("v2"))
        wait_for_body(port, "v2")
        server.wait_for_log(r"reload done")
        assert str(venv) in server.log() or "wsgi_reload" in server.log()
