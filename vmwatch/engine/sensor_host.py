"""What the pump offers its sensors while they plan, so sensors depend on this and not on the pump."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from vmwatch.engine.dispatch import Dispatcher, Handler, RuleRun, Trap
    from vmwatch.engine.guest import Guest


class SensorHost(Protocol):
    """The engine as a sensor's ``plan(engine, wanted)`` sees it (its part in ``vmwatch.engine.arming``)."""

    source: Any
    capabilities: frozenset[str]
    dispatcher: Dispatcher
    guest: Guest

    def inactive(self, what: str, why: str) -> None:
        """Report a sensor that cannot work on this source."""

    def sensor_run(self, name: str) -> RuleRun:
        """The bookkeeping run the sensor's derived events are counted under."""

    async def add_trap(self, trap: Trap, handler: Handler) -> Trap:
        """Arm ``trap`` and route its events to ``handler``."""
