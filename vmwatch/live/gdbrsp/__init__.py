"""gdb remote serial protocol: sans-IO core (``_proto``) and trio wrapper (``_trio``)."""

from vmwatch.live.gdbrsp._trio import GdbConnection as GdbConnection
from vmwatch.live.gdbrsp._trio import RemoteError as RemoteError
from vmwatch.live.gdbrsp._trio import open_gdb as open_gdb
