"""The system call table, each entry resolved to a kernel symbol or flagged outside kernel text."""

from __future__ import annotations

import attrs

from vmwatch.errors import SymbolError

MAX_SYSCALLS = 1024


@attrs.frozen
class Syscall:
    index: int
    address: int
    symbol: str | None
    in_text: bool
    """False when the handler is outside ``_stext.._etext``: a module or a hook."""

    def as_dict(self) -> dict[str, object]:
        return attrs.asdict(self)


def table_length(symbols, name: str, entry_size: int) -> int:
    """Entries up to the next symbol (kallsyms has no sizes), bounded."""
    start = symbols[name]
    end = symbols.next_address(start)
    if end is None or end - start > MAX_SYSCALLS * entry_size:
        end = start + MAX_SYSCALLS * entry_size
    return max(1, (end - start) // entry_size)


def read_syscalls(linux, name: str = "sys_call_table", count: int | None = None) -> list[Syscall]:
    """The table's entries; ``count`` where the kernel's code says it (arm64), else up to the next symbol."""
    symbols, memory = linux.symbols, linux.memory
    if name not in symbols:
        raise SymbolError(f"kernel has no {name} symbol", name=name)
    size = memory.pointer_size
    count = table_length(symbols, name, size) if count is None else count
    raw = memory.read(symbols[name], count * size)
    while count > 1 and not any(raw[(count - 1) * size:count * size]):
        count -= 1  # alignment padding up to the next symbol, not table entries
    text_lo, text_hi = symbols["_stext"], symbols["_etext"]
    out = []
    for i in range(count):
        address = int.from_bytes(raw[i * size:(i + 1) * size], "little")
        in_text = text_lo <= address < text_hi
        found = symbols.lookup(address) if in_text else None
        symbol = None
        if found is not None:
            symbol = found[0] if found[1] == 0 else f"{found[0]}+{found[1]:#x}"
        out.append(Syscall(i, address, symbol, in_text))
    return out
