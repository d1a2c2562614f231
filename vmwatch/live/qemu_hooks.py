"""Inline hooks of the QEMU backend: placing and removing them, and what a stop in one means.

The technique is in :mod:`vmwatch.live.inline_hooks`; this mixin of
:class:`vmwatch.live.qemu.QemuVM` talks to the gdbstub for it. Every method runs with the link
lock held and the guest stopped, like the callers in ``qemu.py``.
"""

from __future__ import annotations

import contextlib

import attrs

from vmwatch.cpu import Registers
from vmwatch.errors import ProtocolError
from vmwatch.live import hook_guards as hg
from vmwatch.live import inline_hooks as ih
from vmwatch.live.gdbrsp import _proto as p
from vmwatch.live.gdbrsp._trio import RemoteError


class InlineHooking:
    """The inline-hook half of :class:`~vmwatch.live.qemu.QemuVM` (state lives there)."""

    def is_inline(self, vaddr: int) -> bool:
        """True when the breakpoint at ``vaddr`` is an inline hook."""
        return vaddr in self._hooks

    async def restore_left_hooks(self, start: int, size: int) -> int:
        """Put back the ``mov crN`` of every hook a watch that died left in the code at ``start``
        (``size`` bytes): a call to a trampoline holding a moved ``mov`` gets the mov and its
        NOPs again, and the trampoline is kept for the next hook there. Returns how many.
        (The code must be restored before it is scanned for ``mov``s; other hooks are taken
        over when placed again.)"""
        restored = 0
        async with self._stopped_link():
            code = await self._read_code(start, size)
            for site, _, mnemonic, operands in ih.sweep(code, start):
                if mnemonic != "call" or code[site - start] != ih.CALL_REL32 or site in self._hidden:
                    continue
                slot = int(operands, 0)
                left = await self._read_code(slot, 16)
                moved = ih.left_moved(slot, left)
                if moved and (site, moved) not in self._spares:
                    await self._hide(slot, left[: len(ih.trampoline(slot, moved))])
                    await self.gdb.request(p.write_memory(site, ih.original_site(moved)))
                    self._spares[(site, moved)] = slot
                    restored += 1
        self.stats["hooks_restored"] += restored
        return restored

    async def _add_hook(self, vaddr: int, guard: hg.Guard | None = None) -> bool:
        """Place an inline hook for a breakpoint at ``vaddr`` (lock held, guest stopped); with
        ``guard``, a guarded one (ftrace NOP sites only; one left behind by a watch that died is
        taken over when its trampoline holds this very guard; another guard's gets its NOP back
        and a new trampoline)."""
        if vaddr < 1 << 63:  # kernel text only: user code pages are shared between processes
            return False
        code = await self._read_code(vaddr, 16)
        if guard is not None:
            return await self._add_guarded(vaddr, code, guard)
        site = ih.patch_site(vaddr, code) if len(code) == 16 else None
        moved = ih.displaced(vaddr, code) if site is None and len(code) == 16 else None
        if moved:
            site = vaddr
        site_original = code[site - vaddr : site - vaddr + ih.SITE_SIZE] if site is not None else ih.FTRACE_NOP
        slot = None
        if site is None:  # a hook left behind by a watch that died?
            site, slot = ih.left_behind(vaddr, code) or (None, None)
            if slot is not None:
                left = await self._read_code(slot, 16)
                moved = ih.left_moved(slot, left)
                if not moved and left[: ih.TRAMPOLINE_SIZE] != ih.trampoline(slot):
                    return False
                site_original = ih.original_site(moved or b"")
                slot_original = left[: len(ih.trampoline(slot, moved or b""))]
                self.stats["hooks_taken_over"] += 1
        if site is None or any(h.site == site for h in self._hooks.values()):
            return False
        reused = False
        if slot is None and moved:  # its own trampoline again, after governance took it away
            slot = self._spares.pop((site, moved), None)
            slot_original, reused = self._hidden.get(slot, b""), slot is not None
        if slot is None:
            slot, slot_original = await self._trampoline_slot(site, moved or b"")
            if slot is None:
                return False
            reused = slot in self._spare_slots
        self.stats["trampolines_reused"] += reused
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

    async def _add_guarded(self, vaddr: int, code: bytes, guard: hg.Guard) -> bool:
        site = ih.patch_site(vaddr, code) if len(code) == 16 else None
        size = len(hg.guarded_trampoline(guard, 0).code)
        slot = self._spares.pop((site, guard), None)  # the same bytes again: safe to reuse
        self.stats["trampolines_reused"] += slot is not None
        if site is None and len(code) == 16:  # left behind by a watch that died
            site, slot = ih.left_behind(vaddr, code) or (None, None)
            left = await self._read_code(slot, hg.LARGEST) if slot is not None else b""
            if left[:size] == hg.guarded_trampoline(guard, slot or 0).code:  # with this very guard
                await self._hide(slot, b"\xcc" * size)
                self.stats["hooks_taken_over"] += 1
            elif hg.left_guarded(left, slot or 0):  # another guard: the NOP back, a slot of our own
                await self.gdb.request(p.write_memory(site, ih.FTRACE_NOP))
                slot = None
                self.stats["hooks_restored"] += 1
            else:
                return False
            code = code[: site - vaddr] + ih.FTRACE_NOP + code[site - vaddr + ih.SITE_SIZE :]
        if site is None or any(h.site == site for h in self._hooks.values()):
            return False
        spare = slot is not None
        if slot is None:
            slot = await self._int3_slot(site, size)
            if slot is None:
                return False
        tramp = hg.guarded_trampoline(guard, slot)
        site_original = code[site - vaddr : site - vaddr + ih.SITE_SIZE]
        hook = ih.Hook(address=vaddr, site=site, slot=slot, site_original=site_original,
                       slot_original=b"\xcc" * size, stop_offset=tramp.stop_offset, depth=hg.STACK_DEPTH,
                       flags_at=hg.FLAGS_AT, guard=guard)
        await self._place(hook, tramp.code, spare)
        self.stats["guarded_hooks"] += 1
        return True

    async def _place(self, hook: ih.Hook, trampoline: bytes, spare: bool) -> None:
        await self._hide(hook.site, hook.site_original)
        if not spare:
            await self._hide(hook.slot, hook.slot_original)
        await self.gdb.batch([p.write_memory(hook.slot, trampoline), p.insert_point(p.WatchKind.READ, hook.slot, 8),
                              p.write_memory(hook.site, ih.call_to(hook.site, hook.slot))])
        self._hooks[hook.address] = hook
        self._hook_at_slot[hook.slot] = hook

    async def _int3_slot(self, site: int, size: int) -> int | None:
        """A slot of ``size`` bytes in a long int3 run of the kernel image near ``site``: the
        image is physically contiguous, so its RAM around ``site``'s frame is searched, and the
        slot found is checked through its virtual address (same frame, int3 bytes)."""
        site_pa = await self._gpa(site)
        taken = self._patched()
        for span in (1 << 20, 1 << 22, 1 << 24):
            start = max(0, site_pa - span)
            data = self.memory.read(start, 2 * span, pad=True)
            for slot in hg.int3_slots(data, site + (start - site_pa), size, taken, count=4):
                if abs(slot - site) < 1 << 30 and await self._gpa(slot) == slot - site + site_pa \
                        and await self._read_code(slot, size) == b"\xcc" * size:
                    return slot
        return None

    async def _gpa(self, vaddr: int) -> int:
        reply = await self.qmp.execute("human-monitor-command", command_line=f"gva2gpa {vaddr:#x}")
        try:
            return int(str(reply).split("gpa:")[1].split()[0], 16)
        except (IndexError, ValueError):
            raise ProtocolError(f"QEMU cannot translate {vaddr:#x}: {str(reply).strip()}") from None

    async def _unhook(self, hook: ih.Hook) -> None:
        """Put the NOP back and keep the trampoline as a spare (lock held, guest stopped)."""
        await self._set_phys(False)
        await self.gdb.batch([p.write_memory(hook.site, hook.site_original),
                              p.remove_point(p.WatchKind.READ, hook.slot, 8)])
        self._hook_at_slot.pop(hook.slot, None)
        if hook.guard is not None or hook.moved:  # only the same bytes at the same site may reuse
            self._spares[(hook.site, hook.guard or hook.moved)] = hook.slot  # it: a vCPU may be inside
        else:
            self._spare_slots.add(hook.slot)
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
            out[await self._gpa(addr)] = original[pos : pos + step]
            pos += step
        return out

    def _set_masks(self, masks: dict[int, bytes]) -> None:
        self._masks = masks
        if hasattr(self.memory, "set_masks"):
            self.memory.set_masks(masks)

    async def _as_at_hook(self, regs: Registers, hook: ih.Hook, rsp: int) -> Registers:
        """The registers of a vCPU stopped in ``hook``'s trampoline (raw RSP ``rsp``) as they were
        at the hooked address: RIP there, RSP before the call, RFLAGS the caller's (selected vCPU)."""
        shown = attrs.evolve(regs, rip=hook.address, rsp=rsp + hook.depth)
        if hook.flags_at is None:
            return shown
        await self._set_phys(False)
        flags = p.decode_hex(await self.gdb.request(p.read_memory(rsp + hook.flags_at, 8)))
        return attrs.evolve(shown, rflags=int.from_bytes(flags, "little"))

    async def _leave_trampoline(self, vcpu: int) -> None:
        """Make the registers of a vCPU stopped in a trampoline really what they are shown as
        (RIP at the hooked address, RSP before the call), before anyone changes or steps them."""
        stopped = self._hook_stops.pop(vcpu, None)
        if stopped is None:
            return
        hook, rsp = stopped
        await self._select(vcpu)
        writes = [p.write_register(self._layout["rsp"].regnum, (rsp + hook.depth).to_bytes(8, "little")),
                  p.write_register(self._layout["rip"].regnum, hook.address.to_bytes(8, "little"))]
        if hook.flags_at is not None:  # the caller's flags, as the trampoline's popfq would put back
            await self._set_phys(False)
            flags = p.decode_hex(await self.gdb.request(p.read_memory(rsp + hook.flags_at, 8)))
            writes.append(p.write_register(self._layout["eflags"].regnum, flags[:self._layout["eflags"].size]))
        await self.gdb.batch(writes)
        self._regs_cache.pop(vcpu, None)
        self._resume_from = (vcpu, hook.address)
