"""``vmwatch gdbserver``: gdb as a client of vmwatch's view of a guest (dump or live QEMU).

``_proto`` is the sans-IO server side of the remote serial protocol, ``amd64`` the register file
gdb is shown, ``serve`` the trio loop that answers from a debug session.
"""
