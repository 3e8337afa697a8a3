"""Reply rendering as pure functions: the template reply, and (for LLMs) the prompt."""

from __future__ import annotations

import functools
import re
import zlib
from collections.abc import Callable, Sequence
from typing import NamedTuple
from unicodedata import category

from protocol.cards import DEFAULT_USER_NAME, PersonaCard, fill_macros
from protocol.conversation.records import PastMessage

TOPIC_WORDS = 8  # at most this many words of the message are quoted back
TOPIC_CHARS = 60  # ... and at most this many characters
_TOKENS_LOOKED_AT = TOPIC_WORDS + 4  # per clause: room for a greeting and bare punctuation
_CLAUSES_LOOKED_AT = 4
_CHARS_LOOKED_AT = 400
OTHER_PERSONA_CHARS = 400  # a reply in another persona's voice is cut to this in a prompt

# Marks that may end a clause: a Latin one only when no letter or digit follows it ("3.5" and
# "e.g" go on; "Hi. I" and "Hi!!" end), a CJK or Arabic one or a newline always.
_FULL_STOPS = "\N{IDEOGRAPHIC FULL STOP}\N{FULLWIDTH EXCLAMATION MARK}\N{FULLWIDTH QUESTION MARK}"
_STOPS = re.compile(f"[.!?;…{_FULL_STOPS}؟\n]+")
_STOPS_ANYWHERE = frozenset(f"{_FULL_STOPS}؟\n")
_QUESTION_MARKS = frozenset("?\N{FULLWIDTH QUESTION MARK}؟")


def _is_edge(char: str) -> bool:
    """Whether `char` is stripped from the edges of a word: punctuation, control and format
    characters, maths and modifier symbols. Letters, digits, marks, emoji and currency stay."""
    kind = category(char)
    return kind[0] in "PC" or kind in ("Sm", "Sk")


_ASCII_EDGES = "".join(filter(_is_edge, map(chr, range(128))))
_GREETINGS = frozenset(
    """hi hey hello hiya heya howdy yo greetings hola bonjour salut hallo ciao hej olá привет
    здравствуйте مرحبا שלום merhaba नमस्ते 你好 こんにちは 안녕하세요""".split()  # noqa: SIM905
)
_ADDRESSEES = frozenset(("there", "friend", "buddy", "everyone", "all", "guys", "you"))
# Words that leave a phrase hanging when it is cut after them: articles, conjunctions,
# prepositions, determiners, auxiliaries. A topic that was cut never ends on one.
_DANGLING = frozenset(
    """a an the and or but nor so yet because since if unless until that than then when where
    while though although as whether which who whose of to in on at by for with about from into
    onto upon over under above below after before between through during without within
    against among around along across toward towards like via per my your his her our their
    its this these those some any every each no very really just also even is are was were be
    been being am will would can could should shall may might must do does did have has had
    not i'm it's that's there's i've you're we're they're don't doesn't didn't can't won't
    isn't aren't wasn't weren't let's""".split()  # noqa: SIM905
)
_APOSTROPHES = str.maketrans("’ʼ", "''")  # noqa: RUF001


class Topic(NamedTuple):
    """What a reply quotes back: whole words of the message's first clause that says something."""

    text: str  # the words joined by single spaces, as typed; "" when the message has none
    question: bool  # the clause ended with a question mark
    cut: bool  # words of the clause were left out at its end


NO_TOPIC = Topic("", question=False, cut=False)


def topic_of(text: str) -> Topic:
    """The first clause of a message that is more than a greeting, as whole words (see
    `_topic_of`). A short text's topic is remembered: each reply recalls the one before."""
    return _remembered_topic(text) if len(text) <= _REMEMBERED_CHARS else _topic_of(text)


def _topic_of(text: str) -> Topic:
    """The first clause of a message that is more than a greeting, as whole words.

    A greeting and the name after it are left out ("Hi Ava, I baked bread" gives "I baked
    bread"), unless the clause is nothing else. A long clause is cut after whole words, and
    never on a word that leaves it hanging ("Tell me a story about dragons and" gives "Tell
    me a story about dragons"). Words are separated by whitespace and lose the punctuation at
    their edges, so other scripts, emoji and contractions pass through unchanged. Only the
    first few hundred characters are read, up to the last whole word among them.
    """
    truncated = len(text) > _CHARS_LOOKED_AT
    if truncated:  # up to the last whitespace: the word before it is whole
        text = text[: _CHARS_LOOKED_AT + 1]
        if not text[-1].isspace():
            head = text.rsplit(None, 1)
            text = head[0] if len(head) == 2 else ""
    fallback = NO_TOPIC
    start = 0
    for _ in range(_CLAUSES_LOOKED_AT):
        stop, after = _clause_end(text, start)
        clause = text[start:stop]
        tokens = clause.split(None, _TOKENS_LOOKED_AT)
        longer = len(tokens) > _TOKENS_LOOKED_AT or (truncated and stop == len(text))
        if len(tokens) > _TOKENS_LOOKED_AT:
            del tokens[-1]
        if clause.isascii():  # the common case, and no edge is left after an ASCII strip
            words = [word for token in tokens if (word := token.strip(_ASCII_EDGES))]
        else:
            words = [word for word in map(_bare, tokens) if word]
        said = _without_greeting(words, tokens)
        if said or (words and fallback is NO_TOPIC):
            question = not _QUESTION_MARKS.isdisjoint(text[stop:after])
            topic = _topic(said or words, question, longer)
            if said:
                return topic
            fallback = topic
        if after == len(text):
            break
        start = after
    return fallback


_REMEMBERED_CHARS = 256
_remembered_topic = functools.lru_cache(maxsize=1024)(_topic_of)


def _clause_end(text: str, start: int) -> tuple[int, int]:
    """Where the clause that begins at `start` ends, and where the next one begins."""
    while (stops := _STOPS.search(text, start)) is not None:
        after = stops.end()
        if after == len(text) or not text[after].isalnum():
            return stops.start(), after
        if not _STOPS_ANYWHERE.isdisjoint(stops.group()):
            return stops.start(), after
        start = after
    return len(text), len(text)


def _bare(token: str) -> str:
    """A whitespace-separated token without the punctuation at its edges: "(well," → "well"."""
    word = token.strip(_ASCII_EDGES)
    if not word or (word[0].isalnum() and word[-1].isalnum()):
        return word
    first, last = 0, len(word)
    while first < last and _is_edge(word[first]):
        first += 1
    while last > first and _is_edge(word[last - 1]):
        last -= 1
    return word[first:last]


def _without_greeting(words: list[str], tokens: list[str]) -> list[str]:
    """`words` without a leading greeting and the name or "there" after it: "Hi Ava, I baked"
    and "Hi Ava I baked" give "I baked"; "Hey Paris is lovely" keeps "Paris"."""
    if not words or words[0].lower() not in _GREETINGS:
        return words
    if len(words) > 1:
        name = words[1]
        after = words[2] if len(words) > 2 else ""
        addressed = name.lower() in _ADDRESSEES or f"{name}," in tokens
        pronoun = name.translate(_APOSTROPHES).partition("'")[0] == "I"  # I, I'm, I've
        if addressed or (name[0].isupper() and not pronoun and not after[:1].islower()):
            return words[2:]
    return words[1:]


def _topic(words: list[str], question: bool, longer: bool) -> Topic:
    """The first words that fit, cut so that the topic does not end on a hanging word."""
    kept = words[:TOPIC_WORDS]
    size = len(kept) - 1 + sum(map(len, kept))
    while size > TOPIC_CHARS:
        size -= len(kept.pop()) + 1
    if longer or len(kept) < len(words):
        while kept and kept[-1].lower().translate(_APOSTROPHES) in _DANGLING:
            kept.pop()
        return Topic(" ".join(kept), question, cut=True) if kept else NO_TOPIC
    return Topic(" ".join(kept), question, cut=False)


def _fill(line: str, slot: str, words: str, names: _Names | None) -> str:
    """`line` with `words` in place of `slot`, capitalised when they open a sentence, and its
    macros filled with `names` (the user's words are never read for macros)."""
    head, opens, tail = _SLOTS.get(line) or _slot_of(line, slot)
    if names is not None:
        head, tail = fill_macros(head, *names), fill_macros(tail, *names)
        opens = _opens_sentence(head)
    if opens:
        words = words[0].title() + words[1:]
    return head + words + tail


# A card's line split at its slot: what comes before, whether the slot opens a sentence, what
# comes after. Filled once per line of the catalogue, and emptied when it grows past
# _SLOTS_KEPT lines (edited cards leave their old lines behind).
_SLOTS: dict[str, tuple[str, bool, str]] = {}
_SLOTS_KEPT = 8192


def _slot_of(line: str, slot: str) -> tuple[str, bool, str]:
    head, _, tail = line.partition(slot)
    if len(_SLOTS) >= _SLOTS_KEPT:
        _SLOTS.clear()
    _SLOTS[line] = found = (head, _opens_sentence(head), tail)
    return found


def _opens_sentence(head: str) -> bool:
    before = head.rstrip(' "“')
    return not before or before[-1] in ".!?"


class _Names(NamedTuple):
    """What the macros stand for: {{char}} (and <BOT>), {{user}} (and <USER>)."""

    char: str
    user: str


def names_for(card: PersonaCard, avatar_name: str = "", user_name: str = "") -> _Names:
    """{{char}} is the avatar's name (the card's when empty), {{user}} the user's name."""
    return _Names(avatar_name or card.name, user_name or DEFAULT_USER_NAME)


def template_reply(
    card: PersonaCard,
    text: str,
    recent: Sequence[PastMessage],
    avatar_name: str = "",
    user_name: str = "",
) -> list[str]:
    """A deterministic reply in the persona's voice, as pieces that join into the whole text.

    The same card, text, recent turns and names always give the same reply; two cards never
    give the same reply to the same text, since every piece comes from the card. Every piece is
    whole sentences; the user's words appear only as quotations of whole words (see
    `topic_of`). The macros of the lines it uses are filled (`avatar_name` for {{char}},
    `user_name` for {{user}}); a card whose lines hold none costs nothing for it.
    """
    names = names_for(card, avatar_name, user_name) if card.line_macros else None
    seed = zlib.crc32(text.encode("utf-8", "surrogatepass"))
    topic = topic_of(text)
    if not topic.text:
        reflection = card.wordless[(seed // 7) % len(card.wordless)]
        if names is not None:
            reflection = fill_macros(reflection, *names)
    elif topic.question:
        line = card.questions[(seed // 7) % len(card.questions)]
        reflection = _fill(line, "{topic}", topic.text, names)
    else:
        line = card.reflections[(seed // 7) % len(card.reflections)]
        reflection = _fill(line, "{topic}", topic.text, names)
    opener = card.openers[seed % len(card.openers)]
    follow_up = card.follow_ups[(seed // 49) % len(card.follow_ups)]
    sign_off = card.sign_off
    if names is not None:
        opener, follow_up = fill_macros(opener, *names), fill_macros(follow_up, *names)
        sign_off = fill_macros(sign_off, *names)
    pieces = [opener + " ", reflection + " "]
    if (voice := _last_voice(recent)) and voice != card.id:  # the first reply after a switch
        switched = card.switched if names is None else fill_macros(card.switched, *names)
        pieces.insert(0, switched + " ")
    earlier = _last_user_text(recent)
    if earlier is not None and (recalled := topic_of(earlier).text):
        pieces.append(_fill(card.callback, "{earlier}", recalled, names) + " ")
    if sign_off:
        pieces += (follow_up + " ", sign_off)
    else:
        pieces.append(follow_up)
    return pieces


def _last_voice(recent: Sequence[PastMessage]) -> str:
    """The persona of the latest reply that has one ("" when none has)."""
    for message in reversed(recent):
        if message.role == "assistant" and message.persona:
            return message.persona
    return ""


def _last_user_text(recent: Sequence[PastMessage]) -> str | None:
    for message in reversed(recent):
        if message.role == "user":
            return message.text
    return None


ChatMessage = dict[str, str]


EXAMPLE_CHAT = "[Example Chat]"  # opens each example dialogue block (SillyTavern's words)
NEW_CHAT = "[Start a new Chat]"  # ends the example dialogue: the chat itself follows
SUMMARY_CHARS = 400  # a switch marker sums the new persona up in at most this much description


def persona_system_prompt(card: PersonaCard, avatar_name: str = "", user_name: str = "") -> str:
    """The first system message, in SillyTavern's order: the card's system prompt (or the
    default one), the character (description, personality, scenario, and this project's style
    rules), then the example dialogue, each `<START>` block after `[Example Chat]` and the
    whole closed by `[Start a new Chat]`. Macros are filled: {{char}} is `avatar_name` (the
    card's name when empty), {{user}} is `user_name`."""
    sections = [card.system_prompt]
    if card.description:
        sections.append(card.description)
    if card.personality:
        sections.append(f"{{{{char}}}}'s personality: {card.personality}")
    if card.scenario:
        sections.append(f"Scenario: {card.scenario}")
    if card.style_rules:
        sections.append("Style rules:\n" + "\n".join(f"- {rule}" for rule in card.style_rules))
    if card.example_blocks:
        sections.extend(f"{EXAMPLE_CHAT}\n{block}" for block in card.example_blocks)
        sections.append(NEW_CHAT)
    return fill_macros("\n\n".join(sections), *names_for(card, avatar_name, user_name))


Lookup = Callable[[str], PersonaCard | None]  # another persona's card, by id (None: gone)


def no_other(_persona_id: str) -> PersonaCard | None:
    return None


class _Switch(NamedTuple):
    """A persona switch between two turns of the prompt's history, to be marked there."""

    old: str
    new: str
    examples: bool  # the switch to the reply being generated: the new card's example lines too


def build_prompt(
    card: PersonaCard,
    recent: Sequence[PastMessage],
    text: str,
    other_persona_chars: int = OTHER_PERSONA_CHARS,
    others: Lookup = no_other,
    avatar_name: str = "",
    user_name: str = "",
) -> list[ChatMessage]:
    """The OpenAI chat messages for one turn, rendered afresh from the card every time.

    In SillyTavern's order: the first system message (`persona_system_prompt`: the system
    prompt, the character, the example dialogue), the recent history (oldest first; blank
    messages are left out), the user's text, then the persona's post-history instruction as a
    last system message. The card's macros are filled: {{char}} is `avatar_name` (the card's
    name when empty), {{user}} is `user_name`; the history and the text are sent as written.
    Where the persona of the replies changed (between two replies in the history, or between
    the latest one and the reply being generated), a system message marks the switch before
    the turn that follows it (see `switch_note`); replies in another persona than `card`'s are
    cut to `other_persona_chars` (0: left out), so that the old voice cannot set the tone.
    """
    history: list[ChatMessage | _Switch] = []
    voice = ""  # the persona of the latest reply so far
    turn_start = 0  # where the turn after the latest reply begins
    for message in recent:
        if not message.text.strip():
            continue
        if message.role != "assistant":
            history.append({"role": message.role, "content": message.text})
            continue
        persona = message.persona
        if persona and voice and persona != voice:
            history.insert(turn_start, _Switch(voice, persona, examples=False))
        voice = persona or voice
        content = message.text
        if persona and persona != card.id:
            content = shorten(content, other_persona_chars)
        if content:
            history.append({"role": "assistant", "content": content})
        turn_start = len(history)
    if voice and voice != card.id:
        history.insert(turn_start, _Switch(voice, card.id, examples=True))
    names = (avatar_name, user_name)
    messages = [{"role": "system", "content": persona_system_prompt(card, *names)}]
    pending: _Switch | None = None
    for entry in history:
        if isinstance(entry, _Switch):  # switches with no message between them: one marker
            pending = entry if pending is None else entry._replace(old=pending.old)
            continue
        if pending is not None:
            _mark(messages, pending, card, others, names)
            pending = None
        messages.append(entry)
    if pending is not None:
        _mark(messages, pending, card, others, names)
    messages.append({"role": "user", "content": text})
    if card.post_history_instruction:
        after = fill_macros(card.post_history_instruction, *names_for(card, *names))
        messages.append({"role": "system", "content": after})
    return messages


def _mark(
    messages: list[ChatMessage],
    switch: _Switch,
    card: PersonaCard,
    others: Lookup,
    names: tuple[str, str],
) -> None:
    """Add the marker of `switch`, unless nothing of the old voice is left before it."""
    if len(messages) > 1 and switch.old != switch.new:
        new = card if switch.new == card.id else others(switch.new) or switch.new
        note = switch_note(switch.old, new, switch.examples, others, *names)
        messages.append({"role": "system", "content": note})


def switch_note(
    old: str,
    new: PersonaCard | str,
    examples: bool = False,
    others: Lookup = no_other,
    avatar_name: str = "",
    user_name: str = "",
) -> str:
    """The system message that marks a switch from persona `old` to `new` at a turn: it names
    both, tells the model to speak only as the new one, and sums the new one up in a line: its
    description, cut to SUMMARY_CHARS (`examples`: with the new card's example lines; `others`
    finds a persona's card by id; the new card's macros are filled as in `build_prompt`)."""
    old_card = others(old)
    was = old_card.name if old_card is not None else old
    now = new.name if isinstance(new, PersonaCard) else new
    note = (
        f"Persona switch: from {was} to {now}. The replies before this point were written as"
        f" {was}. From here on, speak only as {now}, and do not continue {was}'s tone."
    )
    if isinstance(new, PersonaCard):
        names = names_for(new, avatar_name, user_name)
        if new.description:
            summary = fill_macros(shorten(new.description, SUMMARY_CHARS), *names)
            note += f"\n{now}: {summary}"
        if examples and new.example_lines:
            note += f"\nExample lines in {now}'s voice:\n" + "\n".join(
                f"- {fill_macros(line, *names)}" for line in new.example_lines
            )
    return note


def shorten(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters after a whole word, with "…" where it was cut."""
    if len(text) <= limit:
        return text
    if limit <= 0:
        return ""
    head = text[: limit - 1]
    if not text[limit - 1].isspace() and len(words := head.rsplit(None, 1)) == 2:
        head = words[0]  # the last word was cut: leave it out
    return head.rstrip() + "…"


def notes_in_user_turns(messages: Sequence[ChatMessage]) -> list[ChatMessage]:
    """`messages` for a chat template that takes a system message only first: every later one
    (switch markers, the post-history instruction) is folded into the next user message as a
    bracketed note, or into the last user message when none follows."""
    folded: list[ChatMessage] = []
    notes: list[str] = []
    for index, message in enumerate(messages):
        if message["role"] == "system" and index:
            notes.append(f"[{message['content']}]")
        elif notes and message["role"] == "user":
            folded.append({"role": "user", "content": "\n\n".join([*notes, message["content"]])})
            notes.clear()
        else:
            folded.append(dict(message))
    if notes:
        last = max(i for i, message in enumerate(folded) if message["role"] == "user")
        folded[last]["content"] = "\n\n".join([folded[last]["content"], *notes])
    return folded
