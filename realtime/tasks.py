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
