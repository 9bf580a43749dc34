// The browser chat client: sign-in, rooms with unread badges, messages with scroll-back,
// edits, deletes, reactions, attachments, typing, presence, delivery ticks, threads and a
// visible connection state. The SDK (./sdk, the TypeScript client's build) does the
// protocol, reconnects with backoff, recovers each joined room with `since_seq` and
// reports what arrived (`received`), which is what other members' ticks are made of.
import { ChatClient } from './sdk/index.js';
import { h, memberItem, messageItem, roomItem, setTicks, threadTitle } from './view.js';

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = 'chat.token';
const PAGE = 50;
/** Typing is refreshed this often while keys are pressed (the server expires it after 6 s). */
const TYPING_REFRESH_MS = 3000;
/** Typing stops this long after the last key. */
const TYPING_IDLE_MS = 4000;
/** Someone else's typing is shown at most this long without a refresh. */
const TYPING_SHOWN_MS = 7000;
const STATE_LABELS = { idle: 'idle', connecting: 'connecting…', open: 'connected', reconnecting: 'reconnecting…', closed: 'disconnected' };

/** Everything the page knows, in one place. */
const app = {
  client: null,
  me: null,
  admin: false,
  /**
   * id → {id, name, kind, last_seq, unread, members: [user ids] | null, online: Set,
   * messages: Map<seq, message>, loaded, hasOlder, receipts: Map<user id, {delivered, read}>}
   */
  rooms: new Map(),
  current: null,
  /** The open thread panel: {room, root, replies: Map<seq, message>}, or null. Always of the current room. */
  thread: null,
  /** room id → Map<user id, timer> of who is typing there. */
  typing: new Map(),
  myTyping: { active: false, sentAt: 0, idleTimer: 0 },
  /** attachment id → object URL, so an image is fetched once. */
  images: new Map(),
};

// ---- sign-in ----------------------------------------------------------------------

$('signin-name-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  const user = $('signin-user').value.trim();
  if (!user) return;
  try {
    const res = await fetch('/v1/dev/token', {
      method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ user_id: user }),
    });
    const body = await res.json().catch(() => ({}));
    if (res.status === 404) throw new Error('Signing in by name is off on this gateway (DEV_TOKENS); paste a token instead.');
    if (!res.ok) throw new Error(body.error?.message ?? `sign-in failed (${res.status})`);
    await signIn(body.token);
  } catch (err) {
    $('signin-error').textContent = err.message;
  }
});

$('signin-token-form').addEventListener('submit', (e) => {
  e.preventDefault();
  const token = $('signin-token').value.trim();
  if (token) signIn(token).catch((err) => { $('signin-error').textContent = err.message; });
});

$('signout').addEventListener('click', () => {
  sessionStorage.removeItem(TOKEN_KEY);
  app.client?.close();
  location.reload();
});

async function signIn(token) {
  $('signin-error').textContent = '';
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  const client = new ChatClient({ url: `${scheme}://${location.host}/ws`, token });
  app.client = client;
  client.on('state', ({ state }) => showState(state));
  client.on('message', onMessage);
  client.on('message_edited', ({ room, message }) => putMessage(room, message));
  client.on('message_deleted', ({ room, message_id, seq }) => {
    const msg = findMessage(room, (m) => m.seq === seq);
    if (msg && msg.id === message_id) putMessage(room, { ...msg, deleted: true, text: null, attachments: [] });
  });
  client.on('delivered', ({ room, user_id, seq }) => moveReceipt(room, user_id, { delivered: seq }));
  // Reading implies having received: a `read` moves delivered too (without a `delivered` event).
  client.on('read', ({ room, user_id, seq }) => moveReceipt(room, user_id, { delivered: seq, read: seq }));
  client.on('reaction', onReaction);
  client.on('typing', onTyping);
  client.on('presence', ({ room, user_id, status }) => {
    const r = app.rooms.get(room);
    if (!r) return;
    if (status === 'online') r.online.add(user_id); else r.online.delete(user_id);
    if (room === app.current) renderRoom();
  });
  client.on('room_added', ({ room }) => addRoom(room).catch(showError));
  client.on('room_removed', ({ room }) => removeRoom(room));
  client.on('recovered', ({ room, truncated }) => {
    // More was missed than a re-join replays: read the newest page again.
    if (truncated) reloadRoom(room).catch(showError);
    // Receipt events are not replayed: ask again what was missed while away.
    const entry = app.rooms.get(room);
    if (entry) loadReceipts(entry).catch(() => {});
  });
  try {
    const welcome = await client.connect();
    app.me = welcome.user_id;
    app.admin = roleOf(token) === 'admin';
  } catch (err) {
    client.close();
    throw new Error(err.code === 'unauthorized' ? `Token refused: ${err.message}` : err.message);
  }
  sessionStorage.setItem(TOKEN_KEY, token);
  $('me').textContent = app.me;
  $('signin').hidden = true;
  $('chat').hidden = false;
  const summaries = await client.rooms();
  await Promise.all(summaries.map((summary) => trackRoom({ ...summary, members: null })));
  renderRooms();
}

/** The `role` claim of a token, for the admin-only delete button (the server decides). */
function roleOf(token) {
  try {
    const part = token.split('.')[1].replace(/-/g, '+').replace(/_/g, '/');
    return JSON.parse(atob(part)).role;
  } catch {
    return undefined;
  }
}

function showState(state) {
  const el = $('conn-state');
  el.dataset.state = state;
  el.textContent = STATE_LABELS[state] ?? state;
}

function showError(err) {
  $('room-error').textContent = err?.message ?? String(err);
}

// ---- rooms --------------------------------------------------------------------------

/** Joins a room so its events arrive (and are recovered after reconnects) and lists it. */
async function trackRoom(room) {
  const entry = {
    id: room.id, name: room.name, kind: room.kind, last_seq: room.last_seq ?? 0, unread: room.unread ?? 0,
    members: room.members ? room.members.map((m) => m.user_id) : null,
    online: new Set(), messages: new Map(), loaded: false, hasOlder: false, receipts: new Map(),
  };
  for (const user of entry.members ?? []) entry.receipts.set(user, { delivered: 0, read: 0 });
  app.rooms.set(room.id, entry);
  const ack = await app.client.join(room.id);
  entry.online = new Set(ack.online);
  entry.last_seq = Math.max(entry.last_seq, ack.last_seq);
  // Without receipts the page still works: own messages just stay at ✓.
  await loadReceipts(entry).catch(() => {});
  return entry;
}

// ---- delivery ticks -----------------------------------------------------------------

/** Every member's delivered and read seq, merged forward into what events already said. */
async function loadReceipts(room) {
  const members = await app.client.receipts(room.id);
  for (const m of members) moveReceipt(room.id, m.user_id, { delivered: m.delivered_seq, read: m.read_seq }, false);
  refreshTicks(room.id);
}

/** Moves a member's seqs forward (never back: events and replies may cross). */
function moveReceipt(roomId, userId, { delivered = 0, read = 0 }, redraw = true) {
  const room = app.rooms.get(roomId);
  if (!room) return;
  const r = room.receipts.get(userId) ?? { delivered: 0, read: 0 };
  r.read = Math.max(r.read, read);
  r.delivered = Math.max(r.delivered, r.read, delivered);
  room.receipts.set(userId, r);
  if (redraw) refreshTicks(roomId);
}

/**
 * ✓ once the message is stored (this page shows no message before its ack or event), ✓✓
 * once every other member's devices have it, coloured ✓✓ once every other member read it.
 */
function tickState(room, msg) {
  const others = [...room.receipts].filter(([user]) => user !== app.me).map(([, r]) => r);
  if (others.length === 0) return 'sent';
  if (others.every((r) => r.read >= msg.seq)) return 'read';
  if (others.every((r) => r.delivered >= msg.seq)) return 'delivered';
  return 'sent';
}

/** Redraws the ticks of one's own messages on screen, in place. */
function refreshTicks(roomId) {
  const room = app.rooms.get(roomId);
  if (!room || roomId !== app.current) return;
  for (const span of document.querySelectorAll('#messages .ticks, #thread .ticks')) {
    const li = span.closest('li');
    const msg = findMessage(roomId, (m) => m.seq === Number(li.dataset.seq));
    if (msg) setTicks(span, tickState(room, msg));
  }
}

async function addRoom(room) {
  if (app.rooms.has(room.id)) {
    app.rooms.get(room.id).members = room.members.map((m) => m.user_id);
  } else {
    await trackRoom(room);
  }
  renderRooms();
}

function removeRoom(roomId) {
  app.rooms.delete(roomId);
  if (app.thread?.room === roomId) closeThread();
  if (app.current === roomId) {
    app.current = null;
    renderRoom();
  }
  renderRooms();
}

$('new-room').addEventListener('submit', async (e) => {
  e.preventDefault();
  const name = $('new-room-name').value.trim();
  const members = $('new-room-members').value.split(/[\s,]+/).filter(Boolean);
  try {
    const room = await app.client.createRoom({ kind: 'group', name: name || undefined, members });
    await addRoom(room);
    $('new-room-name').value = '';
    $('new-room-members').value = '';
    await openRoom(room.id);
  } catch (err) {
    showError(err);
  }
});

function renderRooms() {
  const rooms = [...app.rooms.values()].sort((a, b) => (a.name ?? '').localeCompare(b.name ?? '') || a.id.localeCompare(b.id));
  $('rooms').replaceChildren(...rooms.map((room) => roomItem(room, room.id === app.current, (id) => openRoom(id).catch(showError))));
}

async function openRoom(roomId) {
  const room = app.rooms.get(roomId);
  if (!room) return;
  stopTyping();
  if (app.thread && app.thread.room !== roomId) closeThread();
  app.current = roomId;
  $('room-error').textContent = '';
  if (!room.loaded) await loadNewest(room);
  renderRooms();
  renderRoom();
  scrollToBottom();
  await markRead(room);
}

async function loadNewest(room) {
  const page = await app.client.history(room.id, { limit: PAGE });
  for (const msg of page.messages) room.messages.set(msg.seq, msg);
  room.hasOlder = page.hasMore;
  room.loaded = true;
}

async function reloadRoom(roomId) {
  const room = app.rooms.get(roomId);
  if (!room) return;
  room.messages.clear();
  await loadNewest(room);
  if (roomId === app.current) renderRoom();
}

async function loadOlder() {
  const room = app.rooms.get(app.current);
  if (!room || !room.hasOlder) return;
  const oldest = Math.min(...room.messages.keys());
  const scroller = $('scroller');
  const fromBottom = scroller.scrollHeight - scroller.scrollTop;
  const page = await app.client.history(room.id, { beforeSeq: oldest, limit: PAGE });
  for (const msg of page.messages) room.messages.set(msg.seq, msg);
  room.hasOlder = page.hasMore;
  renderRoom();
  scroller.scrollTop = scroller.scrollHeight - fromBottom; // keep what was on screen in place
}

$('older').addEventListener('click', () => loadOlder().catch(showError));
$('scroller').addEventListener('scroll', () => {
  if ($('scroller').scrollTop === 0) loadOlder().catch(showError);
});

async function markRead(room) {
  if (room.last_seq === 0 || document.visibilityState !== 'visible') return;
  room.unread = 0;
  renderRooms();
  await app.client.read(room.id, room.last_seq);
}

document.addEventListener('visibilitychange', () => {
  const room = app.rooms.get(app.current);
  if (room && room.unread > 0) markRead(room).catch(showError);
});

// ---- messages -----------------------------------------------------------------------

function onMessage({ room: roomId, message }) {
  const room = app.rooms.get(roomId);
  if (!room) return;
  room.last_seq = Math.max(room.last_seq, message.seq);
  clearTyping(roomId, message.sender_id);
  if (roomId === app.current) {
    const atBottom = isAtBottom();
    putMessage(roomId, message);
    if (atBottom) scrollToBottom();
    markRead(room).catch(showError);
  } else {
    if (room.loaded) room.messages.set(message.seq, message);
    if (message.sender_id !== app.me) room.unread += 1;
    renderRooms();
  }
}

/** Stores a new or changed message and redraws it if its room is open (in the thread panel too). */
function putMessage(roomId, message) {
  const room = app.rooms.get(roomId);
  if (!room) return;
  putThreadMessage(roomId, message);
  // A change to a message older than the loaded page (a thread reply the panel shows, a
  // thread's root) is not put in the timeline: it would leave a gap there.
  if (!room.messages.has(message.seq) && room.messages.size > 0 && message.seq < Math.min(...room.messages.keys())) return;
  room.messages.set(message.seq, message);
  if (roomId !== app.current) return;
  const list = $('messages');
  const item = messageItem(message, itemContext(room, message));
  const old = list.querySelector(`li[data-seq="${message.seq}"]`);
  if (old) { old.replaceWith(item); return; }
  const next = [...list.children].find((li) => Number(li.dataset.seq) > message.seq);
  list.insertBefore(item, next ?? null);
}

/** A message of the room the page holds (its timeline, else the open thread) matching `pred`. */
function findMessage(roomId, pred) {
  const room = app.rooms.get(roomId);
  const fromRoom = room && [...room.messages.values()].find(pred);
  if (fromRoom) return fromRoom;
  const t = app.thread;
  if (!t || t.room !== roomId) return undefined;
  return pred(t.root) ? t.root : [...t.replies.values()].find(pred);
}

function onReaction({ room: roomId, message_id, user_id, emoji, added }) {
  const msg = findMessage(roomId, (m) => m.id === message_id);
  if (!msg) return;
  const users = new Set(msg.reactions?.[emoji] ?? []);
  if (added) users.add(user_id); else users.delete(user_id);
  putMessage(roomId, { ...msg, reactions: { ...msg.reactions, [emoji]: [...users] } });
}

function itemContext(room, message) {
  return {
    me: app.me,
    online: room.online.has(message.sender_id),
    ticks: tickState(room, message),
    openThread: (msg) => openThread(room.id, msg).catch(showThreadError),
    threadRoot: (msg) => findMessage(room.id, (m) => m.id === msg.reply_to),
    canDelete: app.admin,
    edit: (msg, text) => app.client.edit(msg.id, text).catch(showError),
    remove: (msg) => app.client.deleteMessage(msg.id).catch(showError),
    toggleReaction: (msg, emoji) => {
      const mine = (msg.reactions?.[emoji] ?? []).includes(app.me);
      (mine ? app.client.unreact(msg.id, emoji) : app.client.react(msg.id, emoji)).catch(showError);
    },
    showAttachment: (attachment, img) => objectUrl(attachment).then((url) => { img.src = url; }).catch(showError),
    download: (attachment) => objectUrl(attachment).then((url) => {
      h('a', { href: url, download: attachment.name }).click();
    }).catch(showError),
  };
}

/** Attachments need the Bearer token, so they are fetched and shown from memory. */
async function objectUrl(attachment) {
  if (!app.images.has(attachment.id)) {
    app.images.set(attachment.id, app.client.fetchAttachment(attachment).then((blob) => URL.createObjectURL(blob)));
  }
  return app.images.get(attachment.id);
}

function renderRoom() {
  const room = app.rooms.get(app.current);
  const enabled = Boolean(room);
  for (const id of ['composer', 'attach', 'send']) $(id).disabled = !enabled;
  if (!room) {
    $('room-title').textContent = 'No room selected';
    $('members').replaceChildren();
    $('messages').replaceChildren();
    $('older').hidden = true;
    renderTyping();
    return;
  }
  $('room-title').textContent = room.name || `${room.kind} room ${room.id}`;
  const members = new Set([...(room.members ?? []), ...room.online, app.me]);
  $('members').replaceChildren(...[...members].sort().map((user) => memberItem(user, room.online.has(user))));
  const messages = [...room.messages.values()].sort((a, b) => a.seq - b.seq);
  $('messages').replaceChildren(...messages.map((msg) => messageItem(msg, itemContext(room, msg))));
  $('older').hidden = !room.hasOlder;
  renderTyping();
}

function isAtBottom() {
  const s = $('scroller');
  return s.scrollHeight - s.scrollTop - s.clientHeight < 40;
}

function scrollToBottom() {
  const s = $('scroller');
  s.scrollTop = s.scrollHeight;
}

// ---- threads ------------------------------------------------------------------------

/** Opens the side panel on `root`'s thread: the root, then every reply, oldest first. */
async function openThread(roomId, root) {
  const thread = { room: roomId, root, replies: new Map() };
  app.thread = thread;
  $('thread-error').textContent = '';
  renderThread();
  let afterSeq;
  for (;;) {
    const page = await app.client.thread(roomId, root.seq, { afterSeq, limit: 100 });
    if (app.thread !== thread) return; // closed or another opened meanwhile
    thread.root = page.root;
    for (const reply of page.replies) thread.replies.set(reply.seq, reply);
    if (!page.hasMore || page.replies.length === 0) break;
    afterSeq = page.replies[page.replies.length - 1].seq;
  }
  renderThread();
  scrollThreadToBottom();
  $('thread-composer').focus();
}

function closeThread() {
  app.thread = null;
  renderThread();
}

/** Keeps the open thread current: its root's new count and text, new and changed replies. */
function putThreadMessage(roomId, message) {
  const t = app.thread;
  if (!t || t.room !== roomId) return;
  if (message.id === t.root.id) {
    t.root = message;
  } else if (message.reply_to === t.root.id) {
    const atBottom = isThreadAtBottom();
    t.replies.set(message.seq, message);
    renderThread();
    if (atBottom) scrollThreadToBottom();
    return;
  } else {
    return;
  }
  renderThread();
}

function renderThread() {
  const t = app.thread;
  $('thread').hidden = !t;
  if (!t) {
    $('thread-root').replaceChildren();
    $('thread-replies').replaceChildren();
    return;
  }
  const room = app.rooms.get(t.room);
  if (!room) return;
  // Inside the panel there is no thread to open: one level only.
  const context = (msg) => ({ ...itemContext(room, msg), openThread: undefined });
  $('thread-title').textContent = threadTitle(t.root);
  $('thread-root').replaceChildren(messageItem(t.root, context(t.root)));
  const replies = [...t.replies.values()].sort((a, b) => a.seq - b.seq);
  $('thread-replies').replaceChildren(...replies.map((msg) => messageItem(msg, context(msg))));
}

function isThreadAtBottom() {
  const s = $('thread-scroller');
  return s.scrollHeight - s.scrollTop - s.clientHeight < 40;
}

function scrollThreadToBottom() {
  const s = $('thread-scroller');
  s.scrollTop = s.scrollHeight;
}

function showThreadError(err) {
  $('thread-error').textContent = err?.message ?? String(err);
}

$('thread-close').addEventListener('click', closeThread);

$('thread-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  const t = app.thread;
  const text = $('thread-composer').value.trim();
  if (!text || !t) return;
  $('thread-composer').value = '';
  try {
    const reply = await app.client.send(t.room, text, { replyTo: t.root.id });
    putThreadMessage(t.room, reply); // the `message` event may come first or later: same seq
    $('thread-error').textContent = '';
  } catch (err) {
    $('thread-composer').value = text;
    showThreadError(err);
  }
});

// ---- composing ----------------------------------------------------------------------

$('composer-form').addEventListener('submit', async (e) => {
  e.preventDefault();
  const text = $('composer').value.trim();
  if (!text || !app.current) return;
  $('composer').value = '';
  stopTyping();
  try {
    await app.client.send(app.current, text);
    $('room-error').textContent = '';
  } catch (err) {
    $('composer').value = text; // give it back rather than lose it
    showError(err);
  }
});

$('attach').addEventListener('change', async () => {
  const file = $('attach').files[0];
  $('attach').value = '';
  if (!file || !app.current) return;
  try {
    const contentType = file.type || 'application/octet-stream';
    const attachment = await app.client.uploadAttachment(file, { name: file.name, contentType });
    const kind = contentType.startsWith('image/') ? 'image' : 'file';
    const text = $('composer').value.trim();
    $('composer').value = '';
    await app.client.send(app.current, text, { kind, attachments: [attachment.id] });
  } catch (err) {
    showError(err);
  }
});

$('composer').addEventListener('input', () => {
  if (!app.current) return;
  const t = app.myTyping;
  clearTimeout(t.idleTimer);
  if ($('composer').value === '') { stopTyping(); return; }
  if (!t.active || Date.now() - t.sentAt > TYPING_REFRESH_MS) {
    t.active = true;
    t.sentAt = Date.now();
    app.client.typing(app.current, true).catch(() => {});
  }
  t.idleTimer = setTimeout(stopTyping, TYPING_IDLE_MS);
});

function stopTyping() {
  const t = app.myTyping;
  clearTimeout(t.idleTimer);
  if (t.active && app.current) app.client.typing(app.current, false).catch(() => {});
  t.active = false;
}

function onTyping({ room, user_id, active }) {
  if (user_id === app.me) return;
  if (!active) { clearTyping(room, user_id); return; }
  const typers = app.typing.get(room) ?? new Map();
  app.typing.set(room, typers);
  clearTimeout(typers.get(user_id));
  typers.set(user_id, setTimeout(() => clearTyping(room, user_id), TYPING_SHOWN_MS));
  if (room === app.current) renderTyping();
}

function clearTyping(room, user) {
  const typers = app.typing.get(room);
  if (!typers?.has(user)) return;
  clearTimeout(typers.get(user));
  typers.delete(user);
  if (room === app.current) renderTyping();
}

function renderTyping() {
  const users = [...(app.typing.get(app.current)?.keys() ?? [])];
  $('typing').textContent = users.length === 0 ? ''
    : users.length === 1 ? `${users[0]} is typing…` : `${users.join(', ')} are typing…`;
}

// ---- start --------------------------------------------------------------------------

const saved = sessionStorage.getItem(TOKEN_KEY);
if (saved) signIn(saved).catch((err) => { $('signin-error').textContent = err.message; });
