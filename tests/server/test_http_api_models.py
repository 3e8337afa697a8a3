"""The HTTP API's request models and its per-user rate, without a server."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.exceptions import RequestValidationError
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from server.http_api import NewAvatar, PersonaChoice, UserRates, enabled_persona
from tests.personas import BUILTIN_IDS, builtin_catalogue

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


@given(st.dictionaries(st.sampled_from(["personality", "name", "mood"]), JSON, max_size=3))
def test_a_persona_choice_takes_exactly_a_personality_and_nothing_else(body: Any) -> None:
    # the catalogue is checked by the route (`enabled_persona`): it is data that changes
    valid = set(body) == {"personality"} and body["personality"] in BUILTIN_IDS
    try:
        choice = PersonaChoice.model_validate(body)
    except ValidationError as exc:
        assert not valid, exc
        assert all(error["loc"] for error in exc.errors())
    else:
        assert set(body) == {"personality"} and choice.personality == body["personality"]


@given(st.text(max_size=80))
def test_any_text_that_is_not_an_enabled_persona_is_an_invalid_persona(text: str) -> None:
    catalogue = builtin_catalogue()
    if text in BUILTIN_IDS:
        assert enabled_persona(catalogue, text) == text
        return
    with pytest.raises(RequestValidationError) as caught:
        enabled_persona(catalogue, text)
    [error] = caught.value.errors()
    assert error["type"] == "invalid_persona" and error["loc"] == ("body", "personality")


@pytest.mark.parametrize(
    ("name", "kind"),
    [("", "too_short"), ("x" * 65, "too_long"), ("a\x00b", "value_error")],
)
def test_an_avatar_name_follows_the_frames_rules(name: str, kind: str) -> None:
    with pytest.raises(ValidationError) as caught:
        NewAvatar.model_validate({"name": name, "personality": "witty"})
    assert [error["type"] for error in caught.value.errors()] == [kind]


def test_the_rate_is_per_user_with_the_sockets_burst_and_refill() -> None:
    rates = UserRates(rate=2.0, burst=3)
    assert [rates.wait_s("a", 0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert rates.wait_s("a", 0.0) == pytest.approx(0.5)
    assert rates.wait_s("b", 0.0) == 0.0  # another user has a bucket of their own
    assert rates.wait_s("a", 0.5) == 0.0  # half a second later: one more token


def test_idle_users_are_forgotten() -> None:
    rates = UserRates(rate=1.0, burst=2)
    for index in range(UserRates.SWEEP_EVERY - 1):
        rates.wait_s(f"user-{index}", 0.0)
    rates.wait_s("late", 10.0)  # everyone else's bucket has been full for 8 s
    assert set(rates._buckets) == {"late"}
