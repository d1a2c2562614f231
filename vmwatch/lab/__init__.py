"""The lab guest: a small real Linux VM (QEMU + Debian kernel + busybox initramfs), built and cached by vmwatch."""

from vmwatch.lab.vm import LabConfig, LabGuest

__all__ = ["LabConfig", "LabGuest"]
