"""Runs a guarded trampoline on this x86-64 host (``python guarded_trampoline_runner.py JSON``).

The trampoline sits in an executable page; its watched read points at a page mapped with no
access, so the read a matching filter makes kills the process with SIGSEGV, where the guest
would stop on the watchpoint. A filter that does not match returns: the runner prints, as JSON,
the registers and flags after the call and how far RSP moved. GS is pointed at a fake per-CPU
area whose ``current`` names a fake task with the tgid asked for. Used by tests/live/test_hook_guards.py.
"""

from __future__ import annotations

import ctypes
import json
import mmap
import sys

from vmwatch.live.hook_guards import Guard, guarded_trampoline

HARNESS = bytes.fromhex(
    "53" "4889fb"                                  # push rbx; mov rbx, rdi (the state)
    "488b03" "488b4b08" "488b5310" "488b7318" "488b7b20" "4c8b4328"  # rax rcx rdx rsi rdi r8 <- state
    "48896378"                                     # state[15] = rsp
    "ff7330" "9d"                                  # push state[6]; popfq
    "ff5338"                                       # call state[7]
    "9c" "8f4370"                                  # pushfq; pop state[14]
    "48894340" "48894b48" "48895350" "48897358" "48897b60" "4c894368"  # state[8..13] <- rax..r8
    "48296378"                                     # state[15] -= rsp
    "fc" "5b" "c3")                                # cld; pop rbx; ret
"""What calls the trampoline: registers and flags from a state array in, and out after it."""
DATA = 0x40000
"""Bytes of the fake per-CPU area, task and pt_regs (per-CPU offsets up to 0x30000)."""
REGISTERS = ("rax", "rcx", "rdx", "rsi", "rdi", "r8")
ARCH_SET_GS = 0x1001
SYS_ARCH_PRCTL = 158


def run(case: dict) -> dict:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    area = libc.mmap(None, 2 * mmap.PAGESIZE + DATA, mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC,
                     mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
    code, forbidden, data = area, area + mmap.PAGESIZE, area + 2 * mmap.PAGESIZE
    libc.mprotect(ctypes.c_void_p(forbidden), mmap.PAGESIZE, 0)  # PROT_NONE
    guard = Guard(**{k: tuple(v) if isinstance(v, list) else v for k, v in case["guard"].items()})
    slot = code + 256
    tramp = guarded_trampoline(guard, slot, watched=forbidden)
    ctypes.memmove(code, HARNESS, len(HARNESS))
    ctypes.memmove(slot, tramp.code, len(tramp.code))
    task = data + 0x30000  # fake task: tgid at the guard's offset; fake per-CPU area at data
    if guard.pid is not None:
        current, tgid_offset, _ = guard.pid
        ctypes.c_uint64.from_address(data + current).value = task
        ctypes.c_uint32.from_address(task + tgid_offset).value = case["tgid"]
        if libc.syscall(SYS_ARCH_PRCTL, ARCH_SET_GS, ctypes.c_ulong(data)) != 0:
            raise OSError(ctypes.get_errno(), "arch_prctl(ARCH_SET_GS)")
    frame = data + 0x38000  # fake pt_regs: the saved CS at the guard's offset
    if guard.mode is not None:
        ctypes.c_uint16.from_address(frame + guard.mode[1]).value = case["cs"]
    regs = {**{r: 0x1111 * (i + 1) for i, r in enumerate(REGISTERS)}, **case["registers"]}
    regs = {r: frame if v == "frame" else v for r, v in regs.items()}
    state = (ctypes.c_uint64 * 16)(*[regs[r] for r in REGISTERS], case["rflags"], slot)
    ctypes.CFUNCTYPE(None, ctypes.c_void_p)(code)(ctypes.addressof(state))
    return {"before": [regs[r] for r in REGISTERS], "after": list(state[8:14]), "rflags": state[14],
            "rsp_moved": state[15]}


if __name__ == "__main__":
    print(json.dumps(run(json.loads(sys.argv[1]))))
