"""What the stream worker asks before streaming: ``ha.mode`` decides.

``single`` and ``redundant`` always stream and touch no lease; ``standby`` streams only while it
holds the lease (``lease.LeaseKeeper``). pymongo is imported in standby mode only, so the stream
worker of a single daemon stays as light as before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from ingestd.config.schema import Settings
from ingestd.control.runstate import utc_text

if TYPE_CHECKING:
    from ingestd.control.lease import LeaseKeeper, LeaseView, Takeover


class LeaseGate(Protocol):
    drain_budget: float  # seconds a stand-down may still read: less than the lease's margin

    def may_stream(self) -> bool: ...
    def stand_down_why(self) -> str | None: ...
    def takeovers(self) -> list[Takeover]: ...
    def state(self, reader_state: str) -> str: ...
    def view(self) -> dict[str, Any]: ...
    def close(self) -> None: ...


class OpenGate:
    """``single`` or ``redundant``: stream always; ``role`` is the mode itself."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.drain_budget = 0.0  # never stands down

    def may_stream(self) -> bool:
        return True

    def stand_down_why(self) -> str | None:
        return None

    def takeovers(self) -> list[Takeover]:
        return []

    def state(self, reader_state: str) -> str:
        return reader_state

    def view(self) -> dict[str, Any]:
        return {"mode": self.mode, "role": self.mode}

    def close(self) -> None:
        pass


class StandbyGate:
    """``standby``: stream only under a valid lease. A takeover not yet handed to the stream
    loop (``takeovers``) holds the stream back, so it is recorded before the first new byte."""

    def __init__(self, keeper: LeaseKeeper, instance: str) -> None:
        self.keeper, self.instance = keeper, instance
        self.drain_budget = keeper.drain_budget
        self.closed = False  # the stream worker is stopping: the last status says so

    def may_stream(self) -> bool:
        return not self.keeper.elector.takeovers and self.keeper.may_stream()

    def takeovers(self) -> list[Takeover]:
        return self.keeper.take_takeovers()

    def stand_down_why(self) -> str | None:
        """Why this instance may not stream (the stand-down gap's ``lease`` detail)."""
        view = self.keeper.elector.view
        if view.last_error:
            return "unreachable"
        return "lost" if view.holder not in (None, self.instance) else "lapsed"

    def state(self, reader_state: str) -> str:
        view = self.keeper.elector.view
        if self.closed:
            return stopped_state(view)
        if self.keeper.may_stream():
            return reader_state
        if view.last_error:  # nobody may be streaming: the operator must know
            return f"degraded: lease unreachable ({view.last_error}); not streaming"
        if view.conflict:
            return f"degraded: {view.conflict}; standing by"
        return (f"standby: lease held by {view.holder}" if view.holder
                else "standby: acquiring the lease")

    def view(self) -> dict[str, Any]:
        view = self.keeper.view()
        if self.closed and view["role"] != "released":  # no release (a stuck lease step)
            view.update(role="stopped", holder=None)
        elif view["role"] == "active" and not self.keeper.may_stream():
            view["role"] = "standby"  # the lease lapsed; the thread has not noticed yet
        return {"mode": "standby", "instance": self.instance, "lease": self.keeper.elector.key,
                **view}

    def close(self) -> None:
        self.closed = True
        self.keeper.close()


def stopped_state(view: LeaseView) -> str:
    """A stopped instance's last word on the lease: released, or not its own; never held."""
    if view.role == "released":
        return f"stopped: lease released at {utc_text(view.released_at)} (was the active)"
    if view.role == "stopped":
        return f"stopped: was standing by (lease last held by {view.last_holder or '-'})"
    return "stopped: lease not released (a lease step was stuck); it lapses by itself"


def open_gate(settings: Settings, last_recv_ns: Callable[[], int]) -> LeaseGate:
    ha = settings.ha
    if ha.mode != "standby":
        return OpenGate(ha.mode)
    from ingestd.control.lease import start_lease  # pymongo: standby mode only

    return StandbyGate(start_lease(settings.mongo, ha, last_recv_ns, settings.state_dir),
                       ha.instance)
