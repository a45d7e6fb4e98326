"""The chaos suite, CI-sized: the real worker (a child process on a tiny model), its own tansu
broker and PostgreSQL, and one scenario per test. Each counts the records sent, answered once,
answered more than once and never answered, and checks that the worker still serves a fresh
request afterwards. ``python -m benchmarks.chaos`` runs the same scenarios larger and writes
docs/reliability.md.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.chaos import scenarios
from tests.chaos.ledger import Tally
from tests.chaos.stack import Options, Stack, chaos_stack

pytestmark = [pytest.mark.kafka, pytest.mark.postgres, pytest.mark.slow]


@pytest.fixture(scope="module")
async def stack(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    from loquetier import services
    from tests.tiny import make_tiny_model

    try:
        services.broker_binary()
        services.pg_bin("postgres")
    except Exception as exc:
        pytest.skip(f"the chaos suite needs its own broker and PostgreSQL: {exc}")
    model_dir = make_tiny_model(tmp_path_factory.mktemp("chaos-tiny") / "llama")
    async with chaos_stack(model_dir, Options()) as started:
        yield started


async def run(stack: Stack, scenario: Any) -> Tally:
    if not stack.is_alive():  # a previous scenario failed with the worker down: start it again
        stack.start_worker()
        await stack.wait_serving()
    tally = await scenarios.run(stack, scenario, scenarios.CI)
    print(f"\n{tally}")
    return tally


def assert_clean(tally: Tally) -> None:
    assert tally.lost == 0, tally
    assert tally.twice == 0, tally
    assert tally.once == tally.sent, tally
    assert tally.is_alive, tally


async def test_hostile_bytes(stack: Stack) -> None:
    assert_clean(await run(stack, scenarios.hostile_bytes))


async def test_oversized_record(stack: Stack) -> None:
    assert_clean(await run(stack, scenarios.oversized_record))


async def test_duplicates(stack: Stack) -> None:
    tally = await run(stack, scenarios.duplicates)
    assert_clean(tally)
    assert tally.facts == {"computed": 2 * scenarios.CI.num_duplicated, "ids": 2 * scenarios.CI.num_duplicated}


async def test_flood(stack: Stack) -> None:
    assert_clean(await run(stack, scenarios.flood))


async def test_control_commands(stack: Stack) -> None:
    assert_clean(await run(stack, scenarios.control_commands))


async def test_cancel_storm(stack: Stack) -> None:
    tally = await run(stack, scenarios.cancel_storm)
    assert_clean(tally)
    facts = tally.facts
    assert facts["codes"] == {"unknown_target": scenarios.CI.num_cancels} and facts["real_ok"], tally
    assert facts["status"] == "cancelled" and facts["step"] < 10**6, tally


async def test_kill_while_serving(stack: Stack) -> None:
    """Requests in flight at the kill are answered once after the restart; so are those answered
    before it whose offsets were not committed (the restarted worker finds their answers on the
    results topic)."""
    tally = await run(stack, scenarios.kill_while_serving)
    assert_clean(tally)
    assert tally.facts["in_flight"] > 0 and tally.facts["in_flight_once"], tally


async def test_kill_while_training(stack: Stack) -> None:
    tally = await run(stack, scenarios.kill_while_training)
    assert_clean(tally)
    facts = tally.facts
    assert facts["status"] == "succeeded" and facts["step"] == scenarios.CI.train_steps, tally
    assert 0 < facts["resumed_from"] < scenarios.CI.train_steps and facts["attempts"] == 2, tally


async def test_poison_pill(stack: Stack) -> None:
    tally = await run(stack, scenarios.poison_pill)
    assert_clean(tally)
    assert tally.facts == {"crashes": stack.options.max_attempts, "codes": ["poisoned"]}, tally


async def test_postgres_outage(stack: Stack) -> None:
    assert_clean(await run(stack, scenarios.postgres_outage))


async def test_broker_restart(stack: Stack) -> None:
    tally = await run(stack, scenarios.broker_restart)
    assert_clean(tally)
    assert tally.facts["exit_code"] == 0 and tally.facts["stop_s"] < 10, tally


async def test_hostile_values(stack: Stack) -> None:
    """Values the wire types allow and an engine cannot take, refused one by one while the
    innocent requests next to them are served."""
    tally = await run(stack, scenarios.hostile_values)
    assert_clean(tally)
    assert tally.facts == {"accepted": [], "innocents_served": True}, tally
