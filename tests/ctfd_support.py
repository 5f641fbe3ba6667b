"""CTFd 3.8.7 for the plugin's end-to-end tests: found, unpacked, its own venv, served.

``CTF_CTFD_SOURCE`` names CTFd's source, an archive or a folder (default: the vendored
``../shared/vendor/CTFd-3.8.7.tar.gz`` beside the repository). :func:`prepare` unpacks it
and builds its own virtual environment (``pip install -r requirements.txt`` from PyPI;
its pinned Flask and SQLAlchemy are not ours) once, under ``CTF_CTFD_CACHE`` (default
``.data/ctfd``), keyed by the source's digest: later runs reuse it in well under a second.
The first build is bounded by ``CTF_CTFD_SETUP_TIMEOUT`` seconds (default 600).

Also runnable by hand: ``.venv/bin/python tests/ctfd_support.py`` prepares the cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLUGIN = ROOT / "integrations" / "ctfd" / "ctf_instancer"
DEFAULT_SOURCE = ROOT.parent / "shared" / "vendor" / "CTFd-3.8.7.tar.gz"
SETUP_TIMEOUT = 600.0


class CtfdUnavailable(Exception):
    """Raised when CTFd's source cannot be found (the tests skip, or fail under CI)."""


@dataclass(frozen=True)
class CtfdInstall:
    """An unpacked CTFd with its own Python, ready to serve."""

    src: Path      # the folder holding serve.py and CTFd/
    python: Path   # its venv's interpreter

    @property
    def gunicorn(self) -> Path:
        return self.python.parent / "gunicorn"


def source() -> Path:
    """Return CTFd's source (archive or folder) named by ``CTF_CTFD_SOURCE`` or the default.

    Raises:
        CtfdUnavailable: saying where it looked.
    """
    named = os.environ.get("CTF_CTFD_SOURCE", "").strip()
    path = Path(named) if named else DEFAULT_SOURCE
    if not path.exists():
        how = f"CTF_CTFD_SOURCE={named}" if named else f"the default {DEFAULT_SOURCE}"
        raise CtfdUnavailable(f"CTFd's source is not found ({how} does not exist); set "
                              "CTF_CTFD_SOURCE to a CTFd 3.8.7 archive (.tar.gz) or folder")
    return path


def _digest(path: Path) -> str:
    h = hashlib.sha256()
    if path.is_dir():
        for name in ("requirements.txt", "CTFd/__init__.py", "CTFd/config.py"):
            f = path / name
            h.update(f.read_bytes() if f.exists() else name.encode())
        h.update(str(path.resolve()).encode())
    else:
        with path.open("rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def _unpack(src: Path, into: Path) -> Path:
    """Unpack an archive (or copy a folder) into ``into``; return the folder with serve.py."""
    if src.is_dir():
        shutil.copytree(src, into / "ctfd", ignore=shutil.ignore_patterns(
            ".git", "node_modules", "__pycache__", "*.db", ".data"))
    else:
        with tarfile.open(src) as tar:
            tar.extractall(into, filter="data")
    found = sorted(p.parent for p in into.glob("**/serve.py") if (p.parent / "CTFd").is_dir())
    if not found:
        raise CtfdUnavailable(f"{src} holds no CTFd source (no serve.py beside CTFd/)")
    return found[0]


def _run(cmd: list[str], log: Path, deadline: float, cwd: Path | None = None) -> None:
    left = deadline - time.monotonic()
    if left <= 0:
        raise RuntimeError(f"CTFd set-up ran out of time before {cmd[:3]}")
    with log.open("ab") as out:
        try:
            subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=cwd, check=True,
                           timeout=left)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"CTFd set-up took longer than its limit at {cmd[:3]}; "
                               f"see {log}") from None
        except subprocess.CalledProcessError:
            tail = log.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"CTFd set-up failed at {cmd[:4]}; see {log}:\n{tail}") \
                from None


def prepare(timeout: float | None = None) -> CtfdInstall:
    """Return a CTFd install with its venv, building it once (idempotent, cached, locked).

    Raises:
        CtfdUnavailable: the source is missing.
        RuntimeError: unpacking or installing failed or ran out of time (message says why).
    """
    src = source()
    cache = Path(os.environ.get("CTF_CTFD_CACHE") or ROOT / ".data" / "ctfd")
    limit = timeout or float(os.environ.get("CTF_CTFD_SETUP_TIMEOUT") or SETUP_TIMEOUT)
    home = cache / _digest(src)
    ready = home / "ready"
    cache.mkdir(parents=True, exist_ok=True)
    with (cache / f"{home.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two runs at once: one builds, the other waits
        if ready.exists():
            install = CtfdInstall(Path(ready.read_text().strip()), home / "venv/bin/python")
            if install.python.exists() and (install.src / "CTFd").is_dir():
                return install
        deadline = time.monotonic() + limit
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir(parents=True)
        log = home / "setup.log"
        tree = _unpack(src, home / "src")
        _run([sys.executable, "-m", "venv", str(home / "venv")], log, deadline)
        py = home / "venv" / "bin" / "python"
        _run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check",
              "-r", str(tree / "requirements.txt")], log, deadline, cwd=tree)
        _run([str(py), "-c", "import flask, sqlalchemy, gunicorn, gevent"], log, deadline)
        ready.write_text(str(tree))
        return CtfdInstall(tree, py)


def install_plugin(install: CtfdInstall) -> Path:
    """Link our plugin folder into CTFd/plugins/ (the README's install); return the link."""
    link = install.src / "CTFd" / "plugins" / PLUGIN.name
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.is_dir():
        shutil.rmtree(link)
    link.symlink_to(PLUGIN, target_is_directory=True)
    return link


class CtfdServer:
    """CTFd served by gunicorn (gevent worker, as CTFd's own image runs it) on SQLite."""

    def __init__(self, install: CtfdInstall, workdir: Path, port: int,
                 env: dict[str, str]) -> None:
        self.install = install
        self.workdir = workdir
        self.port = port
        self.env = env
        self.log = workdir / "ctfd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start gunicorn in its own process group (its pid is kept to stop it)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(self.workdir),
            "SECRET_KEY": hashlib.sha256(os.urandom(32)).hexdigest(),
            "DATABASE_URL": f"sqlite:///{self.workdir / 'ctfd.db'}",
            "UPLOAD_FOLDER": str(self.workdir / "uploads"),
            "LOG_FOLDER": str(self.workdir / "logs"),
            "UPDATE_CHECK": "false",
            **self.env,
        }
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [str(self.install.gunicorn), "CTFd:create_app()", "--bind",
                 f"127.0.0.1:{self.port}", "--workers", "1", "--worker-class", "gevent",
                 "--timeout", "120", "--graceful-timeout", "5"],
                cwd=self.install.src, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        (self.workdir / "ctfd.pid").write_text(str(self.proc.pid))

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """Stop gunicorn and its worker (its own process group), by its pid."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(15)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(15)


if __name__ == "__main__":
    began = time.monotonic()
    try:
        done = prepare()
    except CtfdUnavailable as exc:
        print(f"CTFd not prepared: {exc}; the CTFd plugin tests will skip")
        sys.exit(0)
    print(f"CTFd ready in {time.monotonic() - began:.1f} s: {done.src} ({done.python})")
