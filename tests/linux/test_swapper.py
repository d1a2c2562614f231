"""The swapper_pg_dir scan over tables the test writes: found only where Linux's shape is."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmwatch.cpu_aarch64 import Aarch64Registers
from vmwatch.errors import SymbolError, VmwatchError
from vmwatch.memory import BufferMemory, GuestMemory
from vmwatch.os.linux.swapper import complete_registers, find_kernel_tables
from vmwatch.testing.aarch64tables import Aarch64Tables

LINEAR = 0xFFFF_0000_0000_0000
IMAGE = 0xFFFF_B08A_1800_0000


def linux_like(granule: int = 12, va_bits: int = 48, *, linear: bool = True, image: bool = True) -> Aarch64Tables:
    """A kernel root whose linear map and image mapping both cover all of its (small) RAM."""
    t = Aarch64Tables(granule, va_bits, ram_size=128 << granule)
    size = 1 << granule
    bottom = (1 << 64) - (1 << va_bits)
    top = bottom + (1 << (va_bits - 1))
    pages = len(t.ram) // size - 40  # leave room for the tables map() allocates
    for n in range(pages):
        if linear:
            t.map(bottom + n * size, n * size)
        if image:
            t.map(top + 0x1800_0000 + n * size, n * size)
    return t


@pytest.mark.parametrize(("granule", "va_bits"), [(12, 48), (12, 39), (16, 42), (14, 47)])
def test_finds_the_root_that_maps_itself_twice(granule: int, va_bits: int) -> None:
    """The root is found with its layout and its address in the image mapping."""
    t = linux_like(granule, va_bits)
    found = find_kernel_tables(BufferMemory(t.ram))
    assert (found.ttbr1, found.granule, found.va_bits) == (t.ttbr1, granule, va_bits)
    top = (1 << 64) - (1 << (va_bits - 1))
    assert found.vaddr == top + 0x1800_0000 + t.ttbr1
    mem = GuestMemory(BufferMemory(t.ram), registers=found.registers(Aarch64Registers(pc=0)))
    assert mem.translate(found.vaddr) == t.ttbr1


@pytest.mark.parametrize("which", ["linear", "image"])
def test_a_root_with_one_mapping_of_itself_is_not_the_kernels(which: str) -> None:
    """Without the linear map (init_pg_dir) or without the image (a process's table) nothing is found."""
    t = linux_like(linear=which != "linear", image=which != "image")
    with pytest.raises(SymbolError, match="swapper_pg_dir"):
        find_kernel_tables(BufferMemory(t.ram))


def test_registers_a_source_gave_are_kept() -> None:
    """Live registers with TTBR1/TCR pass unchanged and no scan runs (it would fail on zeros)."""
    regs = (Aarch64Registers(tcr_el1=0x10, ttbr1_el1=0x1000),)
    assert complete_registers(BufferMemory(bytearray(0x1000)), regs) == (regs, None)
    with pytest.raises(SymbolError):
        complete_registers(BufferMemory(bytearray(0x1000)), (Aarch64Registers(pc=0),))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 1 << 30), writes=st.integers(0, 400))
def test_hostile_memory_ends_with_a_typed_error(seed: int, writes: int) -> None:
    """A real root with random descriptors written over it and its tables: found or SymbolError."""
    t = linux_like()
    rng = random.Random(seed)
    for _ in range(writes):
        off = rng.randrange(0, 0x40000, 8)  # the tables live in the low pages
        value = rng.choice((rng.getrandbits(64), rng.randrange(0, 1 << 21) & ~0xFFF | 3, off & ~0xFFF | 3))
        struct.pack_into("<Q", t.ram, off, value)
    try:
        find_kernel_tables(BufferMemory(t.ram))
    except VmwatchError:
        pass
