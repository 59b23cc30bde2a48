"""Hysteresis on the reported state, so that one noisy window does not flap ``system.state``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from ..model.contract import UNKNOWN_STATE

@dataclass(frozen=True, slots=True)
class Transition:
    """The reported state changed this window."""

    from_state: str
    to_state: str
    windows: int  # consecutive windows the new state had won when it was accepted


@dataclass(frozen=True, slots=True)
class Debounced:
    state: str                       # the state to report (attach to data points)
    raw_state: str                   # what the model said this window
    transition: Transition | None    # set on the window the reported state changes
    pending: str | None              # a challenger that has not won enough windows yet
    pending_windows: int


class StateDebouncer:
    """Hysteresis on the state, so that one noisy window does not flap ``system.state``.

    Rule: the reported state changes to X only after X was the model's state in N *consecutive* windows;
    any other state in between restarts the count. N is ``enter_windows`` when leaving a baseline state
    (``normal`` by default) — entering an incident — and ``exit_windows`` when leaving any other state, so an
    incident is sticky and ends only when the host has looked like something else for a while.
    Before any state has been confirmed the reported state is ``initial`` (``unknown``: we do not know yet)
    and the first state to win ``enter_windows`` windows is adopted.

    With the defaults (2, 3): normal, flood, normal, normal  → normal throughout (one window is noise);
    normal, flood, flood → flood on the 2nd flood; flood, normal, normal, normal → normal on the 3rd normal.
    """

    def __init__(self, enter_windows: int = 2, exit_windows: int = 3, *,
                 baseline: Iterable[str] = ("normal",), initial: str = UNKNOWN_STATE) -> None:
        if enter_windows < 1 or exit_windows < 1:
            raise ValueError("enter_windows and exit_windows must be >= 1")
        self.enter_windows = enter_windows
        self.exit_windows = exit_windows
        self.baseline = frozenset(baseline)
        self.state = initial
        self._confirmed = False
        self._pending: str | None = None
        self._count = 0

    def _needed(self) -> int:
        if not self._confirmed or self.state in self.baseline:
            return self.enter_windows
        return self.exit_windows

    def update(self, raw_state: str) -> Debounced:
        transition = None
        if raw_state == self.state:
            self._pending, self._count = None, 0
            self._confirmed = True
        else:
            if raw_state == self._pending:
                self._count += 1
            else:
                self._pending, self._count = raw_state, 1
            if self._count >= self._needed():
                transition = Transition(self.state, raw_state, self._count)
                self.state, self._confirmed = raw_state, True
                self._pending, self._count = None, 0
        return Debounced(self.state, raw_state, transition, self._pending, self._count)

    def reset(self, initial: str = UNKNOWN_STATE) -> None:
        self.state, self._confirmed, self._pending, self._count = initial, False, None, 0
