"""A seeded generator of hostile frames, fast enough for 100,000 of them per run."""

from __future__ import annotations

import json
import random
import string

TYPES = ["hello", "create_avatar", "get_avatar", "set_persona", "chat", "cancel", "history", "ping"]
FIELDS = ["id", "text", "token", "name", "personality", "limit", "before", "type", "extra"]
PERSONAS = ["friendly", "playful", "caring", "witty", "professional", "romantic", "grumpy", ""]
WEIRD_STRINGS = [
    "", " ", "/", "//", "/persona", "/persona witty", "/personas", "/help", "/nope", "\u202e",
    "🙂" * 50, "\\u0000", "'; DROP TABLE messages; --", "%s%s%s", "\r\n", "\ufeff",
]  # fmt: skip
WEIRD_NUMBERS = [0, -1, 1, 2**31, 2**63, 2**64, -(2**63) - 1, 10**100, 1.5, -0.0, 1e308]


class FrameFuzzer:
    """Makes text frames: valid ones, near misses, and garbage of many kinds."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)

    def frame(self) -> str:
        kind = self.rng.random()
        if kind < 0.35:
            return json.dumps(self._near_miss())
        if kind < 0.55:
            return json.dumps(self._valid())
        if kind < 0.70:
            return json.dumps(self._value(depth=0))
        if kind < 0.78:
            return self._deep_nesting()
        if kind < 0.86:
            return self._raw_escapes()
        if kind < 0.93:
            return self._truncated()
        return self._long_string_frame()

    def _string(self, limit: int = 40) -> str:
        if self.rng.random() < 0.3:
            return self.rng.choice(WEIRD_STRINGS)
        length = self.rng.randint(0, limit)
        alphabet = string.printable + "éßλ中🙂\u200b"
        return "".join(self.rng.choice(alphabet) for _ in range(length))

    def _scalar(self) -> object:
        choice = self.rng.randint(0, 5)
        if choice == 0:
            return None
        if choice == 1:
            return self.rng.random() < 0.5
        if choice == 2:
            return self.rng.choice(WEIRD_NUMBERS)
        if choice == 3:
            return self.rng.randint(-1000, 1000)
        return self._string()

    def _value(self, depth: int) -> object:
        if depth > 3 or self.rng.random() < 0.5:
            return self._scalar()
        if self.rng.random() < 0.5:
            return [self._value(depth + 1) for _ in range(self.rng.randint(0, 4))]
        return {self._string(8): self._value(depth + 1) for _ in range(self.rng.randint(0, 4))}

    def _valid(self) -> dict[str, object]:
        kind = self.rng.choice(TYPES[1:])
        frame: dict[str, object] = {"type": kind, "id": f"v{self.rng.randint(0, 10**6)}"}
        if kind == "create_avatar":
            frame.update(name=self._string(20) or "Ava", personality=self.rng.choice(PERSONAS))
        elif kind == "set_persona":
            frame["personality"] = self.rng.choice(PERSONAS)
        elif kind == "chat":
            frame["text"] = self._string(200) or "hi"
        elif kind == "history":
            frame.update(limit=self.rng.randint(1, 100))
        return frame

    def _near_miss(self) -> dict[str, object]:
        frame = self._valid()
        for _ in range(self.rng.randint(1, 3)):
            field = self.rng.choice(FIELDS)
            if self.rng.random() < 0.3:
                frame.pop(field, None)
            else:
                frame[field] = self._value(depth=2)
        return frame

    def _deep_nesting(self) -> str:
        depth = self.rng.choice([10, 100, 1000, 5000])
        opener, closer = ('{"a":', "}") if self.rng.random() < 0.5 else ("[", "]")
        return '{"type":"chat","text":' + opener * depth + "1" + closer * depth + "}"

    def _raw_escapes(self) -> str:
        escape = self.rng.choice(
            ["\\ud800", "\\udfff", "\\ud83d\\ude00", "\\u0000", "\\uZZZZ", "\\"]
        )
        return '{"type":"chat","id":"e","text":"a' + escape + 'b"}'

    def _truncated(self) -> str:
        text = json.dumps(self._valid())
        return text[: self.rng.randint(0, max(0, len(text) - 1))]

    def _long_string_frame(self) -> str:
        length = self.rng.choice([3999, 4000, 4001, 20_000, 60_000])
        field = self.rng.choice(["text", "id", "name", "personality", "token"])
        return json.dumps({"type": self.rng.choice(TYPES), field: "x" * length})
