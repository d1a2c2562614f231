"""The rule API: plain Python functions with decorators that declare what they listen to.

A rule pack is a Python file (or a folder of them). Each decorated function is one rule; it
receives ``(event, guest)`` and raises alerts with ``guest.alert(severity, message, **details)``::

    from vmwatch.rules import rule

    @rule.on_breakpoint("commit_creds", comm="sh")
    def creds(event, guest):
        guest.alert("info", "sh changes credentials", cred=hex(guest.registers.rdi))

    @rule.every(5.0)
    @rule.configure(limit=10)
    def count(event, guest):
        guest.state["ticks"] = guest.state.get("ticks", 0) + 1

Decorators stack: one function may listen to several things. ``guest.state`` is a dict private
to the rule for one run; ``guest.config`` holds the rule's defaults (``@rule.configure``) merged
with the overrides of the run. Rules are enabled unless declared with ``@rule.disabled``; a run
can enable, disable and configure any rule by name (``pack.function``) or glob.

A pack with rules for different jobs keeps each job in a part file beside it, named with a
leading ``_`` (so it is no pack of its own) and listed in the pack's ``PARTS``::

    PARTS = ("_security_windows.py",)

The parts' rules join the pack under its name (``security.ssdt``), after the pack's own.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

import attrs

from vmwatch.errors import RuleError
from vmwatch.events import Event
from vmwatch.ruletypes import Listener as Listener
from vmwatch.ruletypes import ListenerKind as ListenerKind
from vmwatch.ruletypes import Narrow as Narrow
from vmwatch.ruletypes import Severity as Severity

RuleFunction = Callable[[Event, Any], object]
_SPEC_ATTR = "__vmwatch_rule__"


@attrs.define
class _Spec:
    """What the decorators collected on a function (mutable while decorating)."""

    listeners: list[Listener] = attrs.Factory(list)
    defaults: dict[str, Any] = attrs.Factory(dict)
    enabled: bool = True
    arches: tuple[str, ...] = ()


@attrs.frozen(kw_only=True)
class Rule:
    """A loaded rule: a function and what it listens to."""

    name: str
    """``pack.function``: what ``--enable``, ``--disable`` and ``--set`` name."""
    func: RuleFunction
    listeners: tuple[Listener, ...]
    defaults: dict[str, Any]
    enabled: bool
    doc: str = ""
    arches: tuple[str, ...] = ()
    """The CPU architectures (``x86``, ``aarch64``) the rule applies to; empty: every one."""


def _spec(func: RuleFunction) -> _Spec:
    if not callable(func):
        raise RuleError(f"a rule must be a function, not {func!r}")
    spec = getattr(func, _SPEC_ATTR, None)
    if spec is None:
        spec = _Spec()
        setattr(func, _SPEC_ATTR, spec)
    return spec


def _adding(listener: Listener) -> Callable[[RuleFunction], RuleFunction]:
    def decorate(func: RuleFunction) -> RuleFunction:
        _spec(func).listeners.append(listener)
        return func

    return decorate


def _check_where(where: object) -> None:
    if isinstance(where, bool) or not isinstance(where, (str, int)) or (isinstance(where, int) and where < 0):
        raise RuleError(f"a trap location must be a symbol name or an address, not {where!r}")


def on_breakpoint(where: str | int, *, pid: int | None = None, comm: str | None = None,
                  cr3: int | None = None) -> Callable[[RuleFunction], RuleFunction]:
    """Run when execution reaches ``where`` (kernel symbol, ``symbol+offset`` or address)."""
    _check_where(where)
    return _adding(Listener(kind=ListenerKind.BREAKPOINT, target=where, narrow=Narrow(pid, comm, cr3)))


def on_write(where: str | int, size: int | None = 8, *, pid: int | None = None, comm: str | None = None,
             cr3: int | None = None) -> Callable[[RuleFunction], RuleFunction]:
    """Run when the guest writes into ``size`` bytes at ``where`` (a write watchpoint).

    ``where`` may be a range of symbols, ``"_stext.._etext"``; ``size=None`` watches up to the
    next kernel symbol (a whole table). The event gives the watched range's start, not the byte
    written (gdbstub reports it so).
    """
    _check_where(where)
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size <= 0):
        raise RuleError(f"watched size must be a positive int or None, not {size!r}")
    return _adding(Listener(kind=ListenerKind.WRITE, target=where, size=size or 0, narrow=Narrow(pid, comm, cr3)))


def on_register_write(*names: str) -> Callable[[RuleFunction], RuleFunction]:
    """Run when the guest writes any of the control registers or MSRs ``names``: ``"cr3"``,
    ``"cr0", "cr4"``, ``"msr:lstar"``."""
    from vmwatch.engine.registers import canonical_register

    if not names:
        raise RuleError("on_register_write needs at least one register name")
    listeners = [Listener(kind=ListenerKind.REGISTER, target=canonical_register(name)) for name in names]

    def decorate(func: RuleFunction) -> RuleFunction:
        _spec(func).listeners.extend(reversed(listeners))  # decorators stack bottom-up; rules_of reverses
        return func

    return decorate


def on_register(name: str) -> Callable[[RuleFunction], RuleFunction]:
    """Run when the guest writes the control register or MSR ``name`` (``on_register_write``'s one-name form)."""
    return on_register_write(name)


def on_interrupt(vector: int) -> Callable[[RuleFunction], RuleFunction]:
    """Run when the guest enters the handler of interrupt ``vector`` (0-255)."""
    if isinstance(vector, bool) or not isinstance(vector, int) or not 0 <= vector <= 255:
        raise RuleError(f"interrupt vector must be 0-255, not {vector!r}")
    return _adding(Listener(kind=ListenerKind.INTERRUPT, target=vector))


def on_exception(vector: int | str, *, user: bool | None = None, pid: int | None = None,
                 comm: str | None = None, address: tuple[int, int] | None = None
                 ) -> Callable[[RuleFunction], RuleFunction]:
    """Run when the guest takes CPU exception ``vector``: a number (0-31) or a name
    (``"page_fault"``, ``"general_protection"``, ``"invalid_opcode"``: ``vmwatch.cpu.EXCEPTION_NAMES``).

    ``user=True`` keeps only exceptions taken in user mode, ``False`` only kernel mode, ``None``
    both. ``address=(start, end)`` keeps page faults whose ``cr2`` is in ``[start, end)``. The
    event is a :class:`~vmwatch.events.Fault` (``rip``, ``error_code``, ``cr2`` of a page fault).
    On x86-64 Linux under TCG, page-fault listeners are served by guarded inline hooks that test
    the mode, the address range and a pid in the guest before any stop
    (vmwatch/engine/page_fault_hooks.py); elsewhere by a breakpoint on the IDT's handler.
    """
    from vmwatch.cpu import EXCEPTION_VECTORS

    number = EXCEPTION_VECTORS.get(vector.strip().lower()) if isinstance(vector, str) else vector
    if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number < 32:
        raise RuleError(f"exception must be a vector 0-31 or one of {', '.join(EXCEPTION_VECTORS)}, not {vector!r}")
    if user is not None and not isinstance(user, bool):
        raise RuleError(f"user must be True, False or None, not {user!r}")
    if address is not None:
        if number != 14:
            raise RuleError("address= filters page faults (vector 14) only")
        if (not isinstance(address, tuple) or len(address) != 2
                or not all(isinstance(a, int) and not isinstance(a, bool) for a in address)
                or not 0 <= address[0] < address[1] <= 1 << 64):
            raise RuleError(f"address must be (start, end) with 0 <= start < end <= 2**64, not {address!r}")
    return _adding(Listener(kind=ListenerKind.EXCEPTION, target=(number, user),
                            narrow=Narrow(pid, comm, address=address)))


_MMIO_ACCESS = {"r": "r", "w": "w", "rw": "rw", "wr": "rw"}


def on_mmio(start: int | str, size: int = 0, access: str = "w") -> Callable[[RuleFunction], RuleFunction]:
    """Run when the guest reads (``"r"``), writes (``"w"``) or does either (``"rw"``) to a device's
    guest-physical range: ``[start, start + size)`` (e.g. the local APIC, 0xfee00000 and 0x1000),
    or every range the guest's own resource tree names ``start`` (/proc/iomem: ``"Local APIC"``,
    ``"IOAPIC 0"``; no size). The event is a :class:`~vmwatch.events.MmioAccess`.
    """
    if isinstance(start, str):
        if not start.strip() or size:
            raise RuleError(f"a device named in /proc/iomem takes no size, not {start!r} and {size!r}")
    else:
        for name, value in (("start", start), ("size", size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < (name == "size") or value >> 52:
                raise RuleError(f"MMIO {name} must be an int in guest-physical range, not {value!r}")
    kind = _MMIO_ACCESS.get(access) if isinstance(access, str) else None
    if kind is None:
        raise RuleError(f"MMIO access must be 'r', 'w' or 'rw', not {access!r}")
    return _adding(Listener(kind=ListenerKind.MMIO, target=(start, size, kind)))


def every(seconds: float) -> Callable[[RuleFunction], RuleFunction]:
    """Run periodically (the guest is paused while the rule runs); the event is a ``Tick``."""
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0:
        raise RuleError(f"period must be a positive number of seconds, not {seconds!r}")
    return _adding(Listener(kind=ListenerKind.EVERY, target=float(seconds)))


def on(*event_types: type[Event], pid: int | None = None,
       comm: str | None = None) -> Callable[[RuleFunction], RuleFunction]:
    """Run on OS-level or engine events: ``ProcessStart``, ``Exec``, ``ProcessExit``, ``ModuleLoad``..."""
    if not event_types:
        raise RuleError("rule.on() needs at least one event class")
    for cls in event_types:
        if not (isinstance(cls, type) and issubclass(cls, Event)):
            raise RuleError(f"rule.on() takes event classes, not {cls!r}")

    def decorate(func: RuleFunction) -> RuleFunction:
        for cls in event_types:
            _spec(func).listeners.append(Listener(kind=ListenerKind.EVENT, target=cls, narrow=Narrow(pid, comm)))
        return func

    return decorate


def on_start(func: RuleFunction) -> RuleFunction:
    """Run once when the watch begins (take baselines here); the event is a ``Tick`` with seq 0."""
    _spec(func).listeners.append(Listener(kind=ListenerKind.START))
    return func


def configure(**defaults: Any) -> Callable[[RuleFunction], RuleFunction]:
    """Declare the rule's settings and their defaults (``guest.config``; overridable per run)."""

    def decorate(func: RuleFunction) -> RuleFunction:
        _spec(func).defaults.update(defaults)
        return func

    return decorate


def disabled(func: RuleFunction) -> RuleFunction:
    """The rule is off unless a run enables it."""
    _spec(func).enabled = False
    return func


def arch(*names: str) -> Callable[[RuleFunction], RuleFunction]:
    """The rule is about these CPU architectures only (``x86``, ``aarch64``): a watch of a guest of
    another one sets it aside at start, with one line saying so (an IDT check on an arm64 guest)."""
    unknown = set(names) - {"x86", "aarch64"}
    if not names or unknown:
        raise RuleError(f"rule.arch takes x86 and/or aarch64, not {names!r}")

    def decorate(func: RuleFunction) -> RuleFunction:
        _spec(func).arches = tuple(names)
        return func

    return decorate


class _Namespace:
    """``rule.on_breakpoint(...)`` reads better in packs than bare function names."""

    on_breakpoint = staticmethod(on_breakpoint)
    on_write = staticmethod(on_write)
    on_register = staticmethod(on_register)
    on_register_write = staticmethod(on_register_write)
    on_interrupt = staticmethod(on_interrupt)
    on_exception = staticmethod(on_exception)
    on_mmio = staticmethod(on_mmio)
    every = staticmethod(every)
    on = staticmethod(on)
    on_start = staticmethod(on_start)
    configure = staticmethod(configure)
    disabled = staticmethod(disabled)
    arch = staticmethod(arch)


rule = _Namespace()


def rules_of(namespace: dict[str, Any], pack: str) -> list[Rule]:
    """The rules declared in a module namespace, in definition order."""
    found = []
    for obj in namespace.values():
        spec = getattr(obj, _SPEC_ATTR, None)
        if not isinstance(spec, _Spec) or getattr(obj, "__module__", None) != namespace.get("__name__"):
            continue
        if not spec.listeners:
            raise RuleError(f"rule {pack}.{obj.__name__} listens to nothing")
        found.append(Rule(
            name=f"{pack}.{obj.__name__}", func=obj, listeners=tuple(reversed(spec.listeners)),
            defaults=dict(spec.defaults), enabled=spec.enabled, arches=spec.arches,
            doc=(obj.__doc__ or "").strip().split("\n")[0],
        ))
    return found


SHIPPED_PACKS = Path(__file__).resolve().parent.parent / "rules"


def resolve_pack_path(spec: str | Path) -> list[Path]:
    """Files of a pack: a ``.py`` file, a folder of them, or a shipped pack's name (``security``)."""
    path = Path(spec)
    if not path.exists() and SHIPPED_PACKS.joinpath(f"{spec}.py").is_file():
        path = SHIPPED_PACKS / f"{spec}.py"
    if path.is_dir():
        files = sorted(p for p in path.glob("*.py") if not p.name.startswith("_"))
        if not files:
            raise RuleError(f"no rule files (*.py) in {path}")
        return files
    if not path.is_file():
        raise RuleError(f"rule pack {str(spec)!r} not found (a .py file, a folder, or one of: "
                        f"{', '.join(shipped_pack_names())})")
    if path.suffix != ".py":
        raise RuleError(f"rule pack {path} is not a .py file")
    return [path]


def shipped_pack_names() -> list[str]:
    return sorted(p.stem for p in SHIPPED_PACKS.glob("*.py") if not p.name.startswith("_"))


def _exec_rule_file(path: Path, what: str) -> dict[str, Any]:
    """Import one rule file under a private module name; its namespace."""
    module_name = f"vmwatch_rulepack_{abs(hash(str(path.resolve()))):x}_{path.stem}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise RuleError(f"cannot load {what} {path}")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except RuleError as exc:
        raise RuleError(f"{path}: {exc}") from exc
    except Exception as exc:  # a pack is user code: any failure is a bad pack, reported in one line
        raise RuleError(f"{path}: cannot load {what}: {type(exc).__name__}: {exc}") from exc
    finally:
        sys.modules.pop(module_name, None)
    return vars(module)


def _collect(namespace: dict[str, Any], path: Path, pack: str) -> list[Rule]:
    try:
        rules = rules_of(namespace, pack)
    except RuleError as exc:
        raise RuleError(f"{path}: {exc}") from exc
    if not rules:
        raise RuleError(f"{path}: no rules (decorate functions with @rule.on_...)")
    return rules


def _part_paths(namespace: dict[str, Any], path: Path) -> list[Path]:
    """The part files a pack's ``PARTS`` names: ``_name.py`` files in the pack's folder."""
    parts = namespace.get("PARTS", ())
    if isinstance(parts, str) or not isinstance(parts, (tuple, list)):
        raise RuleError(f"{path}: PARTS must be a tuple of file names, not {parts!r}")
    found = []
    for name in parts:
        if (not isinstance(name, str) or Path(name).name != name or not name.startswith("_")
                or not name.endswith(".py")):
            raise RuleError(f"{path}: a part is a file '_name.py' beside the pack, not {name!r}")
        part = path.parent / name
        if not part.is_file():
            raise RuleError(f"{path}: part {name} of pack {path.stem} not found in {path.parent}")
        found.append(part)
    return found


def load_pack(path: Path) -> list[Rule]:
    """Import one rule file (and the parts its ``PARTS`` names) and collect its rules.

    Raises:
        RuleError: the file or a part is missing, does not import, or declares a rule wrongly.
    """
    namespace = _exec_rule_file(path, "rule pack")
    rules = _collect(namespace, path, path.stem)
    for part in _part_paths(namespace, path):
        part_namespace = _exec_rule_file(part, f"part of rule pack {path.stem}")
        if "PARTS" in part_namespace:
            raise RuleError(f"{part}: a part cannot have parts of its own")
        rules += _collect(part_namespace, part, path.stem)
    return rules


@attrs.define
class RuleSet:
    """The rules of one run, with per-run enable/disable/configure."""

    rules: list[Rule] = attrs.Factory(list)
    _enabled: dict[str, bool] = attrs.Factory(dict)
    _config: dict[str, dict[str, Any]] = attrs.Factory(dict)

    @classmethod
    def load(cls, specs: Iterable[str | Path]) -> RuleSet:
        """Load packs by path or shipped name; rule names must be unique across packs."""
        rules: list[Rule] = []
        seen: set[str] = set()
        for spec in specs:
            for path in resolve_pack_path(spec):
                for r in load_pack(path):
                    if r.name in seen:
                        raise RuleError(f"rule {r.name} defined twice (pack {path})")
                    seen.add(r.name)
                    rules.append(r)
        return cls(rules)

    def _matching(self, pattern: str) -> list[Rule]:
        hits = [r for r in self.rules if r.name == pattern or fnmatch.fnmatchcase(r.name, pattern)
                or r.name.split(".", 1)[0] == pattern]
        if not hits:
            raise RuleError(f"no rule matches {pattern!r} (rules: {', '.join(r.name for r in self.rules)})")
        return hits

    def enable(self, pattern: str) -> None:
        for r in self._matching(pattern):
            self._enabled[r.name] = True

    def disable(self, pattern: str) -> None:
        for r in self._matching(pattern):
            self._enabled[r.name] = False

    def configure(self, pattern: str, **values: Any) -> None:
        """Override settings; an unknown setting name is an error (catches typos)."""
        for r in self._matching(pattern):
            unknown = set(values) - set(r.defaults)
            if unknown:
                raise RuleError(f"rule {r.name} has no setting {sorted(unknown)[0]!r} "
                                f"(settings: {', '.join(sorted(r.defaults)) or 'none'})")
            self._config.setdefault(r.name, {}).update(values)

    def is_enabled(self, r: Rule) -> bool:
        return self._enabled.get(r.name, r.enabled)

    def config_of(self, r: Rule) -> dict[str, Any]:
        return {**r.defaults, **self._config.get(r.name, {})}

    def active(self) -> list[Rule]:
        return [r for r in self.rules if self.is_enabled(r)]
