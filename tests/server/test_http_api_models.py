"""The HTTP API's request models and its per-user rate, without a server."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from protocol.personas import PERSONA_IDS
from server.http_api import NewAvatar, PersonaChoice, UserRates

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


@given(st.dictionaries(st.sampled_from(["personality", "name", "mood"]), JSON, max_size=3))
def test_a_persona_choice_takes_exactly_a_catalogue_id_and_nothing_else(body: Any) -> None:
    valid = set(body) == {"personality"} and body["personality"] in PERSONA_IDS
    try:
        choice = PersonaChoice.model_validate(body)
    except ValidationError as exc:
        assert not valid, exc
        assert all(error["loc"] for error in exc.errors())
    else:
        assert valid and choice.personality == body["personality"]


@given(st.text(max_size=80))
def test_any_text_that_is_not_a_catalogue_id_is_an_invalid_persona(text: str) -> None:
    if text in PERSONA_IDS:
        return
    with pytest.raises(ValidationError) as caught:
        PersonaChoice.model_validate({"personality": text})
    [error] = caught.value.errors()
    assert error["type"] in ("invalid_persona", "too_long", "value_error")


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
