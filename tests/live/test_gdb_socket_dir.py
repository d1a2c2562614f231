"""The private directory of gdbstub sockets: sockets of QEMUs gone are removed, young ones kept
(another attach, e.g. a fleet watch's next guest, may be starting its stub right now)."""

from __future__ import annotations

import os
import socket
import time

from vmwatch.live.qemu_connect import STALE_SOCKET_AGE, _private_dir


def test_young_unbound_socket_kept_old_one_removed():
    base = _private_dir()
    young = os.path.join(base, f"gdb-test{os.getpid()}y.sock")
    old = os.path.join(base, f"gdb-test{os.getpid()}o.sock")
    for path in (young, old):
        s = socket.socket(socket.AF_UNIX)
        s.bind(path)
        s.close()  # the file stays, nobody listens: as QEMU leaves it when it dies
    past = time.time() - STALE_SOCKET_AGE - 5
    os.utime(old, (past, past), follow_symlinks=False)
    try:
        _private_dir()
        assert os.path.exists(young) and not os.path.exists(old)
    finally:
        for path in (young, old):
            if os.path.exists(path):
                os.unlink(path)
