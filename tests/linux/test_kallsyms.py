"""kallsyms: tables built like scripts/kallsyms.c are found in a buffer and decoded exactly."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmwatch.errors import SymbolError, VmwatchError
from vmwatch.os.linux import kallsyms

from .kallsymsgen import build, symbol_set


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VMWATCH_CACHE_DIR", str(tmp_path))


class TestDecode:
    @pytest.mark.parametrize("layout", ["6.1", "6.1-seqs", "6.4"])
    def test_every_layout(self, layout):
        """Names, types and addresses come back exactly for each table order the kernel used."""
        syms = symbol_set()
        blob, tt = build(syms, layout=layout)
        found = kallsyms.find_token_tables(blob)
        assert found == [tt]
        symbols, tables = kallsyms.decode(blob, tt)
        assert symbols.names == [n for n, _, _ in syms]
        assert symbols.types == "".join(t for _, t, _ in syms)
        assert list(symbols.addresses) == [a for _, _, a in syms]
        assert tables.relative_base == 0xFFFFFFFF81000000

    def test_plain_relative(self):
        """Without absolute per-CPU symbols every offset is added to the relative base."""
        syms = [s for s in symbol_set() if s[1] not in "aA"]
        blob, tt = build(syms, absolute_percpu=False)
        symbols, _ = kallsyms.decode(blob, tt)
        assert symbols["_text"] == 0xFFFFFFFF81000000
        assert list(symbols.addresses) == [a for _, _, a in syms]

    def test_lookup(self):
        """Reverse lookup gives the nearest symbol below an address, skipping absolute ones."""
        syms = symbol_set()
        blob, tt = build(syms)
        symbols, _ = kallsyms.decode(blob, tt)
        name, _, address = syms[10]
        assert symbols.lookup(address + 3) == (name, 3)
        assert symbols.lookup(5) is None

    def test_scan_physical(self):
        """scan() finds tables anywhere in a larger physical range, across chunk boundaries."""
        blob, tt = build(symbol_set())
        memory = bytearray(8 << 20)
        at = (3 << 20) - 100
        memory[at:at + len(blob)] = blob
        read = lambda paddr, size: bytes(memory[paddr:paddr + size])  # noqa: E731
        symbols, tables, base = kallsyms.scan(read, [(0, len(memory))], chunk=1 << 20)
        assert base + tables.token_table == at + tt
        assert symbols["linux_banner"] == symbol_set()[-2][2]

    def test_nothing_found(self):
        """Memory without kallsyms gives a SymbolError, not an empty table."""
        read = lambda paddr, size: bytes(size)  # noqa: E731
        with pytest.raises(SymbolError, match="no kallsyms"):
            kallsyms.scan(read, [(0, 1 << 20)])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_corrupted_tables(data):
    """Corrupted tables decode to something or raise SymbolError; never another exception."""
    blob, tt = build(symbol_set(300), layout=data.draw(st.sampled_from(["6.1", "6.1-seqs", "6.4"])))
    blob = bytearray(blob)
    for _ in range(data.draw(st.integers(1, 6))):
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob[pos] = data.draw(st.integers(0, 255))
    try:
        for start in kallsyms.find_token_tables(bytes(blob)):
            kallsyms.decode(bytes(blob), start)
    except VmwatchError as exc:
        assert str(exc)
