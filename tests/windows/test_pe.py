"""PE parsing on Wine's real ntoskrnl.exe and hal.dll, on broken headers, and fuzzed."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmwatch.errors import PEFormatError, VmwatchError
from vmwatch.os.windows import pe
from vmwatch.testing.windowsguest import load_pe


def _reader(image: bytes):
    def read(address: int, size: int) -> bytes:
        if address < 0 or address + size > len(image):
            raise VmwatchError(f"read {address:#x}+{size:#x} past the image")
        return bytes(image[address:address + size])
    return read


def _parse(image: bytes) -> pe.Exports:
    read = _reader(image)
    return pe.read_exports(read, pe.parse_headers(read, 0))


class TestRealImages:
    def test_ntoskrnl_exports(self, ntoskrnl):
        """Wine's ntoskrnl names itself and exports the symbols the Windows layer uses."""
        image, size = load_pe(ntoskrnl)
        read = _reader(image)
        headers = pe.parse_headers(read, 0)
        assert (headers.bits, headers.machine, headers.size_of_image) == (64, 0x8664, size)
        exports = pe.read_exports(read, headers)
        assert exports.name == "ntoskrnl.exe"
        assert len(exports.rvas) > 1600
        for name in ("PsInitialSystemProcess", "KeServiceDescriptorTable", "NtBuildNumber", "NtClose"):
            assert 0x1000 <= exports.rvas[name] < size

    def test_pe32_ntoskrnl(self, ntoskrnl32, wine_pe32):
        """libwine:i386's ntoskrnl is a PE32 (Magic 0x10b, i386) exporting the same symbols,
        KeServiceDescriptorTable among them (exported on x86 Windows too)."""
        image, size = load_pe(ntoskrnl32)
        read = _reader(image)
        headers = pe.parse_headers(read, 0)
        assert (headers.bits, headers.machine, headers.size_of_image) == (32, 0x14C, size)
        exports = pe.read_exports(read, headers)
        assert exports.name == "ntoskrnl.exe" and len(exports.rvas) > 1600
        for name in ("PsInitialSystemProcess", "KeServiceDescriptorTable", "NtBuildNumber", "NtClose"):
            assert 0x1000 <= exports.rvas[name] < size
        hal, _ = load_pe(wine_pe32["hal.dll"])
        assert pe.export_name(_reader(hal), pe.parse_headers(_reader(hal), 0)) == "hal.dll"

    def test_hal_is_not_a_kernel(self, wine_pe):
        """hal.dll parses but is not taken for ntoskrnl."""
        from vmwatch.os.windows.locate import is_kernel

        image, _ = load_pe(wine_pe["hal.dll"])
        assert pe.export_name(_reader(image), pe.parse_headers(_reader(image), 0)) == "hal.dll"
        assert is_kernel(_reader(image), 0) is None


class TestBrokenHeaders:
    @pytest.fixture
    def image(self, ntoskrnl) -> bytearray:
        return load_pe(ntoskrnl)[0]

    def test_truncated(self, image):
        """An image cut inside its header page is a clear error, not an IndexError."""
        with pytest.raises(VmwatchError):
            _parse(bytes(image[:0x200]))

    def test_lfanew_outside(self, image):
        """e_lfanew past the header page is a PEFormatError."""
        struct.pack_into("<I", image, 0x3C, 0xFFFFFFF0)
        with pytest.raises(PEFormatError, match="e_lfanew"):
            _parse(bytes(image))

    def test_absurd_export_counts(self, image):
        """NumberOfFunctions of 2**32-1 is refused before any table is read."""
        headers = pe.parse_headers(_reader(bytes(image)), 0)
        struct.pack_into("<I", image, headers.export_rva + 20, 0xFFFFFFFF)
        with pytest.raises(PEFormatError, match="absurd export counts"):
            _parse(bytes(image))

    def test_rva_outside_image(self, image):
        """An AddressOfNames RVA past SizeOfImage is a PEFormatError."""
        headers = pe.parse_headers(_reader(bytes(image)), 0)
        struct.pack_into("<I", image, headers.export_rva + 32, 0x7FFFFFF0)
        with pytest.raises(PEFormatError, match="AddressOfNames"):
            _parse(bytes(image))

    def test_absurd_size_of_image(self, image):
        """SizeOfImage of 4 GiB is refused."""
        lfanew = struct.unpack_from("<I", image, 0x3C)[0]
        struct.pack_into("<I", image, lfanew + 0x18 + 56, 0xFFFFFFFF)
        with pytest.raises(PEFormatError, match="SizeOfImage"):
            _parse(bytes(image))


@pytest.fixture(params=["pe32+", "pe32"])
def kernel_image(request, ntoskrnl, ntoskrnl32) -> bytes:
    """The x64 (PE32+) and the x86 (PE32) ntoskrnl, each as the loader maps it."""
    return bytes(load_pe(ntoskrnl if request.param == "pe32+" else ntoskrnl32)[0])


class TestFuzz:
    @settings(max_examples=300, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(data=st.data())
    def test_mutated_headers(self, kernel_image, data):
        """Mutated header, export directory and name tables of either kernel (PE32+ or PE32: its
        data directories at another offset) parse or raise VmwatchError, nothing else."""
        image = bytearray(kernel_image)
        headers = pe.parse_headers(_reader(bytes(image)), 0)
        hot = [0x3C, headers.export_rva, headers.export_rva + 12, headers.export_rva + 20,
               headers.export_rva + 24, headers.export_rva + 28, headers.export_rva + 32, headers.export_rva + 36]
        lfanew = struct.unpack_from("<I", image, 0x3C)[0]
        dirs = 112 if headers.bits == 64 else 96  # NumberOfRvaAndSizes sits just before the directories
        hot += [lfanew, lfanew + 0x14, lfanew + 0x18, lfanew + 0x18 + 56, lfanew + 0x18 + dirs - 4, lfanew + 0x18 + dirs,
                lfanew + 0x18 + dirs + 4]
        for _ in range(data.draw(st.integers(1, 5))):
            pos = data.draw(st.sampled_from(hot) | st.integers(0, 0x1000))
            value = data.draw(st.sampled_from([0, 1, 0x40, 0xFFF, 0x1000, 0xFFFF, 2**31, 2**32 - 1]) | st.integers(0, 2**32 - 1))
            struct.pack_into("<I", image, pos, value)
        if data.draw(st.booleans()):
            image = image[:data.draw(st.integers(0, len(image)))]
        try:
            _parse(bytes(image))
        except VmwatchError:
            pass
