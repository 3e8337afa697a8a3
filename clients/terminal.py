"""The terminal client (`run.py chat`): interactive on a terminal, line by line from a pipe."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import signal
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from prompt_toolkit import PromptSession
from prompt_toolkit.completion import CompleteEvent, Completer, Completion
from prompt_toolkit.document import Document
from prompt_toolkit.formatted_text import FormattedText
from prompt_toolkit.history import FileHistory
from prompt_toolkit.key_binding import KeyBindings, KeyPressEvent
from prompt_toolkit.patch_stdout import patch_stdout
from prompt_toolkit.styles import Style
from websockets.protocol import State

from clients.connection import (
    EXIT_AUTH_REFUSED,
    EXIT_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    FINAL_CLOSES,
    ClientError,
    Reconnecting,
    closed_error,
    open_link,
)
from clients.link import LinkClosed, Router
from protocol.frames import (
    AnyServerFrame,
    Avatar,
    AvatarInfo,
    Error,
    HistoryEntry,
    HistoryPage,
    Notice,
    PersonaChanged,
    PersonaInfo,
    Personas,
    PersonaSet,
    Reply,
    Welcome,
)
from protocol.text import printable

DEFAULT_AVATAR = ("Ava", "friendly")
MAX_RETRY_WAIT_S = 10.0  # however long a server asks
RATE_LIMIT_RETRIES = 5
RECENT_ON_START = 6  # messages of the conversation so far shown when the client starts
PAGE_SIZE = 20  # personas that `/personas` shows at a time
NAMED_IN_PROMPT = 12  # the create-avatar prompt names this many personas at most
LOCAL_HELP = "\n".join(
    (
        "/personas N    page N of the personalities, 20 a page (/personas more: the next page)",
        "/personas WORD the personalities whose id, name or description has WORD",
        "/quit          leave (Ctrl-D works too; Ctrl-C stops a reply)",
    )
)
COMMANDS = ("/persona ", "/personas", "/help", "/quit")
STYLE = Style.from_dict(
    {"persona": "ansicyan bold", "offline": "ansiyellow", "bottom-toolbar": "noreverse ansiyellow"}
)


# `python run.py chat --user NAME`: a token for NAME, which the command line mints (run.py).
Minter = Callable[[str], str]


@dataclass(frozen=True, slots=True)
class Listing:
    """A `/personas` list: the words its personas must hold (none: all of them) and a page."""

    words: tuple[str, ...] = ()
    page: int = 1


@dataclass(slots=True)
class Conversation:
    """What the client knows: the avatar's name, its current persona, the catalogue, and the
    last `/personas` page shown (for `/personas more`)."""

    link: Router
    personas: list[PersonaInfo]
    avatar_name: str = ""
    persona: str = ""
    failures: int = 0
    listing: Listing = field(default_factory=lambda: Listing(page=0))

    def adopt(self, avatar: AvatarInfo) -> None:
        self.avatar_name = avatar.name
        self.persona = avatar.personality

    def list_personas(self, answer: Personas, argument: str) -> str:
        """The page of the catalogue (just fetched) that `/personas ARGUMENT` asks for."""
        self.personas = answer.personas
        self.listing = listing_for(argument, self.listing)
        return personas_page(self.personas, self.listing)


def personas_argument(line: str) -> str | None:
    """ARGUMENT of a `/personas ARGUMENT` line (empty for a bare `/personas`); None for any
    other line."""
    word, _, argument = line.strip().partition(" ")
    return argument.strip() if word == "/personas" else None


def listing_for(argument: str, last: Listing) -> Listing:
    """What `/personas ARGUMENT` asks for: page 1 of all (no argument), page N (a number), the
    page after the last one shown (`more`), or page 1 of those that hold every word."""
    if not argument:
        return Listing()
    if argument in ("more", "next"):
        return Listing(last.words, last.page + 1)
    if argument.isdigit():
        return Listing(page=int(argument))
    return Listing(tuple(argument.lower().split()))


def matches(persona: PersonaInfo, words: Sequence[str]) -> bool:
    text = f"{persona.id} {persona.name} {persona.description}".lower()
    return all(word in text for word in words)


def personas_page(personas: Sequence[PersonaInfo], listing: Listing) -> str:
    """One page of the personas that match the listing's words: how many there are, which
    page this is, the page's personas (id and description), and how to see the next page."""
    chosen = [p for p in personas if matches(p, listing.words)]
    which = f" match '{' '.join(listing.words)}'" if listing.words else ""
    if not chosen:
        return f"no personas{which}"
    pages = math.ceil(len(chosen) / PAGE_SIZE)
    counted = f"{len(chosen)} persona{'s' if len(chosen) > 1 else ''}{which}"
    if not 1 <= listing.page <= pages:
        last = "page 1" if pages == 1 else f"pages 1 to {pages}"
        return f"no page {listing.page}: {counted}, {last} (/personas 1)"
    first = (listing.page - 1) * PAGE_SIZE
    shown = chosen[first : first + PAGE_SIZE]
    width = max(13, *(len(p.id) for p in shown))
    lines = [f"  {p.id:<{width}} {p.description}" for p in shown]
    if pages == 1:
        return "\n".join((f"{counted}:", *lines))
    place = f"page {listing.page} of {pages} ({first + 1}-{first + len(shown)})"
    header = f"{counted}, {place}:"
    if listing.page == pages:
        return "\n".join((header, *lines, "(the last page)"))
    after = f"/personas more for page {listing.page + 1}"
    return "\n".join((header, *lines, after))


def describe(frame: AnyServerFrame) -> str:
    """A command's answer (or an error) as text for the terminal."""
    match frame:
        case Error(code="invalid_persona", message=message) if "one of:" in message:
            return f"error: {message}"  # a server with a catalogue names the choices itself
        case Error(code="invalid_persona", message=message, details=details):
            allowed = ", ".join((details or {}).get("allowed", []))
            return f"error: {message}; choose one of: {allowed}"
        case Error(code=code, message=message):
            return f"error ({code}): {message}"
        case PersonaSet(personality=personality, previous=previous):
            return f"persona: {personality} (was {previous})"
        case Personas(personas=personas):
            return "\n".join(f"  {p.id:<13} {p.description}" for p in personas)
        case Notice(text=text):
            return text
        case _:
            return f"({frame.type})"


def recent_line(conversation: Conversation, entry: HistoryEntry) -> str:
    """One earlier message: who said it, its text, and how a reply ended if not completed."""
    if entry.role == "user":
        return f"you: {entry.text}"
    marks = {"cancelled": "[stopped]", "interrupted": "[interrupted]"}
    mark = marks.get(entry.status, "")
    if entry.status == "failed":
        mark = f"[failed: {entry.error or 'no reply'}]"
    text = " ".join(part for part in (entry.text, mark) if part)
    return f"{conversation.avatar_name} ({entry.persona}): {text}"


def write(text: str, end: str = "\n") -> None:
    print(printable(text), end=end, flush=True)


def warn(text: str) -> None:
    print(printable(text), file=sys.stderr, flush=True)


async def run_batch(conversation: Conversation) -> int:
    """Read lines from stdin; send each as a chat; print each reply. Exit at end of input."""
    while line := await asyncio.to_thread(sys.stdin.readline):
        text = line.rstrip("\r\n")
        if text.strip() == "/quit":
            break
        if not text.strip():
            continue
        listing = personas_argument(text)  # `/personas 2` asks for the list, the client pages it
        sent = text if listing is None else "/personas"
        answer = await chat_with_retry(conversation, sent)
        if isinstance(answer, Error) and answer.code == "no_avatar":
            await create_default_avatar(conversation)
            answer = await chat_with_retry(conversation, sent)
        print_batch_answer(conversation, answer, listing or "")
    return EXIT_FAILED if conversation.failures else EXIT_OK


async def create_default_avatar(conversation: Conversation) -> None:
    name, personality = DEFAULT_AVATAR
    answer = await conversation.link.request(
        {"type": "create_avatar", "name": name, "personality": personality}
    )
    if isinstance(answer, Avatar):
        conversation.adopt(answer.avatar)
        warn(f"created the avatar {name} ({personality})")
        return
    raise ClientError(f"cannot create an avatar: {describe(answer)}")


async def chat_with_retry(conversation: Conversation, text: str) -> AnyServerFrame:
    """Send one chat; when it is rate limited, wait a little and send it again, and when the
    server sheds load (`overloaded`), after the delay it asks for."""
    for attempt in range(1, RATE_LIMIT_RETRIES):
        answer = await conversation.link.request({"type": "chat", "text": text})
        if not isinstance(answer, Error) or answer.code not in ("rate_limited", "overloaded"):
            return answer
        hinted = (answer.details or {}).get("retry_after_ms")
        wait_s = hinted / 1000 if isinstance(hinted, int | float) else 0.5 * attempt
        await asyncio.sleep(min(wait_s, MAX_RETRY_WAIT_S))
    return await conversation.link.request({"type": "chat", "text": text})


def print_batch_answer(conversation: Conversation, answer: AnyServerFrame, listing: str) -> None:
    """Replies on stdout; what the user asked for with a command too; the rest on stderr.
    `listing` is the argument of a `/personas` line."""
    match answer:
        case Reply(status="completed", text=text):
            write(text)
        case Reply(status=status, text=text):
            write(text)
            warn(f"the reply {status}")
            conversation.failures += 1
        case PersonaSet(personality=personality):
            conversation.persona = personality
            warn(describe(answer))
        case Personas():
            write(conversation.list_personas(answer, listing))
        case Notice():
            write(describe(answer))
        case _:
            warn(describe(answer))
            conversation.failures += 1


class Terminal:
    """The interactive client: a prompt with the persona, streamed replies, Ctrl-C to stop."""

    def __init__(
        self, conversation: Conversation, history: Path, url: str = "", token: str = ""
    ) -> None:
        self.conversation = conversation
        self.cancel_sent = False
        self._tasks: set[asyncio.Task[None]] = set()
        self.final: ClientError | None = None  # a close that ends the client
        self.connection = Reconnecting(url, token, self.on_status, self.on_back, self.on_final)
        history.parent.mkdir(parents=True, exist_ok=True)
        self.completer = CommandCompleter(conversation)
        self.session: PromptSession[str] = PromptSession(
            history=FileHistory(str(history)), style=STYLE
        )

    def prompt_text(self) -> FormattedText:
        """`[persona] > `, and `(offline)` in it while the connection is being opened again (the
        line below the prompt says how that goes, on a terminal that can tell its size)."""
        persona = ("class:persona", f"[{self.conversation.persona}]")
        if self.connection.online.is_set():
            return FormattedText([persona, ("", " > ")])
        return FormattedText([persona, ("", " "), ("class:offline", "(offline)"), ("", " > ")])

    async def run(self) -> int:
        greeting = await self.create_avatar() if not self.conversation.avatar_name else None
        c = self.conversation
        shown = await self.show_recent()
        write(f"Talking to {c.avatar_name} ({c.persona}). /help lists the commands.")
        if greeting and greeting not in shown:
            write(f"{c.avatar_name} ({c.persona}): {greeting}")
        self.connection.watch(c.link)
        try:
            while (line := await self.read_line()) is not None:
                if line == "/quit":
                    break
                if line:
                    await self.handle(line)
        finally:
            await self.connection.stop()
        return EXIT_OK

    async def show_recent(self) -> set[str]:
        """The end of the conversation so far, with the replies that stopped or failed marked
        as such (a failed one has no text of its own); returns the texts shown."""
        answer = await self.conversation.link.request({"type": "history", "limit": RECENT_ON_START})
        if not isinstance(answer, HistoryPage) or not answer.messages:
            return set()
        write("-- earlier --")
        for entry in answer.messages:
            write(recent_line(self.conversation, entry))
        write("-- now --")
        return {entry.text for entry in answer.messages}

    async def read_line(self) -> str | None:
        """The next line typed, stripped; None on Ctrl-D. Ctrl-C clears the line."""
        while True:
            try:
                return (await self.prompt(self.prompt_text)).strip()
            except KeyboardInterrupt:
                continue
            except EOFError:
                return None

    async def prompt(
        self, message: Callable[[], FormattedText] | str, completer: Completer | None = None
    ) -> str:
        """One prompt (completing the commands unless another completer is given); what
        arrives meanwhile (a push) is printed above it."""
        completer = completer or self.completer
        with patch_stdout():
            return await self.session.prompt_async(
                message, completer=completer, key_bindings=tab_completes(completer)
            )

    @contextlib.contextmanager
    def ctrl_c_calls(self, callback: Callable[[], None]) -> Iterator[None]:
        """Outside the prompt, Ctrl-C is a SIGINT (prompt_toolkit owns it while prompting)."""
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGINT, callback)
        try:
            yield
        finally:
            loop.remove_signal_handler(signal.SIGINT)

    # ------------------------------------------------------------------ the connection

    def on_status(self, status: str | None) -> None:
        """The connection dropped (a line, and the status below the prompt), is being opened
        again (the status), or is back (None)."""
        if status is None:
            self.session.bottom_toolbar = None
        else:
            if self.session.bottom_toolbar is None:
                write(status)
            self.session.bottom_toolbar = status
        self.session.app.invalidate()

    def on_back(self, router: Router, welcome: Welcome) -> None:
        c = self.conversation
        c.link = router
        router.on_push = self.on_push
        was = c.persona
        c.personas = welcome.personas
        if welcome.avatar is not None:
            c.adopt(welcome.avatar)
        changed = f"; the persona is now {c.persona}" if c.persona != was else ""
        write(f"reconnected{changed}")
        self.session.app.invalidate()

    def on_final(self, error: ClientError) -> None:
        """A close that ends the client: at the prompt at once, else at the next request."""
        self.final = error
        self.connection.online.set()  # wakes a line waiting to be sent, which sees `final`
        if self.session.app.is_running:
            self.session.app.exit(exception=error)

    async def connected(self) -> bool:
        """Whether a line can be sent: at once when connected; else once the connection is
        back, unless Ctrl-C says not to send it."""
        if self.final is not None:
            raise self.final
        online = self.connection.online
        if online.is_set() and self.conversation.link.link.ws.state is State.OPEN:
            return True
        online.clear()  # closed, and not yet seen to be: the watcher will open it again
        write("not connected: it will be sent once the connection is back (Ctrl-C: do not send)")
        waiting = asyncio.ensure_future(online.wait())
        gave_up = False

        def give_up() -> None:
            nonlocal gave_up
            gave_up = True
            waiting.cancel()

        with self.ctrl_c_calls(give_up):
            try:
                await waiting
            except asyncio.CancelledError:
                if not gave_up:
                    raise
                write("not sent")
                return False
        if self.final is not None:
            raise self.final
        return True

    def lost(self, closed: LinkClosed, shown: bool) -> None:
        """The connection dropped before the answer came: the line was said (unless the close
        ends the client), and the answer is lost."""
        if closed.code in FINAL_CLOSES:
            raise closed_error(closed)
        write(("\n" if shown else "") + "[interrupted: the connection was lost]")

    async def create_avatar(self) -> str | None:
        """Ask for a name and a personality until the server creates the avatar; returns the
        greeting it answered with (the persona card's first message), if any."""
        write("You have no avatar yet. Let's create one.")
        personas = self.conversation.personas
        named = ", ".join(p.id for p in personas[:NAMED_IN_PROMPT])
        if len(personas) > NAMED_IN_PROMPT:
            named += f" and {len(personas) - NAMED_IN_PROMPT} more: Tab completes"
        name = (await self.prompt("Name [Ava]: ", NO_COMPLETION)).strip() or "Ava"
        while True:
            choice = await self.prompt(
                f"Personality ({named}) [friendly]: ", PersonaCompleter(self.conversation)
            )
            answer = await self.conversation.link.request(
                {"type": "create_avatar", "name": name, "personality": choice.strip() or "friendly"}
            )
            if isinstance(answer, Avatar):
                self.conversation.adopt(answer.avatar)
                return answer.greeting
            write(describe(answer))

    async def handle(self, line: str) -> None:
        """Send the line as a chat (the server runs the commands) and show the answer."""
        if not await self.connected():
            return
        if not line.startswith("/") or line.startswith("//"):
            await self.chat(line)
            return
        listing = personas_argument(line)  # `/personas 2` asks for the list, the client pages it
        try:
            answer = await self.conversation.link.request(
                {"type": "chat", "text": line if listing is None else "/personas"}
            )
        except LinkClosed as closed:
            self.lost(closed, shown=False)
            return
        if isinstance(answer, PersonaSet):
            self.conversation.persona = answer.personality
        if isinstance(answer, Personas):
            write(self.conversation.list_personas(answer, listing or ""))
        else:
            write(describe(answer))
        if line == "/help":
            write(LOCAL_HELP)

    async def chat(self, text: str) -> None:
        """Stream the reply as it arrives; the final `reply` holds the whole text."""
        speaker = f"{self.conversation.avatar_name} ({self.conversation.persona}): "
        shown: list[str] = []

        def on_delta(delta: str) -> None:
            write(("" if shown else speaker) + delta, end="")
            shown.append(delta)

        self.cancel_sent = False
        with self.ctrl_c_calls(self.interrupt):
            try:
                answer = await self.conversation.link.request(
                    {"type": "chat", "text": text}, on_delta=on_delta
                )
            except LinkClosed as closed:
                self.lost(closed, bool(shown))
                return
        if not isinstance(answer, Reply):
            write(("\n" if shown else "") + describe(answer))
            return
        printed = "".join(shown)
        rest = answer.text.removeprefix(printed) if printed else speaker + answer.text
        write(rest)
        if answer.status != "completed":
            write(f"[{'stopped' if answer.status == 'cancelled' else answer.status}]")

    def interrupt(self) -> None:
        """Ctrl-C while a reply streams: ask the server to stop it."""
        if self.cancel_sent:
            return
        self.cancel_sent = True
        task = asyncio.create_task(self.send_cancel())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def send_cancel(self) -> None:
        with contextlib.suppress(LinkClosed):  # a lost connection ends the reply's wait anyway
            await self.conversation.link.send({"type": "cancel"})

    def on_push(self, frame: AnyServerFrame) -> None:
        """persona_changed from another window of this user; errors without a waiter."""
        if isinstance(frame, PersonaChanged):
            self.conversation.persona = frame.personality
            write(f"persona changed to {frame.personality} in another window")
            self.session.app.invalidate()
        elif isinstance(frame, Error) and frame.code != "nothing_to_cancel":
            write(describe(frame))


class PersonaCompleter(Completer):
    """Persona ids that start with the text typed (or whose name does), from the catalogue as
    the client last heard it; each shown with its name."""

    def __init__(self, conversation: Conversation) -> None:
        self.conversation = conversation

    def get_completions(
        self, document: Document, complete_event: CompleteEvent
    ) -> Iterable[Completion]:
        return self.completions(document.text_before_cursor)

    def completions(self, typed: str) -> Iterator[Completion]:
        prefix = typed.lstrip().lower()
        for persona in self.conversation.personas:
            if persona.id.startswith(prefix) or persona.name.lower().startswith(prefix):
                yield Completion(persona.id, -len(typed), display_meta=persona.name)


class CommandCompleter(PersonaCompleter):
    """The commands, and after `/persona ` the persona ids: a catalogue of hundreds is walked
    once per Tab, with nothing built ahead (so a catalogue that changed is completed too)."""

    def completions(self, typed: str) -> Iterator[Completion]:
        if typed.startswith("/persona "):
            yield from super().completions(typed.removeprefix("/persona "))
        elif typed.startswith("/") and " " not in typed:
            for command in COMMANDS:
                if command.startswith(typed):
                    yield Completion(command, -len(typed))


class NoCompletion(Completer):
    def get_completions(
        self, document: Document, complete_event: CompleteEvent
    ) -> Iterable[Completion]:
        return ()


NO_COMPLETION = NoCompletion()


def tab_completes(completer: Completer) -> KeyBindings:
    """Tab completes the line at once when one command matches (`/persona w`: `/persona
    witty`), whether or not the menu of matches has been drawn yet; else it shows the menu."""
    bindings = KeyBindings()

    @bindings.add("tab")
    def _complete(event: KeyPressEvent) -> None:
        buffer = event.current_buffer
        matches = list(
            completer.get_completions(buffer.document, CompleteEvent(completion_requested=True))
        )
        if len(matches) == 1:
            buffer.apply_completion(matches[0])
        elif buffer.complete_state is not None:
            buffer.complete_next()
        else:
            buffer.start_completion(insert_common_part=True)

    return bindings


def resolve_token(args: argparse.Namespace, mint: Minter) -> str:
    """`--token` as given, or a token for `--user` from `mint`."""
    if args.token:
        return str(args.token)
    if not args.user:
        raise ClientError("sign in with --user NAME (local server) or --token TOKEN", EXIT_USAGE)
    try:
        return mint(args.user)
    except ValueError as exc:
        raise ClientError(str(exc), EXIT_USAGE) from None


async def run(args: argparse.Namespace, token: str, interactive: bool, data_dir: Path) -> int:
    link, welcome = await open_link(args.url, token)
    conversation = Conversation(link, welcome.personas)
    if welcome.avatar is not None:
        conversation.adopt(welcome.avatar)
    try:
        if interactive:
            terminal = Terminal(conversation, data_dir / "chat_history", args.url, token)
            link.on_push = terminal.on_push
            return await terminal.run()
        link.on_push = lambda frame: batch_push(conversation, frame)
        return await run_batch(conversation)
    finally:
        await conversation.link.close()  # the last one opened


def batch_push(conversation: Conversation, frame: AnyServerFrame) -> None:
    if isinstance(frame, PersonaChanged):
        conversation.persona = frame.personality
    elif isinstance(frame, Error):
        warn(describe(frame))


def main(args: argparse.Namespace, mint: Minter, data_dir: Path) -> int:
    """`python run.py chat`: returns the process exit code (see EXIT_* above). `mint` makes the
    token for `--user`; `data_dir` holds the prompt history (and the secret `mint` signs with)."""
    try:
        token = resolve_token(args, mint)
        try:
            return asyncio.run(run(args, token, sys.stdin.isatty(), data_dir))
        except LinkClosed as closed:
            raise closed_error(closed) from None
    except ClientError as exc:
        warn(f"chat: {exc}")
        if exc.exit_code == EXIT_AUTH_REFUSED and args.user:
            warn(f"(--user signs with the secret in {data_dir}: use the server's --data-dir)")
        return exc.exit_code
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
