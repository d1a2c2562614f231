"""JSON encoding of events and registers for recordings (docs/recording-format.md, "Values").

Plain JSON values stay as they are; everything else is a one-key tagged object, so the decoder
never guesses: ``{"$bytes": hex}``, ``{"$tuple": [...]}``, ``{"$dict": {...}}``,
``{"$enum": "module:Name", "value": v}``, ``{"$attrs": "module:Name", "fields": {...}}``.
A recording is hostile input: the decoder only resolves classes from ``vmwatch.*`` modules and
only attrs classes or enums, and turns every surprise into :class:`RecordingError`.
"""

from __future__ import annotations

import enum
import importlib
import json
from typing import Any

import attrs

from vmwatch.cpu import Registers, Segment
from vmwatch.cpu_aarch64 import Aarch64Registers
from vmwatch.errors import RecordingError
from vmwatch.events import Event


def _class_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def encode_value(value: Any) -> Any:
    """A JSON-able form of ``value`` (see the module docstring for the tags)."""
    if value is None or isinstance(value, (bool, int, float, str)) and not isinstance(value, enum.Enum):
        return value
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$bytes": bytes(value).hex()}
    if isinstance(value, enum.Enum):
        return {"$enum": _class_name(type(value)), "value": value.value}
    if isinstance(value, (tuple, list)):
        return {"$tuple": [encode_value(v) for v in value]}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"only str keys can be recorded, not {list(value)!r}")
        return {"$dict": {k: encode_value(v) for k, v in value.items()}}
    if attrs.has(type(value)):
        fields = {}
        for f in attrs.fields(type(value)):
            item = getattr(value, f.name)
            if item is None and f.default is None:
                continue  # the constructor restores it: most registers are unknown, keep them out
            fields[f.name] = encode_value(item)
        return {"$attrs": _class_name(type(value)), "fields": fields}
    raise TypeError(f"cannot record a value of type {type(value).__name__}: {value!r}")


_RESOLVED: dict[str, type] = {}
"""Class references already checked (only valid ones are kept, so hostile names cannot grow it)."""


def _resolve(name: Any) -> type:
    cls = _RESOLVED.get(name) if isinstance(name, str) else None
    if cls is not None:
        return cls
    if not isinstance(name, str) or ":" not in name:
        raise RecordingError(f"bad class reference {name!r} in recording")
    module_name, _, qualname = name.partition(":")
    if module_name != "vmwatch" and not module_name.startswith("vmwatch."):
        raise RecordingError(f"recording names class {name!r} outside vmwatch")
    try:
        obj: Any = importlib.import_module(module_name)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError):
        raise RecordingError(f"recording names unknown class {name!r}") from None
    if not isinstance(obj, type) or not (attrs.has(obj) or issubclass(obj, enum.Enum)):
        raise RecordingError(f"recording names {name!r}, which is not a value type")
    _RESOLVED[name] = obj
    return obj


def decode_value(data: Any) -> Any:
    """Inverse of :func:`encode_value`.

    Raises:
        RecordingError: an unknown tag, class, enum value or field.
    """
    if data is None or isinstance(data, (bool, int, float, str)):
        return data
    if not isinstance(data, dict) or len(data) not in (1, 2):
        raise RecordingError(f"bad encoded value {_short(data)}")
    if "$bytes" in data and len(data) == 1:
        try:
            return bytes.fromhex(data["$bytes"])
        except (TypeError, ValueError):
            raise RecordingError(f"bad bytes value {_short(data)}") from None
    if "$tuple" in data and len(data) == 1 and isinstance(data["$tuple"], list):
        return tuple(decode_value(v) for v in data["$tuple"])
    if "$dict" in data and len(data) == 1 and isinstance(data["$dict"], dict):
        return {k: decode_value(v) for k, v in data["$dict"].items()}
    if "$enum" in data and "value" in data:
        cls = _resolve(data["$enum"])
        if not issubclass(cls, enum.Enum):
            raise RecordingError(f"{data['$enum']!r} is not an enum")
        try:
            return cls(data["value"])
        except (ValueError, TypeError):
            raise RecordingError(f"bad value {data['value']!r} for {data['$enum']}") from None
    if "$attrs" in data and isinstance(data.get("fields"), dict):
        cls = _resolve(data["$attrs"])
        fields = {k: decode_value(v) for k, v in data["fields"].items()}
        try:
            return cls(**fields)
        except (TypeError, ValueError) as exc:
            raise RecordingError(f"cannot rebuild {data['$attrs']}: {exc}") from None
    raise RecordingError(f"bad encoded value {_short(data)}")


def _short(data: Any) -> str:
    text = repr(data)
    return text if len(text) <= 80 else text[:77] + "..."


def encode_event(event: Event) -> bytes:
    """One event as compact UTF-8 JSON."""
    return json.dumps(encode_value(event), separators=(",", ":")).encode()


def decode_event(payload: bytes) -> Event:
    """Inverse of :func:`encode_event`.

    Raises:
        RecordingError: not JSON, or not an event.
    """
    value = decode_value(_loads(payload))
    if not isinstance(value, Event):
        raise RecordingError(f"event record holds a {type(value).__name__}, not an event")
    return value


def encode_registers(registers: Registers | Aarch64Registers) -> bytes:
    return json.dumps(encode_value(registers), separators=(",", ":")).encode()


def decode_registers(payload: bytes) -> Registers | Aarch64Registers:
    value = decode_value(_loads(payload))
    if isinstance(value, Aarch64Registers):
        x = value.x
        if x is not None and (not isinstance(x, tuple) or len(x) != 31 or not all(isinstance(r, int) for r in x)):
            raise RecordingError("registers record has bad x0..x30")
        return value
    if not isinstance(value, Registers):
        raise RecordingError(f"registers record holds a {type(value).__name__}")
    for seg in ("cs", "ss", "ds", "es", "fs", "gs"):
        if not isinstance(getattr(value, seg), (Segment, type(None))):
            raise RecordingError(f"registers record has a bad {seg}")
    return value


def _loads(payload: bytes) -> Any:
    try:
        return json.loads(payload.decode())
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise RecordingError("record payload is not valid JSON") from None
