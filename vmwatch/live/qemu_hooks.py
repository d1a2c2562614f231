"""Inline hooks of the QEMU backend: placing and removing them, and what a stop in one means.

The technique is in :mod:`vmwatch.live.inline_hooks`; this mixin of
:class:`vmwatch.live.qemu.QemuVM` talks to the gdbstub for it. Every method runs with the link
lock held and the guest stopped, like the callers in ``qemu.py``.
"""

from __future__ import annotations

import contextlib

from vmwatch.errors import ProtocolError
from vmwatch.live import inline_hooks as ih
from vmwatch.live.gdbrsp import _proto as p
from vmwatch.live.gdbrsp._trio import RemoteError


class InlineHooking:
    """The inline-hook half of :class:`~vmwatch.live.qemu.QemuVM` (state lives there)."""

    def is_inline(self, vaddr: int) -> bool:
        """True when the breakpoint at ``vaddr`` is an inline hook."""
        return vaddr in self._hooks

    async def _add_hook(self, vaddr: int) -> bool:
        """Place an inline hook for a breakpoint at ``vaddr`` (lock held, guest stopped)."""
        if vaddr < 1 << 63:  # kernel text only: user code pages are shared between processes
            return False
        code = await self._read_code(vaddr, 16)
        site = ih.patch_site(vaddr, code) if len(code) == 16 else None
        moved = ih.displaced(vaddr, code) if site is None and len(code) == 16 else None
        if moved:
            site = vaddr
        site_original = code[site - vaddr : site - vaddr + ih.SITE_SIZE] if site is not None else ih.FTRACE_NOP
        slot = None
        if site is None:  # a hook left behind by a watch that died?
            site, slot = ih.left_behind(vaddr, code) or (None, None)
            if slot is not None:
                slot_original = await self._read_code(slot, ih.TRAMPOLINE_SIZE)
                if slot_original != ih.trampoline(slot):
                    return False
                self.stats["hooks_taken_over"] += 1
        if site is None or any(h.site == site for h in self._hooks.values()):
            return False
        if slot is None:
            slot, slot_original = await self._trampoline_slot(site, moved or b"")
            if slot is None:
                return False
        hook = ih.Hook(address=vaddr, site=site, slot=slot, site_original=site_original, slot_original=slot_original,
                       moved=moved or b"")
        await self._hide(site, site_original)
        if slot not in self._spare_slots:
            await self._hide(slot, slot_original)
        # trampoline and watchpoint first: the call goes live last
        await self.gdb.batch([p.write_memory(slot, ih.trampoline(slot, hook.moved)),
                              p.insert_point(p.WatchKind.READ, slot, 8), p.write_memory(site, ih.call_to(site, slot))])
        self._hooks[vaddr] = hook
        self._hook_at_slot[slot] = hook
        self._spare_slots.discard(slot)
        self.stats["inline_hooks"] += 1
        return True

    async def _unhook(self, hook: ih.Hook) -> None:
        """Put the NOP back and keep the trampoline as a spare (lock held, guest stopped)."""
        await self._set_phys(False)
        await self.gdb.batch([p.write_memory(hook.site, hook.site_original),
                              p.remove_point(p.WatchKind.READ, hook.slot, 8)])
        self._hook_at_slot.pop(hook.slot, None)
        if not hook.moved:  # a trampoline holding a moved instruction is never reused: another
            self._spare_slots.add(hook.slot)  # hook's bytes there could meet a vCPU inside it
        await self._unhide(hook.site)

    async def _trampoline_slot(self, site: int, moved: bytes) -> tuple[int | None, bytes]:
        """A spare trampoline in call range, or dead padding after ``site`` (up to 64 KiB on)."""
        for slot in self._spare_slots if not moved else ():
            if abs(slot - site) < 1 << 30:
                return slot, self._hidden[slot]
        length = len(ih.trampoline(0, moved))
        for span in (0x1000, 0x4000, 0x10000):  # a linear sweep must start at an instruction
            code = await self._read_code(site, span)
            found = ih.free_slots(code, site, self._patched(), size=length)
            if found:
                return found[0], code[found[0] - site : found[0] - site + length]
        return None, b""

    async def _read_code(self, vaddr: int, size: int) -> bytes:
        """Up to ``size`` bytes of guest code at ``vaddr``, through the gdbstub (as much as it
        reads before a fault): the bytes the guest executes, our patches included."""
        await self._set_phys(False)
        code = bytearray()
        with contextlib.suppress(RemoteError):
            for addr, n in p.memory_chunks(vaddr, size):
                code += p.decode_hex(await self.gdb.request(p.read_memory(addr, n)))
        return bytes(code)

    def _patched(self) -> list[tuple[int, int]]:
        """``(start, size)`` of every piece of guest code vmwatch patched."""
        return [(vaddr, len(original)) for vaddr, original in self._hidden.items()]

    async def _hide(self, vaddr: int, original: bytes) -> None:
        """vmwatch's reads show ``original`` at ``vaddr`` from now on (a patch goes there)."""
        self._hidden[vaddr] = original
        self._set_masks({**self._masks, **await self._physical_masks(vaddr, original)})

    async def _unhide(self, vaddr: int) -> None:
        gone = await self._physical_masks(vaddr, self._hidden.pop(vaddr))
        self._set_masks({k: v for k, v in self._masks.items() if k not in gone})

    async def _physical_masks(self, vaddr: int, original: bytes) -> dict[int, bytes]:
        """``{guest-physical address: original bytes}`` for a patch at ``vaddr`` (split at pages)."""
        out = {}
        pos = 0
        while pos < len(original):
            addr = vaddr + pos
            step = min(len(original) - pos, 0x1000 - (addr & 0xFFF))
            reply = await self.qmp.execute("human-monitor-command", command_line=f"gva2gpa {addr:#x}")
            try:
                gpa = int(str(reply).split("gpa:")[1].split()[0], 16)
            except (IndexError, ValueError):
                raise ProtocolError(f"QEMU cannot translate {addr:#x}: {str(reply).strip()}") from None
            out[gpa] = original[pos : pos + step]
            pos += step
        return out

    def _set_masks(self, masks: dict[int, bytes]) -> None:
        self._masks = masks
        if hasattr(self.memory, "set_masks"):
            self.memory.set_masks(masks)

    async def _leave_trampoline(self, vcpu: int) -> None:
        """Make the registers of a vCPU stopped in a trampoline really what they are shown as
        (RIP at the hooked address, RSP before the call), before anyone changes or steps them."""
        stopped = self._hook_stops.pop(vcpu, None)
        if stopped is None:
            return
        hook, rsp = stopped
        await self._select(vcpu)
        await self.gdb.batch([p.write_register(self._layout["rsp"].regnum, (rsp + ih.STACK_DEPTH).to_bytes(8, "little")),
                              p.write_register(self._layout["rip"].regnum, hook.address.to_bytes(8, "little"))])
        self._regs_cache.pop(vcpu, None)
        self._resume_from = (vcpu, hook.address)
