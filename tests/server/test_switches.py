"""A session's switches in flight: which one decides the persona, and who waits for them."""

from __future__ import annotations

import asyncio

from server.records import Switch
from server.switches import MAX_IN_FLIGHT, SwitchesInFlight


def _switch(personality: str) -> Switch:
    return Switch("user", personality, "")


async def test_the_newest_switch_decides_until_it_is_answered() -> None:
    switches = SwitchesInFlight()
    first, second = _switch("witty"), _switch("caring")
    switches.started(first)
    switches.started(second)
    switches.answered(first)
    assert switches.newest is second
    switches.answered(second)
    assert switches.newest is None


async def test_waiting_for_all_ends_when_the_last_one_is_answered() -> None:
    switches = SwitchesInFlight()
    first, second = _switch("witty"), _switch("caring")
    switches.started(first)
    switches.started(second)
    waiting = asyncio.ensure_future(switches.all_answered())
    switches.answered(first)
    await asyncio.sleep(0)
    assert not waiting.done()
    switches.answered(second)
    await asyncio.wait_for(waiting, 1)


async def test_a_waiter_that_gives_up_does_not_break_the_next_answer() -> None:
    switches = SwitchesInFlight()
    switch = _switch("witty")
    switches.started(switch)
    waiting = asyncio.ensure_future(switches.all_answered())
    await asyncio.sleep(0)
    waiting.cancel()
    switches.answered(switch)
    await asyncio.wait_for(switches.all_answered(), 1)  # nothing in flight: returns at once


def test_the_set_is_full_at_its_bound() -> None:
    switches = SwitchesInFlight()
    for _ in range(MAX_IN_FLIGHT - 1):
        switches.started(_switch("witty"))
    assert not switches.full
    switches.started(_switch("witty"))
    assert switches.full
