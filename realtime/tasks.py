"""Small helpers for the background tasks each component owns."""
from __future__ import annotations

import asyncio


async def cancel_and_wait(task: asyncio.Task | None, timeout: float = 5.0) -> None:
    """Cancel a task this component started and wait until it has ended, at
    most `timeout`. Not by catching CancelledError: that would also swallow a
    cancellation of the caller (a shutdown's bounded wait), which then never
    ends if the task does not."""
    if task is None:
        return
    task.cancel()
    await asyncio.wait([task], timeout=timeout)


class Signal:
    """asyncio.Event's set/clear/is_set for one waiter, whose wait can time
    out without asyncio.wait_for: that wraps every wait in a task of its own,
    and the tick loop waits some 20 times a second in every worker."""

    __slots__ = ("_set", "_waiter")

    def __init__(self):
        self._set = False
        self._waiter: asyncio.Future | None = None

    def set(self) -> None:
        self._set = True
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(True)

    def clear(self) -> None:
        self._set = False

    def is_set(self) -> bool:
        return self._set

    async def wait(self, timeout: float) -> bool:
        """True once set, False after `timeout` seconds; one waiter at a time."""
        if self._set:
            return True
        if self._waiter is not None:
            raise RuntimeError("Signal.wait: another task is waiting")
        loop = asyncio.get_running_loop()
        w = self._waiter = loop.create_future()
        timer = loop.call_later(timeout, _time_up, w)
        try:
            return await w
        finally:
            timer.cancel()
            self._waiter = None


def _time_up(w: asyncio.Future) -> None:
    if not w.done():
        w.set_result(False)
