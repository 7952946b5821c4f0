"""The event-loop lag metric: a loop blocked for a known time shows that lag."""

from __future__ import annotations

import asyncio
import time

from service.metrics import Metrics, watch_event_loop

BLOCKED_S = 0.3


def _sample(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.split()[-1])
    raise AssertionError(f"{name} not exported")


def test_a_blocked_event_loop_shows_in_the_lag_histogram():
    metrics = Metrics()

    async def main() -> None:
        watch = asyncio.create_task(watch_event_loop(metrics, interval=0.02))
        await asyncio.sleep(0.1)  # a few on-time samples first
        time.sleep(BLOCKED_S)  # the loop runs nothing else meanwhile
        await asyncio.sleep(0.1)
        watch.cancel()

    asyncio.run(main())
    text = metrics.render()[0].decode()
    count = _sample(text, "facegate_event_loop_lag_seconds_count")
    under = _sample(text, 'facegate_event_loop_lag_seconds_bucket{le="0.15"}')
    assert count >= 5 and count - under == 1  # the one late wake-up, and only it
    late = _sample(text, "facegate_event_loop_lag_seconds_sum")
    assert BLOCKED_S - 0.05 <= late <= BLOCKED_S + 0.1
