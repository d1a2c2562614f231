"""``/bin/fault``: a 317-byte static x86-64 program of the lab guest that raises one CPU exception.

``fault ud`` executes ``ud2`` (#UD), ``fault gp`` loads from the non-canonical address
0x8000000000000000 (#GP, error code 0), ``fault pf`` maps an anonymous page, unmaps it, prints
its address (``0x7f...``, chosen by the guest's mmap) and writes to it (#PF from user mode, cr2
that address). Each ends in SIGSEGV/SIGILL, which the kernel logs (``traps: fault[PID] trap
invalid opcode ip:...``); anything else exits with status 2. No libc, no busybox applet can do
this, so the code is here as its instructions, assembled once with GNU as (``as``/``ld -N
-Ttext=0x400078``) and checked against this listing by tests/lab/test_fault_program.py.
"""

from __future__ import annotations

import struct

LOAD_ADDRESS = 0x400000
ENTRY = LOAD_ADDRESS + 64 + 56
"""The code follows the ELF header and its one program header."""

LISTING = (
    ("48833c2402", "cmp qword ptr [rsp], 2"),  # argc == 2, else usage
    ("7514", "jne 0x400093"),
    ("488b742410", "mov rsi, qword ptr [rsp + 0x10]"),  # argv[1][0] picks the exception
    ("0fb606", "movzx eax, byte ptr [rsi]"),
    ("3c75", "cmp al, 0x75"),  # 'u'
    ("7414", "je 0x40009f"),
    ("3c67", "cmp al, 0x67"),  # 'g'
    ("7412", "je 0x4000a1"),
    ("3c70", "cmp al, 0x70"),  # 'p'
    ("7418", "je 0x4000ab"),
    ("bf02000000", "mov edi, 2"),  # usage: exit(2)
    ("b83c000000", "mov eax, 0x3c"),
    ("0f05", "syscall"),
    ("0f0b", "ud2"),  # ud
    ("48a10000000000000080", "movabs rax, qword ptr [0x8000000000000000]"),  # gp
    ("31ff", "xor edi, edi"),  # pf: mmap(0, 4096, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0)
    ("be00100000", "mov esi, 0x1000"),
    ("ba03000000", "mov edx, 3"),
    ("41ba22000000", "mov r10d, 0x22"),
    ("49c7c0ffffffff", "mov r8, 0xffffffffffffffff"),
    ("4531c9", "xor r9d, r9d"),
    ("b809000000", "mov eax, 9"),
    ("0f05", "syscall"),
    ("4889c3", "mov rbx, rax"),  # munmap(page, 4096)
    ("4889c7", "mov rdi, rax"),
    ("be00100000", "mov esi, 0x1000"),
    ("b80b000000", "mov eax, 0xb"),
    ("0f05", "syscall"),
    ("4883ec20", "sub rsp, 0x20"),  # "0x<hex>\n" built backwards on the stack
    ("488d7c241f", "lea rdi, [rsp + 0x1f]"),
    ("c6070a", "mov byte ptr [rdi], 0xa"),
    ("4889d8", "mov rax, rbx"),
    ("488d0d37000000", "lea rcx, [rip + 0x37]"),  # the digits after the code
    ("48ffcf", "dec rdi"),
    ("89c2", "mov edx, eax"),
    ("83e20f", "and edx, 0xf"),
    ("0fb61411", "movzx edx, byte ptr [rcx + rdx]"),
    ("8817", "mov byte ptr [rdi], dl"),
    ("48c1e804", "shr rax, 4"),
    ("75ec", "jne 0x4000f6"),
    ("4883ef02", "sub rdi, 2"),
    ("66c7073078", "mov word ptr [rdi], 0x7830"),  # "0x"
    ("488d542420", "lea rdx, [rsp + 0x20]"),  # write(1, text, length)
    ("4829fa", "sub rdx, rdi"),
    ("4889fe", "mov rsi, rdi"),
    ("bf01000000", "mov edi, 1"),
    ("b801000000", "mov eax, 1"),
    ("0f05", "syscall"),
    ("c60301", "mov byte ptr [rbx], 1"),  # the write to the unmapped page
)
DIGITS = b"0123456789abcdef"
CODE = b"".join(bytes.fromhex(hexed) for hexed, _ in LISTING) + DIGITS


def fault_program() -> bytes:
    """The ELF executable: header, one read+execute PT_LOAD of the whole file at :data:`LOAD_ADDRESS`."""
    size = ENTRY - LOAD_ADDRESS + len(CODE)
    header = struct.pack("<4sBBBBB7sHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0, b"", 2, 0x3E, 1, ENTRY, 64, 0,
                         0, 64, 56, 1, 0, 0, 0)
    load = struct.pack("<IIQQQQQQ", 1, 5, 0, LOAD_ADDRESS, LOAD_ADDRESS, size, size, 0x1000)
    return header + load + CODE
