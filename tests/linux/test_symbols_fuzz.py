"""Symbol files are hostile input too: random ISF documents, System.maps and libvmi.conf entries."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vmwatch.errors import VmwatchError
from vmwatch.os.linux.symbols import load_symbols_file

from .symfiles import load_or_refused

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(
        ["kind", "name", "size", "fields", "offset", "type", "subtype", "count", "anonymous", "bit_position",
         "bit_length", "constants", "task_struct", "list_head", "x", "address"]), inner, max_size=5),
    max_leaves=30)


def _exercise(types) -> None:
    for name in ("task_struct", "list_head", "x"):
        s = types.struct(name)
        for m in list(s.members.values())[:10]:
            types.size_of(m.type_id)
            types.kind(m.type_id)
    types.enum("x")


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(doc=st.fixed_dictionaries({"user_types": st.dictionaries(
    st.sampled_from(["task_struct", "list_head", "x"]), _json, max_size=3)}, optional={
    "enums": _json, "base_types": _json, "symbols": _json}))
def test_random_isf_documents(tmp_path_factory, doc):
    """Any JSON shaped roughly like an ISF loads and answers, or raises a VmwatchError."""
    path = tmp_path_factory.mktemp("isf") / "doc.json"
    path.write_text(json.dumps(doc))
    try:
        _exercise(load_symbols_file(str(path)).types)
    except VmwatchError as exc:
        assert str(exc)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                  HealthCheck.function_scoped_fixture])
@given(text=st.text(alphabet="0123456789abcdefxTtDd _={};\"\nlinux_tasksmpgdnameostypesysmap", max_size=400))
def test_random_text_files(tmp_path_factory, text):
    """Random System.map-ish or libvmi.conf-ish text is read or refused with a VmwatchError."""
    path = tmp_path_factory.mktemp("txt") / "f"
    path.write_text(text)
    load_or_refused(path)
