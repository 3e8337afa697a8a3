"""Character Cards as pure data: V1, V2, V3 and this project's card file parsed with one-line
errors that name the field path, exported as V2 or V3 keeping what was written, and the
template generator's material, kept in `data.extensions["persona_chat"]` of any card."""

from __future__ import annotations

import json
import math
import re
import unicodedata
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PlainValidator
from pydantic import ValidationError as _ValidationError
from pydantic_core import PydanticCustomError

from protocol.errors import ClientError

MAX_CARD_BYTES = 256 * 1024  # a card's JSON, encoded as UTF-8
EXTENSION = "persona_chat"  # the key of the template material in data.extensions
PROJECT_MARK = "persona_chat_card"  # the key (value: 1) that marks this project's card file
SPEC_V2, SPEC_V3 = "chara_card_v2", "chara_card_v3"
SLUG_RULE = "1-64 characters of a-z, 0-9, _ and -, starting with a letter or a digit"
_SLUG = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
BACKFILL_NOTE = (
    "This character card is Character Card V3, but it is loaded as a Character Card V2."
    " Please use a Character Card V3 compatible application to use this character card properly."
)
Spec = Literal["v1", "v2", "v3"]
Path = tuple[str | int, ...]
_M = TypeVar("_M", bound=BaseModel)


class CardError(ClientError):
    """A card that cannot be imported: one line, `[file: ]path: reason`."""

    code = "invalid_card"
    status = 422
    default_message = "not a valid character card"

    def __init__(self, path: str, reason: str, file: str | None = None) -> None:
        self.path, self.reason, self.file = path, reason, file
        line = f"{path}: {reason}" if path else reason
        super().__init__(f"{file}: {line}" if file else line, details={"path": path})

    def in_file(self, file: str) -> CardError:
        """The same error, naming the file it came from."""
        return CardError(self.path, self.reason, file)


def field_path(parts: Path) -> str:
    """`("data", "tags", 2)` as `data.tags[2]`; a key that is not a plain name is quoted."""
    text = ""
    for part in parts:
        if isinstance(part, int):
            text += f"[{part}]"
        elif _NAME.fullmatch(part):
            text += f".{part}" if text else part
        else:
            text += f"[{json.dumps(part)}]"
    return text if text[:1].isalpha() else f"card{text}"  # `card[0]` for a list at the top


def _number(value: object) -> int | float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PydanticCustomError("number_type", "expected a number")
    return value


def _not_blank(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError("blank", "must not be empty")
    return value


def _slot(slot: str) -> Any:
    def check(value: str) -> str:
        if value.count(slot) != 1:
            raise PydanticCustomError("slot", "must contain {slot} once", {"slot": slot})
        return value

    return AfterValidator(check)


Number = Annotated[int | float, PlainValidator(_number)]
Name = Annotated[str, AfterValidator(_not_blank)]
Lines = Annotated[list[str], Field(min_length=1)]


class _Kept(BaseModel):
    """A JSON object of a card: known fields checked, unknown ones kept as written."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)


class LorebookEntry(_Kept):
    keys: list[str]
    content: str
    extensions: dict[str, Any] = {}
    enabled: bool = True
    insertion_order: Number = 0
    case_sensitive: bool | None = None
    use_regex: bool | None = None
    constant: bool | None = None
    name: str | None = None
    priority: Number | None = None
    comment: str | None = None
    selective: bool | None = None
    secondary_keys: list[str] | None = None
    position: str | None = None


class Lorebook(_Kept):
    name: str | None = None
    description: str | None = None
    scan_depth: Number | None = None
    token_budget: Number | None = None
    recursive_scanning: bool | None = None
    extensions: dict[str, Any] = {}
    entries: list[LorebookEntry]


class Asset(_Kept):
    type: str
    uri: str
    name: str
    ext: str


class CardV1(_Kept):
    """A card with no `spec`: the six V1 fields at the top level."""

    name: Name
    description: str = ""
    personality: str = ""
    scenario: str = ""
    first_mes: str = ""
    mes_example: str = ""


class CardData(CardV1):
    """The `data` of a V2 or V3 card (V3 is a superset; its own fields are optional here)."""

    creator_notes: str = ""
    system_prompt: str = ""
    post_history_instructions: str = ""
    alternate_greetings: list[str] = []
    character_book: Lorebook | None = None
    tags: list[str] = []
    creator: str = ""
    character_version: str = ""
    extensions: dict[str, Any] = {}
    assets: list[Asset] | None = None
    nickname: str | None = None
    creator_notes_multilingual: dict[str, str] | None = None
    source: list[str] | None = None
    group_only_greetings: list[str] = []
    creation_date: Number | None = None
    modification_date: Number | None = None


class CardV2(_Kept):
    spec: Literal["chara_card_v2"]
    spec_version: str = "2.0"
    data: CardData


class CardV3(_Kept):
    spec: Literal["chara_card_v3"]
    spec_version: str = "3.0"
    data: CardData


V1_FIELDS = tuple(CardV1.model_fields)
V2_FIELDS = (
    *V1_FIELDS,
    "creator_notes",
    "system_prompt",
    "post_history_instructions",
    "alternate_greetings",
    "tags",
    "creator",
    "character_version",
    "extensions",
)  # every one is mandatory in V2; V3 adds group_only_greetings


class PersonaMaterial(BaseModel):
    """What the template generator builds a reply from (see protocol/personas.py), plus the
    persona's style rules and example lines; every field is optional (defaults below)."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    style_rules: list[str] | None = None
    example_lines: list[str] | None = None  # default: the {{char}} lines of mes_example
    openers: Lines | None = None
    reflections: Annotated[list[Annotated[str, _slot("{topic}")]], Field(min_length=1)] | None = (
        None
    )
    questions: Annotated[list[Annotated[str, _slot("{topic}")]], Field(min_length=1)] | None = None
    wordless: Lines | None = None
    follow_ups: Lines | None = None
    callback: Annotated[str, _slot("{earlier}")] | None = None
    sign_off: str | None = None
    switched: str | None = None


@dataclass(frozen=True, slots=True)
class ParsedCard:
    """A validated card: the model as written, its fields as V2/V3 `data`, and how it came."""

    spec: Spec  # how it was written
    card: CardV1 | CardV2 | CardV3
    data: CardData  # for a V1 card: its six fields
    material: PersonaMaterial | None  # data.extensions["persona_chat"], when there
    notes: tuple[str, ...] = ()  # said on import (a V1 card, a newer spec_version)
    id: str | None = None  # given by this project's card file
    enabled: bool = True

    @property
    def name(self) -> str:
        return self.data.name

    @property
    def persona_id(self) -> str:
        """The id the file gave, else a slug of the name."""
        return self.id if self.id is not None else slug_for(self.data.name)


@dataclass(frozen=True, slots=True)
class PersonaCard:
    """Everything a reply generator needs to speak as one personality.

    Every text keeps its macros as written (`{{char}}`, `{{user}}`, `<BOT>`, `<USER>`): they
    are filled at render time (`fill_macros`), with the avatar's name and the user's."""

    id: str
    name: str
    description: str
    system_prompt: str  # the card's own, or DEFAULT_SYSTEM_PROMPT ({{original}} filled)
    greeting: str  # first_mes, as written (see `greeting_for`)
    style_rules: tuple[str, ...]
    example_lines: tuple[str, ...]  # what {{char}} says, one line each
    post_history_instruction: str
    # The template generator builds a reply from these: an opener, a way to reflect the
    # user's words back, a follow-up, and a sign-off. Several of each keep it varied. Every
    # line is whole sentences. "{topic}" and "{earlier}" stand for whole words the user typed
    # (a statement, a question without its mark, one word, an emoji), so the lines quote
    # them rather than build a sentence around them.
    openers: tuple[str, ...]
    reflections: tuple[str, ...]  # for a statement: "{topic}"
    questions: tuple[str, ...]  # for a question: "{topic}", the question mark is in the line
    wordless: tuple[str, ...]  # for a message without words (only punctuation, say)
    follow_ups: tuple[str, ...]
    callback: str  # how the persona recalls an earlier message: "{earlier}"
    sign_off: str
    switched: str  # opens the first reply after a switch to this persona: "Switching gears: ..."
    personality: str = ""
    scenario: str = ""
    example_blocks: tuple[str, ...] = ()  # mes_example split on <START>, each block as written
    # Whether a template line holds a macro (else a template reply fills none): set from the
    # lines, so that a card changed with dataclasses.replace is right too.
    line_macros: bool = field(init=False, default=False)

    def __post_init__(self) -> None:
        lines = (
            *self.openers,
            *self.reflections,
            *self.questions,
            *self.wordless,
            *self.follow_ups,
            self.callback,
            self.sign_off,
            self.switched,
        )
        object.__setattr__(self, "line_macros", any(map(has_macros, lines)))


DEFAULT_SYSTEM_PROMPT = (
    "Write {{char}}'s next reply in a fictional chat between {{char}} and {{user}}."
)
DEFAULT_USER_NAME = "User"  # what {{user}} becomes when the user's name is not known
# {{char}} or <BOT> (group 1 or 2: the character), {{user}} or <USER>, in any case.
_MACRO = re.compile(r"\{\{(?:(char)|user)\}\}|<(?:(bot)|user)>", re.IGNORECASE)
_ORIGINAL = re.compile(r"\{\{original\}\}", re.IGNORECASE)


def has_macros(text: str) -> bool:
    """Whether `text` holds {{char}}, {{user}}, <BOT> or <USER> (in any case)."""
    return ("{{" in text or "<" in text) and _MACRO.search(text) is not None


def fill_macros(text: str, char: str, user: str) -> str:
    """`text` with {{char}} and <BOT> as `char`, {{user}} and <USER> as `user` (any case), in
    one pass: a name that looks like a macro stays as it is."""
    if "{{" not in text and "<" not in text:
        return text
    return _MACRO.sub(lambda found: char if found.group(1) or found.group(2) else user, text)


def greeting_for(card: PersonaCard, avatar_name: str, user_name: str) -> str:
    """The card's greeting (first_mes) as the avatar `avatar_name` says it to `user_name`
    (the card's name and DEFAULT_USER_NAME when empty); "" when the card has none."""
    return fill_macros(
        card.greeting, avatar_name or card.name, user_name or DEFAULT_USER_NAME
    ).strip()


def is_slug(text: str) -> bool:
    """Whether `text` is a persona id: 1-64 of [a-z0-9_-], starting with [a-z0-9]."""
    return _SLUG.fullmatch(text) is not None


def slug_for(name: str) -> str:
    """A persona id made from a name: "Zoë the Bold!" -> "zoe-the-bold" ("persona" if none)."""
    ascii_name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9]+", "-", ascii_name.lower()).strip("-")[:64].rstrip("-")
    return slug or "persona"


def parse_card(value: object) -> ParsedCard:
    """A card read from JSON or TOML: this project's card file, V3, V2 or V1 (no `spec`).

    Raises CardError naming the first bad field's path (`data.tags[2]: expected a string`)."""
    _check_json(value)
    if isinstance(value, dict) and PROJECT_MARK in value:
        return _parse_project(value)
    parsed = _parse(value, ())
    size = len(json.dumps(value, ensure_ascii=False).encode())
    if size > MAX_CARD_BYTES:
        raise CardError("card", f"over 256 KiB ({size} bytes)")
    return parsed


def _parse(value: object, at: Path) -> ParsedCard:
    if not isinstance(value, dict):
        raise CardError(field_path(at), "expected an object (a character card)")
    if "spec" not in value:
        v1 = _validate(CardV1, value, at)
        data = _validate(CardData, {k: value[k] for k in V1_FIELDS if k in value}, at)
        note = "no spec: read as a Character Card V1"
        return ParsedCard("v1", v1, data, None, (note,))
    spec = value["spec"]
    if spec not in (SPEC_V2, SPEC_V3):
        reason = f'expected "{SPEC_V2}" or "{SPEC_V3}" (or no spec, for V1)'
        raise CardError(field_path((*at, "spec")), reason)
    card: CardV2 | CardV3
    notes: tuple[str, ...] = ()
    if spec == SPEC_V2:
        card = _validate(CardV2, _trim_backfill(value), at)
    else:
        card = _validate(CardV3, value, at)
        notes = _newer(card.spec_version)
    material = None
    if EXTENSION in card.data.extensions:
        where = (*at, "data", "extensions", EXTENSION)
        material = _validate(PersonaMaterial, card.data.extensions[EXTENSION], where)
    return ParsedCard("v2" if spec == SPEC_V2 else "v3", card, card.data, material, notes)


def _parse_project(value: dict[str, Any]) -> ParsedCard:
    if value[PROJECT_MARK] != 1 or isinstance(value[PROJECT_MARK], bool):
        raise CardError(PROJECT_MARK, "expected 1 (the version of this format)")
    for key in value:
        if key not in (PROJECT_MARK, "id", "enabled", "card"):
            raise CardError(field_path((key,)), "unknown field (id, enabled and card are known)")
    ident = value.get("id")
    if ident is not None and not isinstance(ident, str):
        raise CardError("id", "expected a string")
    if ident is not None and not is_slug(ident):
        raise CardError("id", f"expected a slug: {SLUG_RULE}")
    enabled = value.get("enabled", True)
    if not isinstance(enabled, bool):
        raise CardError("enabled", "expected true or false")
    if "card" not in value:
        raise CardError("card", "required")
    parsed = _parse(value["card"], ("card",))
    size = len(json.dumps(value["card"], ensure_ascii=False).encode())
    if size > MAX_CARD_BYTES:
        raise CardError("card", f"over 256 KiB ({size} bytes)")
    return ParsedCard(
        parsed.spec, parsed.card, parsed.data, parsed.material, parsed.notes, ident, enabled
    )


def _validate(model: type[_M], value: object, at: Path) -> _M:
    try:
        return model.model_validate(value)
    except _ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        raise CardError(field_path((*at, *error["loc"])), _reason(error)) from None


_REASONS = {
    "missing": "required",
    "string_type": "expected a string",
    "list_type": "expected a list",
    "dict_type": "expected an object",
    "model_type": "expected an object",
    "bool_type": "expected true or false",
    "too_short": "must not be empty",
}


def _reason(error: Any) -> str:
    reason = _REASONS.get(error["type"]) or str(error["msg"])
    return " ".join(reason.split())


def _newer(spec_version: str) -> tuple[str, ...]:
    try:
        newer = float(spec_version) > 3.0
    except ValueError:
        newer = False
    if newer:
        return (f"spec_version {spec_version} is newer than 3.0: fields it adds are kept",)
    return ()


def _trim_backfill(value: dict[str, Any]) -> dict[str, Any]:
    """A V2 card backfilled from a V3 one, without the warning the backfill added."""
    data = value.get("data")
    if not isinstance(data, dict):
        return value
    notes = data.get("creator_notes")
    if not isinstance(notes, str) or not notes.startswith(BACKFILL_NOTE):
        return value
    return {**value, "data": {**data, "creator_notes": notes[len(BACKFILL_NOTE) :].lstrip("\n")}}


def _check_json(value: object) -> None:
    """CardError unless `value` is plain JSON (no TOML dates, no NaN), checked without recursion."""
    stack: list[tuple[object, Path]] = [(value, ())]
    while stack:
        item, at = stack.pop()
        if isinstance(item, dict):
            for key, inner in item.items():
                if not isinstance(key, str) or not _is_text(key):
                    raise CardError(field_path(at), "keys must be strings of valid Unicode")
                stack.append((inner, (*at, key)))
        elif isinstance(item, list):
            stack.extend((inner, (*at, index)) for index, inner in enumerate(item))
        elif isinstance(item, str) and not _is_text(item):
            raise CardError(field_path(at), "not valid Unicode text (a lone surrogate)")
        elif isinstance(item, float) and not math.isfinite(item):
            raise CardError(field_path(at), "expected a finite number")
        elif item is not None and not isinstance(item, str | int | float):
            kind = type(item).__name__
            raise CardError(field_path(at), f"expected a JSON value, not a {kind}")


def _is_text(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def export_card(parsed: ParsedCard, spec: Literal["v2", "v3"] = "v3") -> dict[str, Any]:
    """The card as a V2 or V3 JSON object: every field as written (unknown ones and
    `extensions` too), plus the target spec's mandatory fields that were missing."""
    written = parsed.card.model_dump(mode="json", exclude_unset=True)
    target = SPEC_V3 if spec == "v3" else SPEC_V2
    if parsed.spec == "v1":
        data = {key: written[key] for key in V1_FIELDS if key in written}
        card = {"spec": target, "spec_version": "3.0" if spec == "v3" else "2.0", **written}
        card["data"] = data
    else:
        card = written
        if parsed.spec != spec or "spec_version" not in card:
            card["spec"], card["spec_version"] = target, "3.0" if spec == "v3" else "2.0"
        data = card["data"]
    for key in (*V2_FIELDS, *(("group_only_greetings",) if spec == "v3" else ())):
        if key not in data:
            data[key] = (
                [] if key.endswith(("greetings", "tags")) else {} if key == "extensions" else ""
            )
    return card


def backfill_v2(parsed: ParsedCard) -> dict[str, Any]:
    """The V2 card that goes beside a V3 one (a PNG's `chara` chunk), saying it is a backfill."""
    card = export_card(parsed, "v2")
    if parsed.spec == "v3":
        notes = card["data"]["creator_notes"]
        card["data"]["creator_notes"] = BACKFILL_NOTE + ("\n\n" + notes if notes else "")
    return card


def export_project(parsed: ParsedCard) -> dict[str, Any]:
    """This project's card file (JSON) for the card: its id, enabled flag, and the V3 card."""
    return {
        PROJECT_MARK: 1,
        "id": parsed.persona_id,
        "enabled": parsed.enabled,
        "card": export_card(parsed, "v3"),
    }


DEFAULT_LINES: dict[str, tuple[str, ...]] = {  # material a card does not give
    "openers": ("Hello!", "Hi there."),
    "reflections": ('You said "{topic}".', 'So, "{topic}". Tell me more.'),
    "questions": ('"{topic}?" Let me think about that.',),
    "wordless": ("I'm listening.",),
    "follow_ups": ("What happened next?", "How do you feel about it?"),
}
DEFAULT_CALLBACK = 'Earlier you said "{earlier}".'
DEFAULT_SWITCHED = "Switching gears: {{char}} is here now."
LEAD_CHARS = 240  # a line taken from first_mes, mes_example or the description: at most this
_START = re.compile(r"<start>", re.IGNORECASE)
# The end of a sentence: its mark, closing quotes or brackets, then a space or the end.
_SENTENCE_END = re.compile(r"[.!?…][\"'”’)\]*]*(?=\s|$)")  # noqa: RUF001


def _example_lines(mes_example: str, name: str) -> tuple[str, ...]:
    """The lines the character says in a mes_example ("{{char}}: ..."), as written."""
    speaker = re.compile(rf"\s*(?:\{{\{{char\}}\}}|<bot>|{re.escape(name)}):\s*(.+)", re.I)
    return tuple(m.group(1).strip() for m in map(speaker.match, mes_example.splitlines()) if m)


def _lead(text: str) -> str:
    """The first whole sentences of `text`, at most LEAD_CHARS characters on one line ("" when
    its first sentence is longer, or does not end)."""
    head = " ".join(text[: LEAD_CHARS * 2].split())[: LEAD_CHARS + 1]
    end = 0
    for found in _SENTENCE_END.finditer(head):
        if found.end() > LEAD_CHARS:
            break
        end = found.end()
    return head[:end]


def persona_card(parsed: ParsedCard) -> PersonaCard:
    """The card as the reply generators use it: its texts with their macros as written (filled
    at render time), the template material from data.extensions["persona_chat"] and, where that
    gives none, material built from the card itself (see docs/cards.md, "Rendering")."""
    data, name = parsed.data, parsed.data.name
    found = parsed.material or PersonaMaterial()
    written = _example_lines(data.mes_example, name)
    given_examples = found.example_lines
    example_lines = tuple(given_examples) if given_examples is not None else written

    def lines(key: str, fallback: tuple[str, ...] = ()) -> tuple[str, ...]:
        given: list[str] | None = getattr(found, key)
        kept = tuple(line.strip() for line in given or () if line.strip())
        return kept or fallback or DEFAULT_LINES[key]

    blocks = tuple(block.strip() for block in _START.split(data.mes_example) if block.strip())
    if not blocks and example_lines:
        blocks = ("\n".join(f"{{{{char}}}}: {line}" for line in example_lines),)
    voice = tuple(line for line in written if len(line) <= LEAD_CHARS)
    switched = (found.switched or "").strip()
    if not switched:  # said once, on arrival: the greeting's first words, else the description's
        arrival = _lead(data.first_mes) or _lead(data.description)
        switched = f"{DEFAULT_SWITCHED} {arrival}" if arrival else DEFAULT_SWITCHED
    system = data.system_prompt.strip()
    return PersonaCard(
        id=parsed.persona_id,
        name=name,
        description=data.description.strip(),
        system_prompt=_ORIGINAL.sub(DEFAULT_SYSTEM_PROMPT, system) or DEFAULT_SYSTEM_PROMPT,
        greeting=data.first_mes,
        style_rules=tuple(rule.strip() for rule in found.style_rules or () if rule.strip()),
        example_lines=example_lines,
        post_history_instruction=_ORIGINAL.sub("", data.post_history_instructions).strip(),
        openers=lines("openers"),
        reflections=lines("reflections"),
        questions=lines("questions"),
        wordless=lines("wordless"),
        follow_ups=lines("follow_ups", voice),
        callback=(found.callback or "").strip() or DEFAULT_CALLBACK,
        sign_off=(found.sign_off or "").strip(),
        switched=switched,
        personality=data.personality.strip(),
        scenario=data.scenario.strip(),
        example_blocks=blocks,
    )
