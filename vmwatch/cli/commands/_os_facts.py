"""``vmwatch info --os``: what the OS layer found in a target, and how it found each fact."""

from __future__ import annotations

from vmwatch.errors import VmwatchError
from vmwatch.text import shown

_DECIMAL = ("build",)


def os_facts(phys, registers, symbols_file: str | None = None) -> dict:
    """The kernel of ``phys`` (Linux or Windows, detected) as ``{"os", "found": [{what, value, how}]}``.

    A target with no usable kernel gives ``{"os": None, "error": why}``: the format facts above
    it stay true, so ``info`` still succeeds.
    """
    from vmwatch.os import detect

    try:
        kernel = detect.from_memory(phys, tuple(registers), symbols_file=symbols_file)
    except VmwatchError as exc:
        return {"os": None, "error": str(exc)}
    if getattr(kernel, "os_name", None) == "windows":
        found = [{"what": f.what, "value": f.value, "how": f.how} for f in kernel.kernel.found]
        return {"os": "windows", "name": kernel.kernel.name, "build": kernel.kernel.build, "found": found}
    k = kernel.kernel
    found = [{"what": "release", "value": k.release, "how": "linux_banner found in memory"},
             {"what": "kernel text", "value": k.text_vaddr, "how": f"_text, physical {k.text_paddr:#x}"},
             {"what": "KASLR slide", "value": k.slide, "how": "_text minus 0xffffffff81000000"},
             {"what": "DTB", "value": k.kernel_cr3, "how": f"kernel page-table root ({k.mode.name} paging)"}]
    return {"os": "linux", "name": k.release, "build": None, "found": found}


def as_lines(facts: dict) -> list[str]:
    """The facts as ``info`` prints them: one line per fact, guest strings escaped."""
    if facts["os"] is None:
        return [f"Kernel: not found: {shown(facts['error'])}"]
    head = f"Kernel: {facts['os']} ({shown(str(facts['name']))}"
    head += f", build {facts['build']})" if facts["build"] is not None else ")"
    rows = []
    for f in facts["found"]:
        value = f["value"]
        if isinstance(value, int) and f["what"] not in _DECIMAL:
            value = f"{value:#x}"
        rows.append((shown(f["what"]), shown(str(value)), shown(f["how"])))
    widths = [max(len(r[i]) for r in rows) for i in range(2)] if rows else [0, 0]
    return [head] + [f"  {w:<{widths[0]}}  {v:<{widths[1]}}  {h}" for w, v, h in rows]
