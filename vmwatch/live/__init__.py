"""Live hypervisor links: QEMU through its shared RAM file, QMP and the gdbstub."""
