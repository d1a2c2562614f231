"""Guest RAM of a live QEMU: the shared memory-backend file (zero copy) or the gdbstub (slow).

The guest-physical -> file-offset map comes from QEMU's own flat view of the system address
space (HMP ``info mtree -f``; QMP has no structured equivalent). Offsets are never assumed equal
to addresses: on a pc machine with more than ~3 GiB, RAM above the PCI hole sits at GPA
0x100000000+ but at file offset 0xc0000000+, and the VGA window 0xa0000-0xbfffff is in the file
but not guest-visible RAM.
"""

from __future__ import annotations

import mmap
import os
import select
import socket
from typing import Callable, Iterable

from vmwatch.errors import LinkClosedError, PhysicalReadError, RemoteProtocolError, UnsupportedOperation
from vmwatch.images.base import Image, PhysicalReads, Run
from vmwatch.live.gdbrsp import _proto as p

RAM_TYPES = ("ram", "rom", "nv-ram", "nv-rom", "romd")


def parse_flatview(text: str, address_space: str = "memory") -> list[tuple[int, int, str, str, int]]:
    """Rows ``(start, end_inclusive, type, region name, offset in region)`` of one flat view.

    ``text`` is the output of ``info mtree -f``; the view whose header lists
    ``AS "<address_space>"`` is chosen. Lines that do not look like ranges are skipped.
    """
    rows: list[tuple[int, int, str, str, int]] = []
    in_view = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("FlatView #"):
            if in_view and rows:
                break
            in_view = False
            continue
        if stripped.startswith('AS "'):
            if stripped.split('"')[1] == address_space:
                in_view = True
            continue
        if not in_view or "): " not in stripped or "-" not in stripped[:40]:
            continue
        span, _, rest = stripped.partition(" (")
        attrs_text, _, target = rest.partition("): ")
        lo, _, hi = span.partition("-")
        try:
            start, end = int(lo, 16), int(hi, 16)
        except ValueError:
            continue
        kind = attrs_text.rpartition(", ")[2]
        name, offset = target, 0
        if " @" in target:
            name, _, tail = target.rpartition(" @")
            try:
                offset = int(tail.split()[0], 16)
            except (ValueError, IndexError):
                continue
        rows.append((start, end, kind, name.strip(), offset))
    return rows


def ram_runs(text: str, region_names: Iterable[str] | None) -> tuple[Run, ...]:
    """Backed runs of the named RAM regions (all RAM/ROM when ``None``), adjacent ones merged."""
    names = set(region_names) if region_names is not None else None
    runs: list[Run] = []
    for start, end, kind, name, offset in parse_flatview(text):
        if kind not in RAM_TYPES or (names is not None and name not in names):
            continue
        size = end - start + 1
        last = runs[-1] if runs else None
        if last is not None and last.end == start and last.file_offset is not None and \
                last.file_offset + last.size == offset:
            runs[-1] = Run(start=last.start, size=last.size + size, file_offset=last.file_offset)
        else:
            runs.append(Run(start=start, size=size, file_offset=offset))
    return tuple(runs)


def overlay(out: bytearray | memoryview, addr: int, pieces: Iterable[tuple[int, bytes]]) -> None:
    """Copy each ``(start, bytes)`` piece over ``out`` (which holds what is at ``addr``) where they meet."""
    end = addr + len(out)
    for start, original in pieces:
        lo, hi = max(start, addr), min(start + len(original), end)
        if lo < hi:
            out[lo - addr : hi - addr] = original[lo - start : hi - start]


class MaskedReads:
    """Reads that show the original bytes where the backend patched guest code (inline hooks):
    vmwatch's own checks (kernel text hashes, disassembly) see the guest as it was.

    Masks cost nothing until set; then a read pays one page-set lookup (reads of several pages
    also a scan of the masks, which are few).
    """

    def set_masks(self, masks: dict[int, bytes]) -> None:
        """Show ``masks`` (guest-physical address -> original bytes) over the live bytes."""
        plain = self.__dict__.get("_unmasked")
        if plain is None:
            plain = self._unmasked = (self.read, self.read_into)
        plain_read, plain_into = plain
        if not masks:
            self.read, self.read_into = plain_read, plain_into
            return
        items = tuple(sorted(masks.items()))
        pages = frozenset(page for start, original in items
                          for page in range(start >> 12, ((start + len(original) - 1) >> 12) + 1))

        def touches(paddr: int, size: int) -> bool:
            return size > 4096 or (paddr >> 12) in pages or ((paddr + size - 1) >> 12) in pages

        def read(paddr: int, size: int, *, pad: bool = False) -> bytes:
            data = plain_read(paddr, size, pad=pad)
            if size > 0 and touches(paddr, size):
                buf = bytearray(data)
                overlay(memoryview(buf), paddr, items)
                return bytes(buf)
            return data

        def read_into(paddr: int, buf: bytearray | memoryview, *, pad: bool = False) -> None:
            plain_into(paddr, buf, pad=pad)
            out = memoryview(buf).cast("B")
            if len(out) and touches(paddr, len(out)):
                overlay(out, paddr, items)

        self.read, self.read_into = read, read_into


class SharedRam(MaskedReads, Image):
    """The guest RAM file mapped into our address space: reads see the guest as it runs.

    Writable only when asked (the map is then ``MAP_SHARED`` read-write and writes land in the
    running guest at once).
    """

    format = "qemu-ram"
    volatile = True

    def __init__(self, path: str, runs: tuple[Run, ...], *, writable: bool = False) -> None:
        flags = os.O_RDWR if writable else os.O_RDONLY
        fd = os.open(path, flags)
        try:
            size = os.fstat(fd).st_size
            data = mmap.mmap(fd, size, access=mmap.ACCESS_WRITE if writable else mmap.ACCESS_READ)
        finally:
            os.close(fd)
        super().__init__(path, data=data, runs=runs, metadata={"source": "qemu memory-backend-file"})
        self.writable = writable

    def write(self, paddr: int, data: bytes) -> None:
        if not self.writable:
            raise UnsupportedOperation(f"guest RAM {self.path} was not attached for writing")
        view = memoryview(data).cast("B")
        pos = 0
        while pos < len(view):
            i = self._run_index(paddr + pos)
            if i is None:
                raise PhysicalReadError(paddr + pos, len(view) - pos, f"cannot write unbacked physical address {paddr + pos:#x}")
            run = self.runs[i]
            step = min(len(view) - pos, run.end - paddr - pos)
            off = run.file_offset + paddr + pos - run.start
            self._view[off : off + step] = view[pos : pos + step]
            pos += step

    def _run_index(self, paddr: int) -> int | None:
        for i, run in enumerate(self.runs):
            if run.start <= paddr < run.end and run.file_offset is not None:
                return i
        return None


class GdbMemory(MaskedReads, PhysicalReads):
    """Guest-physical memory read through the gdbstub (``m`` in physical mode): the slow fallback.

    Synchronous like every physical memory (the memory layer is synchronous on purpose), so it
    speaks on the gdb socket with blocking I/O, sharing the connection's sans-IO core with the
    trio wrapper; ``link_idle()`` tells it when that is safe (the backend's lock is free and no
    task waits for a stop). A running guest is stopped for the read and resumed after it.
    """

    volatile = True
    slow_bulk_reads = True
    """Reading all of RAM this way stops the guest for minutes: whole-memory scans refuse it."""

    def __init__(self, core: p.Client, sock: socket.socket, runs: tuple[Run, ...], *,
                 link_idle: Callable[[], bool], on_stop: Callable[[p.StopReply | p.Exited], bool],
                 set_phys_mode: Callable[[bool], None], writable: bool = False) -> None:
        self._core = core
        self._sock = sock
        self.runs = runs
        self.writable = writable
        self._link_idle = link_idle
        self._on_stop = on_stop
        self._set_phys_mode = set_phys_mode
        self.phys_mode = False

    @property
    def size(self) -> int:
        return self.runs[-1].end if self.runs else 0

    def close(self) -> None:
        self._sock.close()

    # -- blocking exchange on the shared core

    def _send(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except OSError as exc:
            raise LinkClosedError(f"gdbstub connection lost: {exc}") from exc

    def _next(self) -> p.ClientEvent:
        core = self._core
        while True:
            event = core.next_event()
            out = core.data_to_send()
            if out:
                self._send(out)
            if event is not p.NEED_DATA:
                if isinstance(event, (p.Notification, p.ConsoleOutput)):
                    continue
                return event
            ready, _, _ = select.select([self._sock], [], [], 10.0)
            if not ready:
                raise LinkClosedError("gdbstub did not answer within 10 s")
            try:
                data = self._sock.recv(65536)
            except BlockingIOError:
                continue
            except OSError as exc:
                raise LinkClosedError(f"gdbstub connection lost: {exc}") from exc
            if not data:
                raise LinkClosedError("gdbstub closed the connection (QEMU exited?)")
            core.receive_data(data)

    def _request(self, command: p.Command) -> p.Reply:
        self._send(self._core.send(command))
        reply = self._next()
        if not isinstance(reply, p.Reply):
            raise RemoteProtocolError(f"gdbstub sent {reply!r} instead of a reply")
        return reply

    def _with_link(self, work: Callable[[], None]) -> None:
        if not self._link_idle():
            raise UnsupportedOperation(
                "guest memory through the gdbstub is readable only while no event wait is in progress: pause first")
        resume = False
        if self._core.state is p.State.RUNNING:
            self._send(self._core.interrupt())
            stop = self._next()
            resume = self._on_stop(stop)  # False: a real event arrived, the backend keeps it
        try:
            if not self.phys_mode:
                self._request(p.set_physical_mode(True))
                self.phys_mode = True
                self._set_phys_mode(True)
            work()
        finally:
            if resume:
                self._send(self._core.send(p.cont()))

    # -- PhysicalMemory

    def _check(self, paddr: int, size: int) -> None:
        pos, end = paddr, paddr + size
        for run in self.runs:
            if run.start <= pos < run.end:
                pos = run.end
                if pos >= end:
                    return
        raise PhysicalReadError(pos, end - pos)

    def read_into(self, paddr: int, buf: bytearray | memoryview, *, pad: bool = False) -> None:
        out = memoryview(buf).cast("B")
        if not pad:
            self._check(paddr, len(out))

        def work() -> None:
            for addr, size in p.memory_chunks(paddr, len(out)):
                reply = self._request(p.read_memory(addr, size))
                pos = addr - paddr
                if reply.is_error or reply.unsupported or len(reply.payload) != 2 * size:
                    if not pad:
                        raise PhysicalReadError(addr, size)
                    out[pos : pos + size] = bytes(size)
                else:
                    out[pos : pos + size] = p.decode_hex(reply.payload)

        if len(out):
            self._with_link(work)

    def write(self, paddr: int, data: bytes) -> None:
        if not self.writable:
            raise UnsupportedOperation("guest memory was not attached for writing")
        self._check(paddr, len(data))

        def work() -> None:
            for addr, size in p.memory_chunks(paddr, len(data)):
                reply = self._request(p.write_memory(addr, bytes(data[addr - paddr : addr - paddr + size])))
                if not reply.ok:
                    raise PhysicalReadError(addr, size, f"gdbstub refused to write {size:#x} bytes at {addr:#x}")

        if data:
            self._with_link(work)
