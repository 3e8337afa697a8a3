"""Reply rendering as pure functions: the template reply, and (for LLMs) the prompt."""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from protocol.personas import PersonaCard

TOPIC_WORDS = 8
TOPIC_CHARS = 60
EARLIER_CHARS = 40
_WORDS = re.compile(r"[^\W_]+(?:['’-][^\W_]+)*")  # noqa: RUF001


Role = Literal["user", "assistant"]


@dataclass(frozen=True, slots=True)
class PastMessage:
    """One earlier message of the conversation, as a generator sees it."""

    role: Role
    text: str


def topic_of(text: str) -> str:
    """The first few words of a message, for the reply to reflect back."""
    words = _WORDS.findall(text)[:TOPIC_WORDS]
    if not words:
        return "that"
    return _cut(" ".join(words), TOPIC_CHARS)  # words hold no whitespace: nothing to squeeze


def _fit_case(topic: str, at_start: bool) -> str:
    """Capitalise a topic that opens a sentence; lower-case one that does not (but not "I" or
    an acronym), so that "It rained" reads "so it rained" mid-sentence."""
    first, _, rest = topic.partition(" ")
    if at_start:
        return topic[:1].upper() + topic[1:]
    if first == "I" or (len(first) > 1 and first.isupper()):
        return topic
    return " ".join(filter(None, (first[:1].lower() + first[1:], rest)))


def _clip(text: str, limit: int) -> str:
    """`text` with its whitespace squeezed, cut to `limit` characters."""
    return _cut(" ".join(text.split()), limit)


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def template_reply(card: PersonaCard, text: str, recent: Sequence[PastMessage]) -> list[str]:
    """A deterministic reply in the persona's voice, as pieces that join into the whole text.

    The same card, text and recent turns always give the same reply; two cards never give the
    same reply to the same text, since every piece comes from the card.
    """
    seed = zlib.crc32(text.encode("utf-8"))
    reflection = card.reflections[(seed // 7) % len(card.reflections)]
    topic = _fit_case(topic_of(text), at_start=reflection.startswith("{topic}"))
    pieces = [
        card.openers[seed % len(card.openers)] + " ",
        reflection.replace("{topic}", topic) + " ",
    ]
    earlier = _last_user_text(recent)
    if earlier is not None:
        pieces.append(card.callback.replace("{earlier}", _clip(earlier, EARLIER_CHARS)) + " ")
    pieces.append(card.follow_ups[(seed // 49) % len(card.follow_ups)] + " ")
    pieces.append(card.sign_off)
    return pieces


def _last_user_text(recent: Sequence[PastMessage]) -> str | None:
    for message in reversed(recent):
        if message.role == "user":
            return message.text
    return None


ChatMessage = dict[str, str]


def persona_system_prompt(card: PersonaCard) -> str:
    """The system message for a persona: who it is, how it talks, and lines in its voice."""
    sections = [card.system_prompt, f"About you: {card.description}"]
    if card.style_rules:
        sections.append("Style rules:\n" + "\n".join(f"- {rule}" for rule in card.style_rules))
    if card.example_lines:
        sections.append(
            "Example lines in your voice:\n" + "\n".join(f"- {line}" for line in card.example_lines)
        )
    return "\n\n".join(sections)


def build_prompt(card: PersonaCard, recent: Sequence[PastMessage], text: str) -> list[ChatMessage]:
    """The OpenAI chat messages for one turn, rendered afresh from the card every time.

    The persona's system prompt, the recent history (oldest first; blank messages are left
    out), the user's text, then the persona's post-history instruction as a last system message.
    """
    messages = [{"role": "system", "content": persona_system_prompt(card)}]
    messages.extend({"role": m.role, "content": m.text} for m in recent if m.text.strip())
    messages.append({"role": "user", "content": text})
    if card.post_history_instruction:
        messages.append({"role": "system", "content": card.post_history_instruction})
    return messages
