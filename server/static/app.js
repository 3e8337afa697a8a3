// Persona chat in the browser: sign in, create the avatar, chat, switch persona, reconnect.
// Speaks version 1 of the wire protocol over one WebSocket. No framework, no build step.

const RETRY_DELAYS_MS = [10, 50, 100, 150, 200, 250, 500, 1000, 2000]; // as Phoenix does
const MAX_RETRY_DELAY_MS = 5000;
const HISTORY_PAGE = 50;
const STORAGE_KEY = "persona-chat.signin";
const SEARCH_ABOVE = 12; // a persona chooser shows a search field past this many personas

// Plainer words for errors whose server message says less than these; any other error shows
// the server's own message, which names the cause ("cannot connect to the LLM endpoint …").
const ERROR_TEXT = {
  // a server with a catalogue names the choices (at most 20, "and N more") in its message
  invalid_persona: (frame) =>
    /one of:/i.test(frame.message ?? "")
      ? sentence(frame.message)
      : `${sentence(frame.message)} Choose one of: ${(frame.details?.allowed ?? []).join(", ")}.`,
  rate_limited: () => "You are sending too fast. Wait a moment, then try again.",
  busy: () => "Too many messages are waiting for a reply. Wait for one first.",
};

const state = {
  signin: null, // {user, token}
  ws: null,
  connected: false, // true between `welcome` and the socket's close
  attempts: 0,
  retryTimer: null,
  personas: [],
  avatar: null,
  historyLoaded: false,
  oldestId: null,
  requests: new Map(), // frame id -> its type, until the answer arrives
  pending: new Map(), // chat id -> its reply's <li> (null until the first delta)
  greeting: null, // a new avatar's greeting shown before the history came: {item, text}
};

const $ = (id) => document.getElementById(id);

// ------------------------------------------------------------------ frame ids

const idPrefix = Array.from(crypto.getRandomValues(new Uint32Array(2)), (n) => n.toString(36))
  .join("");
let idCounter = 0;

// Unique across page loads: the server refuses a reused chat id with a different text.
function nextId() {
  idCounter += 1;
  return `${idPrefix}-${idCounter}`;
}

// ------------------------------------------------------------------ connection

function wsUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  return `${scheme}//${location.host}/ws`;
}

function connect() {
  clearTimeout(state.retryTimer);
  const ws = new WebSocket(wsUrl());
  state.ws = ws;
  ws.addEventListener("open", () => send({ type: "hello", token: state.signin.token }));
  ws.addEventListener("message", (event) => onMessage(event.data));
  ws.addEventListener("close", (event) => onClose(ws, event));
}

function send(frame) {
  if (state.ws?.readyState !== WebSocket.OPEN) return null;
  const id = nextId();
  state.ws.send(JSON.stringify({ id, ...frame }));
  if (frame.type !== "cancel") state.requests.set(id, frame.type); // cancel has no answer
  return id;
}

function disconnect() {
  const ws = state.ws;
  state.ws = null;
  state.connected = false;
  clearTimeout(state.retryTimer);
  ws?.close(1000, "signed out");
}

function onClose(ws, event) {
  if (ws !== state.ws) return; // closed on purpose
  state.ws = null;
  state.connected = false;
  interruptPendingReplies();
  updateControls();
  if (event.code === 4401) {
    signOut(`The server refused the sign-in: ${event.reason || "invalid token"}.`);
    return;
  }
  scheduleReconnect();
}

function scheduleReconnect() {
  const delay = RETRY_DELAYS_MS[state.attempts] ?? MAX_RETRY_DELAY_MS;
  state.attempts += 1;
  const when = delay >= 1000 ? ` in ${delay / 1000} s` : "";
  showBanner(`Connection lost. Reconnecting${when}… (attempt ${state.attempts})`);
  state.retryTimer = setTimeout(connect, delay);
}

// ------------------------------------------------------------------ incoming frames

const HANDLERS = {
  welcome: onWelcome,
  avatar: onAvatar,
  history: onHistory,
  persona_set: onPersonaSet,
  persona_changed: onPersonaChanged,
  reply_delta: onReplyDelta,
  reply: onReply,
  personas: onPersonas,
  notice: (frame) => addPreformatted(frame.text, "notice"),
  error: onError,
  pong: () => {},
};

function onMessage(data) {
  let frame;
  try {
    frame = JSON.parse(data);
  } catch {
    return;
  }
  HANDLERS[frame.type]?.(frame);
  if (frame.type !== "reply_delta") state.requests.delete(frame.ref);
}

function onWelcome(frame) {
  const reconnected = state.attempts > 0;
  state.attempts = 0;
  state.connected = true;
  state.signin = { ...state.signin, user: frame.user_id };
  hideBanner();
  state.personas = frame.personas;
  personaChooser.setPersonas(state.personas);
  avatarChooser.setPersonas(state.personas);
  $("session").hidden = false;
  if (frame.avatar) showChat(frame.avatar);
  else showAvatarForm();
  if (reconnected) addNote("Reconnected.", "notice");
  updateControls();
}

// The answer to create_avatar (or get_avatar); a new avatar's may carry the card's greeting,
// which is the conversation's first message.
function onAvatar(frame) {
  showChat(frame.avatar);
  if (typeof frame.greeting === "string" && frame.greeting) showGreeting(frame);
}

function showGreeting(frame) {
  const item = messageItem("assistant", frame.greeting, { persona: frame.avatar.personality });
  item.classList.add("greeting");
  appendToLog(item);
  state.greeting = { item, text: frame.greeting };
}

function onHistory(frame) {
  const items = frame.messages.map((entry) =>
    messageItem(entry.role, entry.text, {
      persona: entry.persona,
      at: entry.created_at,
      status: entry.status,
      error: entry.error,
    }),
  );
  const scroller = $("scroller");
  const heightBefore = scroller.scrollHeight;
  // a greeting the server keeps in the history is shown once, from the history
  const greeting = state.greeting;
  if (greeting && frame.messages.some((m) => m.role === "assistant" && m.text === greeting.text)) {
    greeting.item.remove();
  }
  state.greeting = null;
  $("log").prepend(...items);
  if (frame.messages.length) state.oldestId = frame.messages[0].id;
  $("older").hidden = frame.messages.length < HISTORY_PAGE;
  if (state.historyLoaded) scroller.scrollTop += scroller.scrollHeight - heightBefore;
  else scrollToEnd();
  state.historyLoaded = true;
}

function onPersonaSet(frame) {
  setPersona(frame.personality);
  addNote(`Now speaking as ${personaName(frame.personality)}.`, "notice");
}

function onPersonaChanged(frame) {
  setPersona(frame.personality);
  addNote(`Persona changed to ${personaName(frame.personality)} in another window.`, "notice");
}

function onReplyDelta(frame) {
  const item = replyItem(frame.ref);
  item.querySelector(".text").textContent += frame.delta;
  scrollToEnd();
}

function onReply(frame) {
  const item = replyItem(frame.ref);
  item.querySelector(".text").textContent = frame.text;
  labelReply(item, frame.persona, frame.status);
  state.pending.delete(frame.ref);
  updateControls();
  scrollToEnd();
}

function onPersonas(frame) {
  const lines = frame.personas.map((p) => `${p.id}: ${p.description}`);
  addNote(["Personalities:", ...lines].join("\n"), "notice");
}

function onError(frame) {
  const kind = state.requests.get(frame.ref);
  if (state.pending.has(frame.ref)) endReply(frame.ref, "failed");
  if (kind === "set_persona") personaChooser.setValue(state.avatar?.personality ?? "");
  if (kind === "create_avatar") return onAvatarError(frame);
  if (frame.code === "no_avatar") return showAvatarForm();
  if (frame.code === "nothing_to_cancel") return;
  addNote(describeError(frame), "error");
}

function describeError(frame) {
  return ERROR_TEXT[frame.code]?.(frame) ?? sentence(frame.message);
}

function onAvatarError(frame) {
  if (frame.code === "avatar_exists") {
    send({ type: "get_avatar" });
    return;
  }
  const error = $("avatar-error");
  error.textContent = describeError(frame);
  error.hidden = false;
}

// ------------------------------------------------------------------ chatting

function sendChat(text) {
  const id = send({ type: "chat", text });
  if (isCommand(text)) {
    addNote(text, "command");
    return;
  }
  appendToLog(messageItem("user", text.startsWith("//") ? text.slice(1) : text));
  state.pending.set(id, null);
  updateControls();
}

function isCommand(text) {
  return text.startsWith("/") && !text.startsWith("//");
}

function stopReply() {
  send({ type: "cancel" });
  $("stop").disabled = true;
}

function changePersona(personality) {
  if (personality !== state.avatar?.personality) send({ type: "set_persona", personality });
}

// The reply <li> for a chat, created when its first delta (or the reply) arrives.
function replyItem(ref) {
  let item = state.pending.get(ref);
  if (!item) {
    item = messageItem("assistant", "", { persona: state.avatar?.personality, status: "streaming" });
    appendToLog(item);
    if (state.pending.has(ref)) state.pending.set(ref, item);
  }
  return item;
}

function endReply(ref, status) {
  const item = state.pending.get(ref);
  if (item) labelReply(item, item.dataset.persona, status);
  state.pending.delete(ref);
  updateControls();
}

function interruptPendingReplies() {
  for (const ref of [...state.pending.keys()]) endReply(ref, "interrupted");
  state.requests.clear();
}

// ------------------------------------------------------------------ the conversation log

function messageItem(role, text, { persona, status = "completed", at, error } = {}) {
  const item = element("li", `msg ${role}`);
  if (role === "assistant") item.append(element("span", "persona"));
  // a stored reply that failed before any text: say so rather than show an empty bubble
  const shown = !text && status === "failed" ? `No reply (${error || "failed"}).` : text;
  item.append(element("p", "text", shown));
  if (at) item.title = new Date(at).toLocaleString();
  if (role === "assistant") labelReply(item, persona, status);
  return item;
}

function labelReply(item, persona, status) {
  item.dataset.persona = persona ?? "";
  item.dataset.status = status;
  item.querySelector(".persona").textContent = personaName(persona);
  item.querySelector(".status")?.remove();
  const marks = { cancelled: "stopped", failed: "failed", interrupted: "interrupted" };
  if (marks[status]) item.append(element("span", "status", marks[status]));
}

function addNote(text, kind) {
  appendToLog(element("li", `note ${kind}`, text));
}

// Text the server laid out in columns for a terminal, such as the /help answer.
function addPreformatted(text, kind) {
  const item = element("li", `note ${kind} preformatted`);
  item.append(element("pre", "", text));
  appendToLog(item);
}

function appendToLog(item) {
  $("log").append(item);
  scrollToEnd();
}

function scrollToEnd() {
  const scroller = $("scroller");
  scroller.scrollTop = scroller.scrollHeight;
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// ------------------------------------------------------------------ personas

function personaName(id) {
  return state.personas.find((p) => p.id === id)?.name ?? id ?? "";
}

function setPersona(personality) {
  if (state.avatar) state.avatar = { ...state.avatar, personality };
  personaChooser.setValue(personality);
  $("persona-current").textContent = personaName(personality);
  showWho();
}

// A list of personas with their descriptions (an ARIA listbox), and a search field above it
// once there are more than SEARCH_ABOVE. The arrow keys, Home, End, Page Up and Page Down move
// through the personas shown; Enter (or Space in the list, or a click) picks one. With
// `followFocus` (the create-avatar form) moving is picking, and Enter in the list submits the
// form. Filtering never changes which persona is picked.
class Chooser {
  constructor(root, { followFocus = false, onPick = () => {} } = {}) {
    this.root = root;
    this.search = root.querySelector(".chooser-search");
    this.status = root.querySelector(".chooser-status");
    this.list = root.querySelector(".chooser-list");
    this.followFocus = followFocus;
    this.onPick = onPick;
    this.options = []; // one <li> per persona, in the catalogue's order
    this.value = "";
    this.active = null; // the option the keys are on
    this.search.addEventListener("input", () => this.filter({ scroll: true }));
    this.search.addEventListener("keydown", (event) => this.onKey(event, true));
    this.list.addEventListener("keydown", (event) => this.onKey(event, false));
    this.list.addEventListener("focus", () => this.activate(this.startingOption()));
    this.list.addEventListener("click", (event) => {
      const option = event.target.closest("[role=option]");
      if (option) this.pick(option);
    });
  }

  get searchable() {
    return this.options.length > SEARCH_ABOVE;
  }

  setPersonas(personas) {
    this.options = personas.map((persona, index) => {
      const option = element("li", "chooser-option");
      option.id = `${this.list.id}-${index}`;
      option.setAttribute("role", "option");
      option.dataset.id = persona.id;
      option.dataset.words = `${persona.id} ${persona.name} ${persona.description}`.toLowerCase();
      const description = element("span", "option-description", persona.description);
      description.title = persona.description;
      option.append(element("span", "option-name", persona.name), description);
      return option;
    });
    this.list.replaceChildren(...this.options);
    this.search.hidden = !this.searchable;
    if (!this.searchable) this.search.value = "";
    this.active = null;
    this.setValue(this.value);
    this.filter();
  }

  setValue(id) {
    this.value = id ?? "";
    this.root.dataset.value = this.value;
    for (const option of this.options) {
      option.setAttribute("aria-selected", String(option.dataset.id === this.value));
    }
  }

  // Shows the personas whose id, name or description holds every word typed.
  filter({ scroll = false } = {}) {
    const query = this.search.value.trim();
    const words = query.toLowerCase().split(/\s+/).filter(Boolean);
    for (const option of this.options) {
      option.hidden = !words.every((word) => option.dataset.words.includes(word));
    }
    const shown = this.visible();
    this.status.textContent = !this.searchable
      ? ""
      : !words.length
        ? `${this.options.length} personas`
        : shown.length
          ? `${shown.length} of ${this.options.length} match “${query}”`
          : `No persona matches “${query}”.`;
    this.activate(words.length ? (shown[0] ?? null) : this.startingOption(), { scroll });
  }

  visible() {
    return this.options.filter((option) => !option.hidden);
  }

  // The picked persona when it is shown, else the first one shown.
  startingOption() {
    const shown = this.visible();
    return shown.find((option) => option.dataset.id === this.value) ?? shown[0] ?? null;
  }

  // Puts the keys on `option`; `scroll` brings it into view (not on a click's focus, which would
  // move the list under the pointer between its press and its release).
  activate(option, { scroll = false } = {}) {
    this.active?.classList.remove("active");
    this.active = option;
    for (const owner of [this.search, this.list]) {
      if (option) owner.setAttribute("aria-activedescendant", option.id);
      else owner.removeAttribute("aria-activedescendant");
    }
    if (option) {
      option.classList.add("active");
      if (scroll) option.scrollIntoView({ block: "nearest" });
    }
  }

  move(step) {
    const shown = this.visible();
    if (!shown.length) return;
    const at = shown.indexOf(this.active);
    const last = shown.length - 1;
    let index;
    if (step === "first") index = 0;
    else if (step === "last") index = last;
    else if (at < 0) index = step > 0 ? 0 : last;
    else index = Math.min(last, Math.max(0, at + step));
    this.activate(shown[index], { scroll: true });
    if (this.followFocus) this.pick(shown[index]);
  }

  pick(option) {
    this.activate(option);
    this.setValue(option.dataset.id);
    this.onPick(option.dataset.id);
  }

  onKey(event, inSearch) {
    const step = STEPS[event.key];
    if (step !== undefined && !(inSearch && typeof step === "string")) {
      event.preventDefault();
      this.move(step);
    } else if (event.key === "Enter" && !event.isComposing) {
      event.preventDefault(); // in a form, Enter in the search field picks and does not submit
      if (this.active && (!this.followFocus || inSearch)) this.pick(this.active);
      else if (this.followFocus) this.root.closest("form")?.requestSubmit();
    } else if (event.key === " " && !inSearch) {
      event.preventDefault();
      if (this.active) this.pick(this.active);
    } else if (!inSearch && this.searchable && isTypedCharacter(event)) {
      this.search.focus(); // the character lands in the search field
    }
  }

  // Where the keyboard starts: the search field when there is one, else the list.
  focus() {
    (this.searchable ? this.search : this.list).focus();
  }

  clearSearch() {
    if (!this.search.value) return;
    this.search.value = "";
    this.filter();
  }
}

const STEPS = { ArrowDown: 1, ArrowUp: -1, PageDown: 8, PageUp: -8, Home: "first", End: "last" };

function isTypedCharacter(event) {
  const modified = event.ctrlKey || event.metaKey || event.altKey;
  return event.key.length === 1 && event.key !== " " && !modified;
}

// The header's persona button opens a panel with the chooser; picking switches and closes it.
const personaChooser = new Chooser($("persona-picker"), {
  onPick: (id) => {
    closePersonaPanel();
    changePersona(id);
  },
});
const avatarChooser = new Chooser($("avatar-persona"), { followFocus: true });

function openPersonaPanel() {
  personaChooser.clearSearch();
  $("persona-panel").hidden = false;
  $("persona-button").setAttribute("aria-expanded", "true");
  personaChooser.activate(personaChooser.startingOption(), { scroll: true });
  personaChooser.focus();
}

function closePersonaPanel({ refocus = true } = {}) {
  if ($("persona-panel").hidden) return;
  const hadFocus = $("persona-panel").contains(document.activeElement);
  $("persona-panel").hidden = true;
  $("persona-button").setAttribute("aria-expanded", "false");
  if (refocus && hadFocus) $("persona-button").focus();
}

function togglePersonaPanel() {
  if ($("persona-panel").hidden) openPersonaPanel();
  else closePersonaPanel();
}

function onPersonaPanelKey(event) {
  if (event.key === "Escape") {
    event.preventDefault();
    closePersonaPanel();
  }
}

// A click or a focus outside the panel (and its button) closes it.
function closePersonaPanelIfOutside(target) {
  const inside = $("persona-panel").contains(target) || $("persona-button").contains(target);
  if (target && !inside) closePersonaPanel({ refocus: false });
}

// ------------------------------------------------------------------ screens

function showOnly(id) {
  for (const section of ["signin", "create-avatar", "chat"]) $(section).hidden = section !== id;
}

function showAvatarForm() {
  state.avatar = null;
  updateControls();
  closePersonaPanel({ refocus: false });
  showOnly("create-avatar");
  avatarChooser.clearSearch();
  if (!state.personas.some((p) => p.id === avatarChooser.value)) {
    avatarChooser.setValue(state.personas[0]?.id ?? "");
  }
  $("avatar-name").focus();
  avatarChooser.activate(avatarChooser.startingOption(), { scroll: true });
}

function showChat(avatar) {
  state.avatar = avatar;
  setPersona(avatar.personality);
  showOnly("chat");
  if (!state.historyLoaded) send({ type: "history", limit: HISTORY_PAGE });
  updateControls();
  $("message").focus();
}

function showWho() {
  const avatar = state.avatar ? ` · talking to ${state.avatar.name}` : "";
  $("who").textContent = `${state.signin?.user ?? ""}${avatar}`;
}

function updateControls() {
  const ready = state.connected && state.avatar !== null;
  $("send").disabled = !ready;
  $("persona-button").disabled = !ready;
  if (!ready) closePersonaPanel({ refocus: false });
  $("picker").hidden = state.avatar === null;
  $("stop").hidden = state.pending.size === 0;
  $("stop").disabled = !state.connected;
}

function showBanner(text) {
  $("banner").textContent = text;
  $("banner").hidden = false;
}

function hideBanner() {
  $("banner").hidden = true;
}

function sentence(text) {
  const trimmed = String(text ?? "").trim();
  const capital = trimmed.charAt(0).toUpperCase() + trimmed.slice(1);
  return /[.!?]$/.test(capital) ? capital : `${capital}.`;
}

// ------------------------------------------------------------------ signing in

async function onSignInSubmit(event) {
  event.preventDefault();
  const name = $("signin-name").value.trim();
  if (!$("signin-token-row").hidden) {
    signIn({ user: "", token: $("signin-token").value.trim() });
    return;
  }
  const answer = await fetchDevToken(name);
  if (answer.token) signIn({ user: name, token: answer.token });
  else if (answer.status === 404) askForToken();
  else $("signin-hint").textContent = answer.message;
}

// `GET /dev/token` exists only on a development server; elsewhere it answers 404.
async function fetchDevToken(user) {
  try {
    const response = await fetch(`/dev/token?user=${encodeURIComponent(user)}`);
    if (response.ok) return { token: (await response.json()).token };
    return { status: response.status, message: (await response.text()).trim() };
  } catch {
    return { status: 0, message: "Cannot reach the server. Is it running?" };
  }
}

function askForToken() {
  $("signin-name-row").hidden = true;
  $("signin-name").required = false;
  $("signin-token-row").hidden = false;
  $("signin-token").required = true;
  $("signin-hint").textContent =
    "This server does not hand out development tokens. Paste the token you were given.";
  $("signin-token").focus();
}

function signIn(signin) {
  state.signin = signin;
  sessionStorage.setItem(STORAGE_KEY, JSON.stringify(signin));
  showOnly(null);
  showWho();
  showBanner("Connecting…");
  connect();
}

function signOut(message = "") {
  disconnect();
  sessionStorage.removeItem(STORAGE_KEY);
  Object.assign(state, {
    signin: null,
    avatar: null,
    attempts: 0,
    historyLoaded: false,
    oldestId: null,
    greeting: null,
  });
  state.pending.clear();
  state.requests.clear();
  $("log").replaceChildren();
  $("session").hidden = true;
  hideBanner();
  $("signin-hint").textContent = message;
  showOnly("signin");
  $("signin-name").focus();
}

function storedSignIn() {
  try {
    return JSON.parse(sessionStorage.getItem(STORAGE_KEY) ?? "null");
  } catch {
    return null;
  }
}

// ------------------------------------------------------------------ wiring

function onComposerSubmit(event) {
  event.preventDefault();
  const box = $("message");
  const text = box.value.trim();
  if (!text || $("send").disabled) return;
  sendChat(text);
  box.value = "";
}

function onComposerKey(event) {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
}

function onAvatarSubmit(event) {
  event.preventDefault();
  $("avatar-error").hidden = true;
  const name = $("avatar-name").value.trim();
  if (name && state.connected) {
    send({ type: "create_avatar", name, personality: avatarChooser.value });
  }
}

function loadOlder() {
  if (state.connected && state.oldestId !== null) {
    send({ type: "history", limit: HISTORY_PAGE, before: state.oldestId });
  }
}

function start() {
  $("signin-form").addEventListener("submit", onSignInSubmit);
  $("avatar-form").addEventListener("submit", onAvatarSubmit);
  $("composer").addEventListener("submit", onComposerSubmit);
  $("message").addEventListener("keydown", onComposerKey);
  $("stop").addEventListener("click", stopReply);
  $("persona-button").addEventListener("click", togglePersonaPanel);
  $("persona-panel").addEventListener("keydown", onPersonaPanelKey);
  $("persona-panel").addEventListener("focusout", (event) =>
    closePersonaPanelIfOutside(event.relatedTarget),
  );
  document.addEventListener("pointerdown", (event) => closePersonaPanelIfOutside(event.target));
  $("sign-out").addEventListener("click", () => signOut());
  $("older").addEventListener("click", loadOlder);
  const signin = storedSignIn();
  if (signin) signIn(signin);
  else signOut();
}

start();
