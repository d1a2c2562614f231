"""gdb remote protocol command encoders: one function per packet the client sends (sans-IO)."""

from __future__ import annotations

import enum
from typing import Iterator

import attrs

from vmwatch.live.gdbrsp._framing import MEMORY_CHUNK


# ---------------------------------------------------------------- commands and replies


class ReplyKind(enum.Enum):
    """How the stub answers a command."""

    PLAIN = "plain"   # one reply packet ("OK", "E14", hex data, "" for unsupported)
    STOP = "stop"     # a stop reply, right away (``?``)
    RESUME = "resume" # nothing until the target stops again (``c``, ``s``, ``vCont``)


@attrs.frozen
class Command:
    """A packet we send, and what kind of answer it gets."""

    payload: bytes
    reply: ReplyKind = ReplyKind.PLAIN

    def __repr__(self) -> str:
        return f"Command({self.payload[:40]!r}, {self.reply.name})"


def _cmd(text: str, reply: ReplyKind = ReplyKind.PLAIN) -> Command:
    return Command(text.encode("ascii"), reply)


def read_registers() -> Command:
    """``g``: all registers of the selected thread, in target-description order."""
    return _cmd("g")


def write_registers(data: bytes) -> Command:
    """``G``: write all registers."""
    return _cmd("G" + data.hex())


def read_register(regnum: int) -> Command:
    return _cmd(f"p{regnum:x}")


def write_register(regnum: int, value: bytes) -> Command:
    """``P``: one register, ``value`` already in target byte order."""
    return _cmd(f"P{regnum:x}={value.hex()}")


def read_memory(addr: int, length: int) -> Command:
    """``m``: at most :data:`MEMORY_CHUNK` bytes (see :func:`memory_chunks`)."""
    if not 0 < length <= MEMORY_CHUNK:
        raise ValueError(f"read length {length!r} not in 1..{MEMORY_CHUNK:#x}")
    if addr < 0:
        raise ValueError(f"address {addr!r} is negative")
    return _cmd(f"m{addr:x},{length:x}")


def memory_chunks(addr: int, length: int) -> Iterator[tuple[int, int]]:
    """Split a read into ``(addr, length)`` pieces QEMU answers in one ``m`` each."""
    end = addr + length
    while addr < end:
        size = min(MEMORY_CHUNK, end - addr)
        yield addr, size
        addr += size


def write_memory(addr: int, data: bytes) -> Command:
    return _cmd(f"M{addr:x},{len(data):x}:{data.hex()}")


class WatchKind(enum.IntEnum):
    """``Z`` packet types."""

    SOFTWARE = 0
    HARDWARE = 1
    WRITE = 2
    READ = 3
    ACCESS = 4


def insert_point(kind: WatchKind, addr: int, length: int = 1) -> Command:
    """``Z0``..``Z4``: breakpoint (length is the x86 "kind", 1) or watchpoint over a range."""
    return _cmd(f"Z{int(kind)},{addr:x},{length:x}")


def remove_point(kind: WatchKind, addr: int, length: int = 1) -> Command:
    return _cmd(f"z{int(kind)},{addr:x},{length:x}")


def step() -> Command:
    return _cmd("s", ReplyKind.RESUME)


def cont() -> Command:
    return _cmd("c", ReplyKind.RESUME)


def vcont(*actions: tuple[str, str | None]) -> Command:
    """``vCont;a[:thread]...``: e.g. ``vcont(("s", "p1.1"), ("c", None))``."""
    parts = [a if t is None else f"{a}:{t}" for a, t in actions]
    return _cmd("vCont;" + ";".join(parts), ReplyKind.RESUME)


def set_thread(thread: str, op: str = "g") -> Command:
    """``Hg``/``Hc``: select the thread later register commands use."""
    return _cmd(f"H{op}{thread}")


def query_halt_reason() -> Command:
    return _cmd("?", ReplyKind.STOP)


def query_supported(features: str = "multiprocess+;swbreak+;hwbreak+;qRelocInsn-;xmlRegisters=i386") -> Command:
    return _cmd("qSupported:" + features)


def query_threads(first: bool = True) -> Command:
    return _cmd("qfThreadInfo" if first else "qsThreadInfo")


def read_features(annex: str, offset: int, length: int = 0xF00) -> Command:
    return _cmd(f"qXfer:features:read:{annex}:{offset:x},{length:x}")


def set_sstep_flags(flags: int) -> Command:
    """``Qqemu.sstep``: bits ENABLE=1, NOIRQ=2, NOTIMER=4."""
    return _cmd(f"Qqemu.sstep={flags:x}")


def set_physical_mode(on: bool) -> Command:
    """``Qqemu.PhyMemMode``: ``m``/``M`` address guest-physical memory (QEMU spelling)."""
    return _cmd(f"Qqemu.PhyMemMode:{int(on)}")


def detach(pid: int | None = 1) -> Command:
    """``D;pid`` (multiprocess) or plain ``D``: the target resumes."""
    return _cmd("D" if pid is None else f"D;{pid:x}")


SSTEP_ENABLE = 1
SSTEP_NOIRQ = 2
SSTEP_NOTIMER = 4
