"""DWARF symbol files: a C program compiled with -g is read back with the compiler's own offsets."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmwatch.errors import SymbolError
from vmwatch.os.linux.symbols import load_symbols_file

from .symfiles import load_or_refused

SOURCE = r"""
#include <stddef.h>
#include <stdio.h>
#include <string.h>
typedef int pid_t;
typedef struct { unsigned int val; } kuid_t;
struct list_head { struct list_head *next, *prev; };
enum pid_type { PIDTYPE_PID, PIDTYPE_TGID, PIDTYPE_MAX };
struct cred { int usage; kuid_t uid; kuid_t gid; kuid_t euid; };
struct task_struct {
    volatile long state;
    unsigned int flags:3, prio:7;
    const pid_t pid;
    pid_t tgid;
    struct list_head tasks;
    union { unsigned long a; struct { unsigned int b; unsigned short c; }; };
    const struct cred *real_cred;
    char comm[16];
    enum pid_type type;
    int matrix[3][4];
};
struct task_struct init_task;
int main(void) {
    struct task_struct t;
    unsigned long word;
    memset(&t, 0, sizeof t);
    t.prio = 0x7f;
    memcpy(&word, (char *)&t + 8, sizeof word);
    printf("pid %zu tgid %zu tasks %zu a %zu b %zu c %zu real_cred %zu comm %zu type %zu matrix %zu "
           "size %zu uid %zu prio_word %lu\n",
        offsetof(struct task_struct, pid), offsetof(struct task_struct, tgid), offsetof(struct task_struct, tasks),
        offsetof(struct task_struct, a), offsetof(struct task_struct, b), offsetof(struct task_struct, c),
        offsetof(struct task_struct, real_cred), offsetof(struct task_struct, comm),
        offsetof(struct task_struct, type), offsetof(struct task_struct, matrix), sizeof(struct task_struct),
        offsetof(struct cred, uid), word);
    return 0;
}
"""


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    if shutil.which("gcc") is None:
        pytest.skip("gcc is not installed")
    workdir = tmp_path_factory.mktemp("dwarf")
    (workdir / "k.c").write_text(SOURCE)
    subprocess.run(["gcc", "-g", "-O0", "-o", str(workdir / "k"), str(workdir / "k.c")], check=True)
    out = subprocess.run([str(workdir / "k")], check=True, capture_output=True, text=True).stdout.split()
    truth = {out[i]: int(out[i + 1]) for i in range(0, len(out), 2)}
    return workdir / "k", truth


def test_offsets_match_the_compiler(compiled, tmp_path, monkeypatch):
    """Member offsets (anonymous union/struct flattened, typedef/const/volatile resolved) equal offsetof."""
    monkeypatch.setenv("VMWATCH_CACHE_DIR", str(tmp_path))
    path, truth = compiled
    types = load_symbols_file(str(path)).types
    for member in ("pid", "tgid", "tasks", "a", "b", "c", "real_cred", "comm", "type", "matrix"):
        assert types.offset("task_struct", member) == truth[member], member
    assert types.struct("task_struct").size == truth["size"]
    assert types.offset("cred", "uid") == truth["uid"]
    assert types.size_of(types.member("task_struct", "matrix").type_id) == 48
    assert types.enum("pid_type") == {"PIDTYPE_PID": 0, "PIDTYPE_TGID": 1, "PIDTYPE_MAX": 2}


def test_bitfield_position(compiled, tmp_path, monkeypatch):
    """A bitfield's bit offset and width reproduce the bits the compiled program set."""
    monkeypatch.setenv("VMWATCH_CACHE_DIR", str(tmp_path))
    path, truth = compiled
    prio = load_symbols_file(str(path)).types.member("task_struct", "prio")
    assert ((1 << prio.bit_size) - 1) << (prio.bit_offset - 64) == truth["prio_word"]


def test_symbols_from_symtab(compiled, tmp_path, monkeypatch):
    """The ELF symbol table gives the address of a global variable."""
    monkeypatch.setenv("VMWATCH_CACHE_DIR", str(tmp_path))
    path, _ = compiled
    assert load_symbols_file(str(path)).symbols["init_task"] > 0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_binary(compiled, tmp_path_factory, monkeypatch, data):
    """A compiled program with bytes smashed anywhere reads back or raises SymbolError."""
    monkeypatch.setenv("VMWATCH_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    path, _ = compiled
    blob = bytearray(path.read_bytes())
    for _ in range(data.draw(st.integers(1, 20))):
        blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
    target = tmp_path_factory.mktemp("bad") / "k"
    target.write_bytes(bytes(blob))
    load_or_refused(target, SymbolError)
