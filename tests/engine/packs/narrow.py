"""A test pack: the same breakpoint, once narrowed to a process name and once for everyone."""

from vmwatch.rules import rule


@rule.on_breakpoint("__x64_sys_newuname", comm="uname")
def uname_by_uname(event, guest):
    """uname(2) called by a process named uname."""
    cur = guest.current
    guest.alert("info", f"narrowed: uname(2) by {cur.comm} pid {cur.pid}", cr3=hex(cur.cr3 or 0))


@rule.on_breakpoint("__x64_sys_newuname")
def uname_by_anyone(event, guest):
    """uname(2) called by anyone."""
    cur = guest.current
    guest.alert("info", f"anyone: uname(2) by {cur.comm} pid {cur.pid}")
