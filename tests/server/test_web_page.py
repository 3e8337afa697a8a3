"""The web page end to end, in Debian's headless Chromium driven by Playwright's async API."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from playwright.async_api import Browser, Locator, Page, ViewportSize, async_playwright, expect

from server.app import App
from server.auth import mint_token
from server.store import Store
from tests.chromium import CHROMIUM, MANUAL, PROBLEM, ensure_chromium
from tests.conftest import SECRET, AppFactory
from tests.personas import add_personas, remove_personas

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
DESKTOP = ViewportSize(width=900, height=680)
PHONE = ViewportSize(width=375, height=740)
GUESTS = 30  # personas added to the six built-in ones: more than 12, so the lists get a search


@pytest.fixture
async def browser(pytestconfig: pytest.Config) -> AsyncIterator[Browser]:
    """Debian's Chromium (installed at collection when missing, see tests/chromium.py); the
    test fails (it does not skip) when it is not there."""
    if not CHROMIUM.exists():
        problem = pytestconfig.stash.get(PROBLEM, None) or f"{CHROMIUM} is missing: {MANUAL}"
        pytest.fail(f"Chromium is missing: {problem}; these tests never download a browser.")
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield launched
        finally:
            await launched.close()


async def add_to_catalogue(
    database_url: str, count: int, prefix: str, cards: list[dict[str, object]] | None = None
) -> list[str]:
    """Personas added before the test starts its server (to be removed after it: the database
    is shared by the run); the schema is made first, should this test be the run's first."""
    store = await Store.connect(database_url, min_size=1, max_size=1)
    try:
        await store.migrate()
    finally:
        await store.close()
    return await add_personas(database_url, count, prefix, cards)


@pytest.fixture
async def guests(database_url: str) -> AsyncIterator[list[str]]:
    """GUESTS more enabled personas in the catalogue (`guest-0001`, named "Guest 1", ...)."""
    ids = await add_to_catalogue(database_url, GUESTS, "guest")
    try:
        yield ids
    finally:
        await remove_personas(database_url, ids)


async def open_page(
    browser: Browser, app: App, errors: list[str] | None = None, viewport: ViewportSize = DESKTOP
) -> Page:
    """A fresh tab in its own context (its own sessionStorage) on the server's page."""
    context = await browser.new_context(viewport=viewport)
    page = await context.new_page()
    if errors is not None:
        page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(f"http://127.0.0.1:{app.port}/")
    return page


async def sign_in(page: Page, user: str) -> None:
    await page.fill("#signin-name", user)
    await page.click("#signin-form button[type=submit]")


def option(page: Page, chooser: str, persona: str) -> Locator:
    """The persona's entry in a chooser (`#avatar-persona` or `#persona-picker`)."""
    return page.locator(f'{chooser} [role=option][data-id="{persona}"]')


async def create_avatar(page: Page, name: str, personality: str) -> None:
    await page.fill("#avatar-name", name)
    await option(page, "#avatar-persona", personality).click()
    await expect(page.locator("#avatar-persona")).to_have_attribute("data-value", personality)
    await page.click("#avatar-form button[type=submit]")
    await expect(page.locator("#composer")).to_be_visible()


async def pick_persona(page: Page, persona: str) -> None:
    """Open the header's persona panel and click the persona; the panel closes."""
    await page.click("#persona-button")
    await option(page, "#persona-picker", persona).click()
    await expect(page.locator("#persona-panel")).to_be_hidden()


async def expect_persona(page: Page, persona: str, name: str) -> None:
    """The header shows the persona's name, and its chooser has it picked."""
    await expect(page.locator("#persona-picker")).to_have_attribute("data-value", persona)
    await expect(page.locator("#persona-current")).to_have_text(name)
    selected = page.locator('#persona-picker [aria-selected="true"]')
    await expect(selected).to_have_attribute("data-id", persona)


async def send(page: Page, text: str) -> None:
    await page.fill("#message", text)
    await page.press("#message", "Enter")


async def chat(page: Page, text: str) -> Locator:
    """Send a chat and return its reply once it is complete."""
    replies = page.locator(".msg.assistant")
    count = await replies.count()
    await send(page, text)
    reply = replies.nth(count)
    await expect(reply).to_have_attribute("data-status", "completed")
    return reply


async def signed_in_with_avatar(browser: Browser, app: App, user: str) -> Page:
    page = await open_page(browser, app)
    await sign_in(page, user)
    await create_avatar(page, "Ava", "friendly")
    return page


def new_user() -> str:
    return f"web-{uuid.uuid4().hex[:10]}"


async def test_page_chats_and_labels_each_reply_with_its_persona(
    browser: Browser, make_app: AppFactory
) -> None:
    app = await make_app(database_url=None)
    errors: list[str] = []
    page = await open_page(browser, app, errors)
    await sign_in(page, new_user())
    await create_avatar(page, "Ava", "friendly")
    first = await chat(page, "I baked bread today")
    await pick_persona(page, "witty")
    await expect(page.locator(".note.notice").last).to_have_text("Now speaking as Witty.")
    second = await chat(page, "I baked bread today")
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "web_page.png"))
    assert await first.locator(".persona").inner_text() == "Friendly"
    assert await second.locator(".persona").inner_text() == "Witty"
    assert await first.get_attribute("data-persona") == "friendly"
    assert await second.get_attribute("data-persona") == "witty"
    assert await first.locator(".text").inner_text() != await second.locator(".text").inner_text()
    assert errors == []


async def test_reply_text_streams_into_the_page_before_it_completes(
    browser: Browser, make_app: AppFactory
) -> None:
    app = await make_app(database_url=None, template_delay_ms=150)
    page = await signed_in_with_avatar(browser, app, new_user())
    await send(page, "tell me something")
    reply = page.locator(".msg.assistant").last
    await expect(reply).to_have_attribute("data-status", "streaming")
    await expect(reply.locator(".text")).not_to_have_text("")
    await expect(reply).to_have_attribute("data-status", "completed", timeout=15_000)


async def test_stop_button_cancels_the_reply_in_flight(
    browser: Browser, make_app: AppFactory
) -> None:
    app = await make_app(database_url=None, template_delay_ms=400)
    page = await signed_in_with_avatar(browser, app, new_user())
    await send(page, "tell me a long story")
    reply = page.locator(".msg.assistant").last
    await expect(reply).to_have_attribute("data-status", "streaming")
    await page.click("#stop")
    await expect(reply).to_have_attribute("data-status", "cancelled")
    await expect(reply.locator(".status")).to_have_text("stopped")
    await expect(page.locator("#stop")).to_be_hidden()


async def test_history_is_shown_after_signing_in_again(
    browser: Browser, make_app: AppFactory
) -> None:
    app = await make_app(database_url=None)
    user = new_user()
    first_tab = await signed_in_with_avatar(browser, app, user)
    await chat(first_tab, "remember the lighthouse")
    second_tab = await open_page(browser, app)
    await sign_in(second_tab, user)
    messages = second_tab.locator(".msg")
    await expect(messages).to_have_count(2)
    await expect(messages.first).to_have_text("remember the lighthouse")
    await expect(messages.last).to_have_attribute("data-persona", "friendly")


async def test_persona_change_in_another_tab_shows_in_this_one(
    browser: Browser, make_app: AppFactory
) -> None:
    app = await make_app(database_url=None)
    user = new_user()
    this_tab = await signed_in_with_avatar(browser, app, user)
    other_tab = await open_page(browser, app)
    await sign_in(other_tab, user)
    await pick_persona(other_tab, "romantic")
    notice = this_tab.locator(".note.notice").last
    await expect(notice).to_have_text("Persona changed to Romantic in another window.")
    await expect_persona(this_tab, "romantic", "Romantic")


async def test_persona_command_typed_in_the_composer_switches_persona(
    browser: Browser, make_app: AppFactory
) -> None:
    app = await make_app(database_url=None)
    page = await signed_in_with_avatar(browser, app, new_user())
    await send(page, "/persona caring")
    await expect_persona(page, "caring", "Caring")
    reply = await chat(page, "rough day")
    assert await reply.get_attribute("data-persona") == "caring"


async def test_invalid_persona_is_shown_plainly(browser: Browser, make_app: AppFactory) -> None:
    app = await make_app(database_url=None)
    page = await signed_in_with_avatar(browser, app, new_user())
    await send(page, "/persona grumpy")
    error = page.locator(".note.error")
    await expect(error).to_have_text(
        "Unknown personality 'grumpy'; "
        "choose one of: friendly, playful, caring, witty, professional, romantic."
    )


async def test_rate_limited_is_shown_plainly(browser: Browser, make_app: AppFactory) -> None:
    app = await make_app(database_url=None, rate_per_s=0.5, rate_burst=3)
    page = await signed_in_with_avatar(browser, app, new_user())
    for _ in range(3):
        await send(page, "/help")
    await expect(page.locator(".note.error").first).to_have_text(
        "You are sending too fast. Wait a moment, then try again."
    )


async def test_page_reconnects_and_says_so_when_the_connection_drops(
    browser: Browser, make_app: AppFactory
) -> None:
    app = await make_app(database_url=None)
    page = await signed_in_with_avatar(browser, app, new_user())
    await page.evaluate(
        """() => {
          const banner = document.getElementById("banner");
          window.bannerTexts = [];
          new MutationObserver(() => window.bannerTexts.push(banner.textContent))
            .observe(banner, { childList: true, characterData: true, subtree: true });
        }"""
    )
    for session in tuple(app.sessions):
        await session.ws.close(1012, "restarting")
    await expect(page.locator(".note.notice").last).to_have_text("Reconnected.")
    await expect(page.locator("#banner")).to_be_hidden()
    banner_texts = await page.evaluate("window.bannerTexts")
    assert any(text.startswith("Connection lost. Reconnecting") for text in banner_texts)
    reply = await chat(page, "still there?")
    assert await reply.get_attribute("data-persona") == "friendly"


async def test_page_asks_for_a_token_when_dev_tokens_are_off(
    browser: Browser, make_app: AppFactory, database_url: str
) -> None:
    app = await make_app(database_url=database_url, jwt_secret=SECRET)
    page = await open_page(browser, app)
    await sign_in(page, "someone")
    await expect(page.locator("#signin-token")).to_be_visible()
    await expect(page.locator("#signin-hint")).to_contain_text("does not hand out")
    user = new_user()
    await page.fill("#signin-token", mint_token(SECRET, user))
    await page.click("#signin-form button[type=submit]")
    await expect(page.locator("#avatar-form")).to_be_visible()


async def test_refused_token_returns_to_sign_in_with_the_reason(
    browser: Browser, make_app: AppFactory, database_url: str
) -> None:
    app = await make_app(database_url=database_url, jwt_secret=SECRET)
    page = await open_page(browser, app)
    await sign_in(page, "someone")
    await page.fill("#signin-token", mint_token("another-secret-entirely-0123456789", "x"))
    await page.click("#signin-form button[type=submit]")
    await expect(page.locator("#signin-hint")).to_have_text(
        "The server refused the sign-in: bad token signature."
    )


async def assert_fits_the_screen(page: Page, size: ViewportSize) -> None:
    """Nothing is wider than the screen, and every control of the header is on it."""
    assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    controls = page.locator("header button, header select")
    assert await controls.count() >= 2
    for control in await controls.all():
        box = await control.bounding_box()
        assert box is not None, await control.get_attribute("id")
        assert box["x"] >= 0 and box["x"] + box["width"] <= size["width"], box
        assert box["y"] >= 0 and box["y"] + box["height"] <= size["height"], box


async def test_page_fits_a_phone_screen(browser: Browser, make_app: AppFactory) -> None:
    app = await make_app(database_url=None)
    page = await open_page(browser, app, viewport=PHONE)
    assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    await sign_in(page, new_user())
    await create_avatar(page, "Ava", "friendly")
    await send(page, "/help")
    await expect(page.locator(".note.notice pre")).to_be_visible()
    reply = await chat(
        page, "Hi Ava, I baked sourdough bread today: https://example.com/" + "a" * 80
    )
    assert await reply.get_attribute("data-persona") == "friendly"
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "web_page_phone.png"))
    await assert_fits_the_screen(page, PHONE)
    await page.click("#sign-out")
    await expect(page.locator("#signin")).to_be_visible()


async def test_six_personas_are_listed_with_descriptions_and_no_search(
    browser: Browser, make_app: AppFactory
) -> None:
    app = await make_app(database_url=None)
    page = await open_page(browser, app)
    await sign_in(page, new_user())
    form_options = page.locator("#avatar-persona [role=option]")
    await expect(form_options).to_have_count(6)
    await expect(form_options.nth(3)).to_contain_text("Witty")
    await expect(form_options.nth(3).locator(".option-description")).to_have_text(
        "Quick, dry and clever; answers with a raised eyebrow and a wry line."
    )
    await expect(page.locator("#avatar-search")).to_be_hidden()
    await create_avatar(page, "Ava", "caring")
    await page.click("#persona-button")
    await expect(page.locator("#persona-picker [role=option]")).to_have_count(6)
    await expect(page.locator("#persona-search")).to_be_hidden()
    await expect(page.locator('#persona-picker [aria-selected="true"]')).to_contain_text("Caring")
    await page.keyboard.press("ArrowDown")  # the list has the focus, on the current persona
    await page.keyboard.press("Enter")
    await expect(page.locator(".note.notice").last).to_have_text("Now speaking as Witty.")
    await expect_persona(page, "witty", "Witty")


async def test_many_personas_are_searched_and_switched_to_on_a_phone(
    browser: Browser, make_app: AppFactory, guests: list[str]
) -> None:
    app = await make_app(database_url=None)
    errors: list[str] = []
    page = await open_page(browser, app, errors, viewport=PHONE)
    await sign_in(page, new_user())
    total = 6 + GUESTS
    await expect(page.locator("#avatar-persona [role=option]")).to_have_count(total)
    await expect(page.locator("#avatar-search")).to_be_visible()
    await expect(page.locator("#avatar-status")).to_have_text(f"{total} personas")
    # every word counts, in the id, the name or the description: guest-0002, 0012, 0020 to 0029
    await page.fill("#avatar-search", "guest 2")
    await expect(page.locator("#avatar-status")).to_have_text(f"12 of {total} match “guest 2”")
    await expect(page.locator("#avatar-persona [role=option]:visible")).to_have_count(12)
    await page.fill("#avatar-search", "")
    await create_avatar(page, "Ava", "friendly")

    await page.click("#persona-button")
    search = page.locator("#persona-search")
    await expect(search).to_be_focused()
    await page.keyboard.type("guest 1")  # guest-0001, 0010 to 0019, 0021
    await expect(page.locator("#persona-status")).to_have_text(f"12 of {total} match “guest 1”")
    shown = page.locator("#persona-picker [role=option]:visible")
    await expect(shown).to_have_count(12)
    await expect(shown.first).to_contain_text("Guest 1")
    # the current persona is filtered out of sight, and still the one picked
    await expect(option(page, "#persona-picker", "friendly")).to_be_hidden()
    await expect_persona(page, "friendly", "Friendly")
    ARTIFACTS.mkdir(exist_ok=True)
    await page.screenshot(path=str(ARTIFACTS / "web_page_phone_personas.png"))
    panel = await page.locator("#persona-panel").bounding_box()
    assert panel is not None
    assert panel["x"] >= 0 and panel["x"] + panel["width"] <= PHONE["width"], panel
    assert await page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")

    await page.keyboard.type("2")  # "guest 12" leaves one
    await expect(shown).to_have_count(1)
    await page.keyboard.press("Enter")
    await expect(page.locator("#persona-panel")).to_be_hidden()
    await expect(page.locator(".note.notice").last).to_have_text("Now speaking as Guest 12.")
    await expect_persona(page, "guest-0012", "Guest 12")
    reply = await chat(page, "who are you today?")
    assert await reply.get_attribute("data-persona") == "guest-0012"
    assert await reply.locator(".persona").inner_text() == "Guest 12"

    await pick_persona(page, "witty")  # a click on a persona, the search field empty again
    await expect(page.locator(".note.notice").last).to_have_text("Now speaking as Witty.")
    reply = await chat(page, "and now?")
    assert await reply.get_attribute("data-persona") == "witty"
    await assert_fits_the_screen(page, PHONE)
    assert errors == []


async def test_a_new_avatars_greeting_is_its_first_message(
    browser: Browser, make_app: AppFactory, database_url: str
) -> None:
    card: dict[str, object] = {
        "spec": "chara_card_v3",
        "spec_version": "3.0",
        "data": {
            "name": "Greeter",
            "description": "Says hello first.",
            "first_mes": "Hi {{user}}! I'm {{char}}, and I greet everyone.",
        },
    }
    ids = await add_to_catalogue(database_url, 1, "greeter", [card])
    try:
        app = await make_app(database_url=None)
        errors: list[str] = []
        page = await open_page(browser, app, errors)
        user = new_user()
        await sign_in(page, user)
        await create_avatar(page, "Juniper", ids[0])
        greeting = page.locator(".msg").first
        await expect(greeting).to_have_class("msg assistant greeting")
        await expect(greeting.locator(".text")).to_have_text(
            f"Hi {user}! I'm Juniper, and I greet everyone."
        )
        await expect(greeting).to_have_attribute("data-persona", ids[0])
        await expect(greeting.locator(".persona")).to_have_text("Greeter")
        reply = await chat(page, "hello")
        await expect(page.locator(".msg")).to_have_count(3)  # it stays, once
        assert await reply.get_attribute("data-persona") == ids[0]
        assert errors == []
    finally:
        await remove_personas(database_url, ids)


async def test_an_avatar_whose_card_has_no_greeting_starts_an_empty_conversation(
    browser: Browser, make_app: AppFactory, guests: list[str]
) -> None:
    app = await make_app(database_url=None)
    errors: list[str] = []
    page = await open_page(browser, app, errors)
    await sign_in(page, new_user())
    await create_avatar(page, "Ava", guests[0])  # a minimal card: no first_mes
    await chat(page, "hello")
    messages = page.locator(".msg")
    await expect(messages).to_have_count(2)
    await expect(messages.first).to_have_class("msg user")
    assert errors == []


async def test_help_is_shown_in_a_monospace_block(browser: Browser, make_app: AppFactory) -> None:
    app = await make_app(database_url=None)
    page = await signed_in_with_avatar(browser, app, new_user())
    await send(page, "/help")
    block = page.locator(".note.notice pre")
    await expect(block).to_contain_text("/persona NAME  switch the avatar's personality")
    font = await block.evaluate("element => getComputedStyle(element).fontFamily")
    assert font.endswith("monospace"), font
    assert "\n/personas      list the personalities\n" in await block.inner_text()


async def test_unavailable_shows_the_servers_own_message(
    browser: Browser, make_app: AppFactory, refused_url: str
) -> None:
    app = await make_app(database_url=None, generator="openai", llm_base_url=refused_url)
    page = await signed_in_with_avatar(browser, app, new_user())
    await send(page, "hello?")
    await expect(page.locator(".note.error")).to_have_text(
        f"Cannot connect to the LLM endpoint {refused_url}: connection refused."
    )


async def test_a_failed_reply_is_marked_after_a_reload_not_an_empty_bubble(
    browser: Browser, make_app: AppFactory, refused_url: str
) -> None:
    app = await make_app(database_url=None, generator="openai", llm_base_url=refused_url)
    user = new_user()
    page = await signed_in_with_avatar(browser, app, user)
    await send(page, "hello?")
    await expect(page.locator(".note.error")).to_be_visible()
    again = await open_page(browser, app)
    await sign_in(again, user)
    reply = again.locator(".msg.assistant").last
    await expect(reply).to_have_attribute("data-status", "failed")
    await expect(reply.locator(".text")).to_have_text("No reply (unavailable).")
    await expect(reply.locator(".status")).to_have_text("failed")


# ---------------------------------------------------------------------------- a fresh machine


def fake_apt_get(directory: Path, target: Path, fail: bool = False) -> dict[str, str]:
    """A PATH whose apt-get logs its arguments and, for `install`, creates `target` (the real
    one would download from Debian's mirrors); an environment that uses it."""
    directory.mkdir()
    script = directory / "apt-get"
    script.write_text(
        "#!/bin/sh\n"
        f'echo "$@" >> {directory}/calls\n'
        + ("echo 'E: Unable to locate package chromium' >&2; exit 100\n" if fail else "")
        + f'[ "$1" = install ] && touch {target}\n'
        "exit 0\n"
    )
    script.chmod(0o755)
    return {"PATH": f"{directory}:/usr/bin:/bin"}


def test_missing_chromium_is_installed_with_apt_get_when_root(tmp_path: Path) -> None:
    target = tmp_path / "chromium"
    env = fake_apt_get(tmp_path / "bin", target)
    said: list[str] = []
    assert ensure_chromium(said.append, target, is_root=True, env=env) is None
    assert target.exists()
    calls = (tmp_path / "bin" / "calls").read_text().splitlines()
    assert calls == ["update -qq", "install -y -qq chromium"]
    assert said == [
        f"{target} is missing: installing Debian's chromium for the web page test",
        "+ apt-get update -qq",
        "+ apt-get install -y -qq chromium",
        f"installed {target}",
    ]


def test_missing_chromium_that_cannot_be_installed_says_why(tmp_path: Path) -> None:
    target = tmp_path / "chromium"
    env = fake_apt_get(tmp_path / "bin", target, fail=True)
    problem = ensure_chromium(lambda line: None, target, is_root=True, env=env)
    assert problem is not None
    assert problem.startswith("apt-get update -qq failed with 100 (E: Unable to locate package")
    not_root = ensure_chromium(lambda line: None, target, is_root=False, env=env)
    assert (
        not_root == f"{target} is missing and this is not root, so it was not installed: {MANUAL}"
    )
    assert not target.exists()


def test_chromium_already_there_runs_nothing(tmp_path: Path) -> None:
    target = tmp_path / "chromium"
    target.touch()
    env = fake_apt_get(tmp_path / "bin", target)
    assert ensure_chromium(lambda line: None, target, is_root=True, env=env) is None
    assert not (tmp_path / "bin" / "calls").exists()
