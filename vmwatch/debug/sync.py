"""A blocking debugger for notebooks, scripts and the shell.

A trio loop in a background thread owns the target and the :class:`DebugSession`; each method
here runs one session call in it and waits. Notebook use::

    from vmwatch.debug import Debugger
    with Debugger.open("qemu:/run/vm/qmp.sock") as dbg:
        dbg.add_breakpoint("do_nanosleep")
        dbg.cont(timeout=10)
        print(dbg.disassemble("$rip", 5), dbg.current_task())
"""

from __future__ import annotations

import contextlib
import queue
import threading
from typing import Any, Awaitable, Callable

import structlog
import trio

from vmwatch.cpu import Registers
from vmwatch.debug.control import BreakpointInfo, WatchpointInfo
from vmwatch.debug.session import DebugSession, Frame, Instruction, TaskInfo
from vmwatch.errors import VmwatchError
from vmwatch.events import Access, Event

log = structlog.get_logger()


class Debugger:
    """Blocking facade of :class:`DebugSession`; use :meth:`open` (a context manager)."""

    def __init__(self, spec: str | Any, *, linux: bool = True) -> None:
        self.spec = spec if isinstance(spec, str) else getattr(spec, "spec", "target")
        self._target = None if isinstance(spec, str) else spec
        self._linux = linux
        self.session: DebugSession | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._done: trio.Event | None = None
        self._scope: trio.CancelScope | None = None
        self._thread: threading.Thread | None = None

    @classmethod
    def open(cls, spec: str | Any, *, linux: bool = True) -> Debugger:
        """Attach to ``spec``: ``qemu:/path/qmp.sock``, a memory image path, or an opened Target.

        ``linux=False`` skips looking for a Linux kernel (other guests: no symbols or task).

        Raises:
            VmwatchError: the target cannot be opened.
        """
        debugger = cls(spec, linux=linux)
        started: queue.Queue[BaseException | None] = queue.Queue()
        debugger._thread = threading.Thread(target=trio.run, args=(debugger._main, started), daemon=True,
                                            name="vmwatch-debug")
        debugger._thread.start()
        error = started.get()
        if error is not None:
            debugger._thread.join()
            raise error
        return debugger

    async def _main(self, started: queue.Queue[BaseException | None]) -> None:
        from vmwatch.target import open_target

        try:
            async with contextlib.AsyncExitStack() as stack:
                target = self._target or await stack.enter_async_context(open_target(self.spec))
                self.session = DebugSession(target, linux=self._linux)
                await self.session.attach()
                self._token = trio.lowlevel.current_trio_token()
                self._done = trio.Event()
                started.put(None)
                try:
                    await self._done.wait()
                finally:
                    with trio.CancelScope(shield=True):
                        try:
                            await self.session.detach()
                        except VmwatchError as exc:  # the guest is gone: nothing left to release
                            log.warning("debugger detach failed", error=str(exc))
        except BaseException as exc:
            if self._token is None:
                started.put(exc)
                return
            raise

    def _call(self, func: Callable[..., Awaitable[Any]], *args: Any, timeout: float | None = None) -> Any:
        if self._token is None:
            raise RuntimeError("the debugger is closed")

        async def run() -> Any:
            with trio.CancelScope() as scope:
                self._scope = scope
                if timeout is not None:
                    scope.deadline = trio.current_time() + timeout
                result = await func(*args)
                return result
            raise trio.TooSlowError(f"no stop within {timeout} s" if timeout is not None else "interrupted")

        try:
            return trio.from_thread.run(run, trio_token=self._token)
        except KeyboardInterrupt:
            # Ctrl-C while the guest runs: cancel the wait in the trio thread, keep the session.
            if self._scope is not None:
                trio.from_thread.run_sync(self._scope.cancel, trio_token=self._token)
            raise

    def close(self) -> None:
        """Remove traps, let a live guest run, and stop the background loop."""
        if self._token is not None and self._done is not None:
            trio.from_thread.run_sync(self._done.set, trio_token=self._token)
            self._token = None
        if self._thread is not None:
            self._thread.join()

    def __enter__(self) -> Debugger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the session's API, blocking -------------------------------------------------------------------

    @property
    def read_only(self) -> bool:
        return self.session.read_only  # type: ignore[union-attr]

    @property
    def vcpu(self) -> int:
        return self.session.vcpu  # type: ignore[union-attr]

    def select_vcpu(self, vcpu: int) -> None:
        self.session.select_vcpu(vcpu)  # type: ignore[union-attr]

    def registers(self, refresh: bool = False) -> Registers:
        return self._call(self.session.registers, refresh)  # type: ignore[union-attr]

    def evaluate(self, expression: str) -> int:
        return self._call(self.session.evaluate, expression)  # type: ignore[union-attr]

    def read(self, address: int | str, size: int) -> bytes:
        return self._call(self._read, address, size, False)

    def read_phys(self, address: int | str, size: int) -> bytes:
        return self._call(self._read, address, size, True)

    async def _read(self, address: int | str, size: int, physical: bool) -> bytes:
        session = self.session
        if isinstance(address, str):
            address = await session.evaluate(address)  # type: ignore[union-attr]
        read = session.read_phys if physical else session.read  # type: ignore[union-attr]
        return await read(address, size)

    def disassemble(self, address: int | str = "$pc", count: int = 10) -> list[Instruction]:
        return self._call(self._disassemble, address, count)

    async def _disassemble(self, address: int | str, count: int) -> list[Instruction]:
        session = self.session
        if isinstance(address, str):
            address = await session.evaluate(address)  # type: ignore[union-attr]
        return await session.disassemble(address, count)  # type: ignore[union-attr]

    def symbolize(self, address: int) -> str | None:
        return self.session.symbolize(address)  # type: ignore[union-attr]

    def backtrace(self, limit: int = 32) -> list[Frame]:
        return self._call(self.session.backtrace, limit)  # type: ignore[union-attr]

    def current_task(self) -> TaskInfo:
        return self._call(self.session.current_task)  # type: ignore[union-attr]

    def step(self, count: int = 1) -> int:
        return self._call(self.session.step, count)  # type: ignore[union-attr]

    def next(self, timeout: float | None = None) -> int:
        return self._call(self.session.next, timeout=timeout)  # type: ignore[union-attr]

    def cont(self, timeout: float | None = None) -> Event:
        return self._call(self.session.cont, timeout=timeout)  # type: ignore[union-attr]

    def add_breakpoint(self, expression: str) -> BreakpointInfo:
        return self._call(self.session.add_breakpoint, expression)  # type: ignore[union-attr]

    def add_watchpoint(self, expression: str, size: int = 8, access: Access = Access.WRITE) -> WatchpointInfo:
        return self._call(self.session.add_watchpoint, expression, size, access)  # type: ignore[union-attr]

    def delete(self, number: int) -> None:
        self._call(self.session.delete_breakpoint, number)  # type: ignore[union-attr]
