"""CR3 writes from the hook on load_new_mm_cr3: the value the kernel's build_cr3 makes."""

from __future__ import annotations

import pytest

from vmwatch.engine.address_spaces import CR3_NOFLUSH, new_cr3, release_tuple


class TestAddressSpaces:
    def test_new_cr3_as_build_cr3(self):
        """No PCID: the pgd's physical address; with PCID: kernel PCID asid+1, and NOFLUSH unless flushing."""
        assert new_cr3(0x6E10000, 0, True, pcide=False) == 0x6E10000
        assert new_cr3(0x6E10000, 3, True, pcide=True) == 0x6E10004
        assert new_cr3(0x6E10000, 3, False, pcide=True) == 0x6E10004 | CR3_NOFLUSH
        assert new_cr3(0x6E10000, 0, True, pcide=False, lam=1 << 62) == 0x6E10000 | 1 << 62

    @pytest.mark.parametrize("release, expected", [("6.1.0-57-amd64", (6, 1)), ("6.10.3", (6, 10)),
                                                   ("5.4rc1", (5, 4)), ("?", (0, 0)), ("", (0, 0))])
    def test_release_tuple(self, release, expected):
        """Kernel releases as the banner gives them; unreadable ones are (0, 0)."""
        assert release_tuple(release) == expected
