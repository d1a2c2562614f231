"""A throwaway PostgreSQL cluster for tests and benchmarks: Debian's server on a unix socket in a temp dir.

``initdb`` refuses to run as root, so as root the cluster belongs to ``nobody`` (``setpriv``);
the temp dir holds the data directory, the socket and the log, and is removed by :meth:`stop`.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import attrs


class ServerMissing(RuntimeError):
    """No PostgreSQL server binaries: the reason a test skips."""


def server_bin() -> Path:
    """The newest /usr/lib/postgresql/*/bin holding initdb and pg_ctl.

    Raises:
        ServerMissing: the Debian package postgresql is not installed.
    """
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if not found:
        raise ServerMissing("no PostgreSQL server: install the Debian package postgresql (make system does)")
    return Path(found[-1]).parent


@attrs.define
class Cluster:
    root: Path
    bin: Path
    user: str = "vmwatch"

    @property
    def socket_dir(self) -> str:
        return str(self.root)

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.user}@/{dbname}?host={self.socket_dir}"

    def _run(self, *argv: str) -> subprocess.CompletedProcess:
        prefix = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"] if os.geteuid() == 0 else []
        return subprocess.run([*prefix, *argv], capture_output=True, text=True, timeout=120, check=True)

    def start(self, *, fsync: bool = False) -> None:
        opts = f"-k {self.socket_dir} -c listen_addresses='' -c fsync={'on' if fsync else 'off'} -c max_connections=50"
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.root / "data"), "-l", str(self.root / "log"),
                  "-w", "-t", "60", "-o", opts, "start")

    def stop(self, *, mode: str = "fast") -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.root / "data"), "-m", mode, "-w", "-t", "60", "stop")

    def create_database(self, name: str) -> str:
        """A new empty database; returns its URL."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def remove(self) -> None:
        try:
            self.stop(mode="immediate")
        except subprocess.CalledProcessError:
            pass  # already stopped
        shutil.rmtree(self.root, ignore_errors=True)


def start_cluster(*, fsync: bool = False) -> Cluster:
    """initdb and start a cluster (about 1 s); :meth:`Cluster.remove` stops and deletes it.

    Raises:
        ServerMissing: no server installed.
        subprocess.CalledProcessError: initdb or pg_ctl failed (its stderr tells why).
    """
    bin_dir = server_bin()
    root = Path(tempfile.mkdtemp(prefix="vmwatch-pg-"))
    if os.geteuid() == 0:
        shutil.chown(root, "nobody", "nogroup")
    cluster = Cluster(root=root, bin=bin_dir)
    try:
        cluster._run(str(bin_dir / "initdb"), "-D", str(root / "data"), "-A", "trust", "-U", cluster.user,
                     "-E", "UTF8", "--locale=C.UTF-8", "--no-sync")
        cluster.start(fsync=fsync)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return cluster
