"""The BTF parser: hand-built blobs of every kind, the host kernel's own BTF, and fuzzed blobs."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmwatch.errors import SymbolError, VmwatchError
from vmwatch.os.linux import btf
from vmwatch.os.linux.btf import BtfProfile, load_profile

from .btfgen import BtfBuilder

HOST_BTF = "/sys/kernel/btf/vmlinux"


def sample() -> bytes:
    """A task_struct-like layout with typedefs, anonymous members, bitfields and every kind."""
    b = BtfBuilder()
    u32 = b.int("unsigned int", 4)
    s32 = b.int("int", 4, signed=True)
    u64 = b.int("long unsigned int", 8)
    char = b.int("char", 1)
    pid_t = b.typedef("pid_t", s32)
    cpid = b.const(pid_t)
    vol = b.volatile(u64)
    comm = b.array(char, u32, 16)
    fwd = b.fwd("mm_struct")
    mmp = b.ptr(fwd)
    list_head = b.struct("list_head", 16, [])
    b.types[-0:]  # keep the empty forward-like struct; a full one follows
    list_full = b.struct("list_head", 16, [("next", 0, 0), ("prev", 0, 64)])
    inner = b.struct("", 8, [("a", u32, 0), ("b", u32, 32)])
    anon_union = b.struct("", 8, [("c", u64, 0), ("", inner, 0)], union=True)
    flags = b.struct("flags", 4, [("low", u32, 0, 3), ("high", u32, 3, 29)], bitfields=True)
    task = b.struct("task_struct", 96, [
        ("state", vol, 0), ("pid", cpid, 64), ("tgid", pid_t, 96), ("tasks", list_full, 128),
        ("", anon_union, 256), ("mm", mmp, 320), ("comm", comm, 384), ("fl", flags, 512),
        ("tail", s32, 544, 0),
    ])
    b.enum("pid_type", {"PIDTYPE_PID": 0, "PIDTYPE_TGID": 1, "NEG": -2})
    b.enum64("big", {"HUGE": 1 << 40})
    proto = b.func_proto(s32, [("x", u32)])
    var = b.var("jiffies", u64)
    b.datasec(".data", [(var, 0, 8)])
    b.decl_tag("tag", task, 1)
    del list_head, proto, u64
    return b.blob()


class TestHandBuilt:
    def test_members_and_offsets(self):
        """Members carry byte and bit offsets; typedef and const resolve to the base int."""
        p = BtfProfile(sample())
        task = p.struct("task_struct")
        assert task.size == 96
        assert task.members["pid"].offset == 8
        assert task.members["tgid"].offset == 12
        assert p.offset("task_struct", "tasks.prev") == 24
        assert p.kind(p.resolve(task.members["pid"].type_id)) == btf.INT
        assert p.size_of(task.members["comm"].type_id) == 16
        assert p.size_of(task.members["state"].type_id) == 8

    def test_anonymous_members_flattened(self):
        """Members of anonymous unions and structs, nested, are found by name at the right offset."""
        task = BtfProfile(sample()).struct("task_struct")
        assert task.members["c"].offset == 32
        assert task.members["a"].offset == 32
        assert task.members["b"].offset == 36
        assert "" not in task.members

    def test_bitfields_with_kind_flag(self):
        """kind_flag structs split the offset word into bitfield size and bit offset."""
        p = BtfProfile(sample())
        high = p.member("task_struct", "fl.high")
        assert (high.bit_offset, high.bit_size) == (512 + 3, 29)
        assert p.member("task_struct", "fl.low").bit_size == 3

    def test_complete_struct_preferred(self):
        """An empty declaration does not hide the definition with members."""
        assert set(BtfProfile(sample()).struct("list_head").members) == {"next", "prev"}

    def test_enums(self):
        """Signed enums (kind_flag) and 64-bit enums decode their values."""
        p = BtfProfile(sample())
        assert p.enum("pid_type") == {"PIDTYPE_PID": 0, "PIDTYPE_TGID": 1, "NEG": -2}
        assert p.enum("big") == {"HUGE": 1 << 40}

    def test_unknown_names_raise_symbol_error(self):
        """A missing struct or member is a SymbolError naming it."""
        p = BtfProfile(sample())
        with pytest.raises(SymbolError, match="no_such"):
            p.struct("no_such")
        with pytest.raises(SymbolError, match="nope"):
            p.member("task_struct", "nope")

    def test_cache_round_trip(self, tmp_path, monkeypatch):
        """A cached index gives the same answers as a fresh parse."""
        monkeypatch.setenv("VMWATCH_CACHE_DIR", str(tmp_path))
        blob = sample()
        first = load_profile(blob)
        assert list(tmp_path.rglob("btf-*"))
        second = load_profile(blob)
        assert second.struct("task_struct") == first.struct("task_struct")

    @pytest.mark.parametrize("blob", [b"", b"\x9f\xeb" + bytes(22), struct.pack("<HBBI", 0xEB9F, 2, 0, 24) + bytes(16)])
    def test_bad_headers(self, blob):
        """Short blobs, wrong magic and wrong versions are refused."""
        with pytest.raises(SymbolError):
            BtfProfile(blob)

    def test_section_past_end(self):
        """Type or string sections that run past the blob are refused."""
        blob = bytearray(sample())
        struct.pack_into("<I", blob, 12, 1 << 30)
        with pytest.raises(SymbolError, match="exceed"):
            BtfProfile(bytes(blob))

    def test_typedef_loop(self):
        """A typedef chain that loops is an error, not a hang."""
        b = BtfBuilder()
        b.typedef("a", 2)
        b.typedef("b", 1)
        with pytest.raises(SymbolError, match="deep"):
            BtfProfile(b.blob()).size_of(1)


@pytest.mark.skipif(not os.path.exists(HOST_BTF), reason="host kernel has no BTF")
class TestHostKernel:
    def test_task_struct(self):
        """The host kernel's BTF parses and describes task_struct as the kernel uses it."""
        with open(HOST_BTF, "rb") as f:
            p = BtfProfile(f.read())
        assert len(p) > 10_000
        task = p.struct("task_struct")
        assert {"pid", "tgid", "comm", "tasks", "real_parent", "mm", "cred"} <= set(task.members)
        assert p.size_of(task.members["comm"].type_id) == 16
        # thread_info sits at the start of task_struct on x86_64 (CONFIG_THREAD_INFO_IN_TASK)
        assert task.members["thread_info"].offset == 0
        assert task.members["pid"].offset < task.size
        assert p.struct("list_head").size == 16


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_blobs_raise_only_symbol_errors(data):
    """Corrupted blobs either parse or raise SymbolError; lookups on them do too."""
    blob = bytearray(sample())
    for _ in range(data.draw(st.integers(1, 8))):
        pos = data.draw(st.integers(0, len(blob) - 1))
        blob[pos] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(0, len(blob)))
    try:
        p = BtfProfile(bytes(blob[:cut] if data.draw(st.booleans()) else blob))
        for name in ("task_struct", "list_head", "flags"):
            s = p.struct(name)
            for m in s.members.values():
                p.size_of(m.type_id)
        p.enum("pid_type")
    except VmwatchError as exc:
        assert str(exc)


def test_self_referencing_array():
    """An array whose element is itself is refused instead of recursing forever."""
    b = BtfBuilder()
    u32 = b.int("unsigned int", 4)
    b.array(2, u32, 4)
    with pytest.raises(SymbolError):
        BtfProfile(b.blob()).size_of(2)
