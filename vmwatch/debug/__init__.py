"""Single-step debugging of a live guest, or read-only inspection of a memory image.

``session`` is the async core (``control``: its step, continue and breakpoints), ``sync`` the
blocking facade for notebooks, ``shell`` the command interpreter behind ``vmwatch debug``.
"""

from vmwatch.debug.session import DebugSession as DebugSession
from vmwatch.debug.sync import Debugger as Debugger
