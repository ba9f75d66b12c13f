"""SIGTERM as a scheduler's preemption notice: noted, not obeyed at once.

The handler only sets a flag. The loop sums it over the ranks with the step's totals (one
all-reduce it already does), so every rank sees the same answer after the same step even when the
signal reached them at different moments; it then writes a checkpoint of that step
(``Checkpointer.persist``) and returns normally. Under torchrun the launcher forwards SIGTERM to
every rank and kills what is left 30 s later, which bounds how long that save may take.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any


class Preemption:
    """``with Preemption() as p:`` ... ``p.requested``: whether SIGTERM arrived meanwhile. Only the
    main thread can install a handler; elsewhere (a trainer run from a thread) SIGTERM keeps its
    default action."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True

    def __enter__(self) -> Preemption:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._note)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
