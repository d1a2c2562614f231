"""QEMU Machine Protocol: a sans-IO core (``_proto``), a trio client (``_trio``) and a blocking one (``_sync``)."""

from vmwatch.live.qmp._proto import QmpError

__all__ = ["QmpError", "open_qmp"]


def __getattr__(name: str) -> object:
    # trio is only imported by callers that want the async client.
    if name == "open_qmp":
        from vmwatch.live.qmp._trio import open_qmp

        return open_qmp
    raise AttributeError(name)
