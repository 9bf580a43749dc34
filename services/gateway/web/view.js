// DOM building for the chat page. User text only ever becomes text nodes
// (`append(string)`, `textContent`), never markup: nothing here touches innerHTML.

/** Creates an element: `props` are attributes (`class`, `dataset`, `on<event>` handlers). */
export function h(tag, props = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (value == null || value === false) continue;
    if (key === 'class') el.className = value;
    else if (key === 'dataset') Object.assign(el.dataset, value);
    else if (key.startsWith('on')) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? '' : String(value));
  }
  for (const child of children.flat()) {
    if (child == null || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
  return el;
}

const time = new Intl.DateTimeFormat(undefined, { hour: '2-digit', minute: '2-digit' });

/** Quick reactions offered on every message. */
export const QUICK_REACTIONS = ['👍', '❤️', '😂'];

/** A room in the sidebar: its name and, when there is any, the unread badge. */
export function roomItem(room, active, onOpen) {
  const badge = room.unread > 0 ? h('span', { class: 'badge', dataset: { unread: room.unread } }, room.unread) : null;
  return h('li', { class: active ? 'active' : null, dataset: { room: room.id }, onclick: () => onOpen(room.id) },
    h('span', { class: 'name' }, room.name || `${room.kind} room ${room.id}`), badge);
}

/** The presence list of a room's members. */
export function memberItem(userId, online) {
  return h('li', { dataset: { user: userId } }, h('span', { class: online ? 'dot online' : 'dot' }), userId);
}

/** What the ticks on one's own message say: `sent` ✓, `delivered` ✓✓, `read` ✓✓ in colour. */
const TICKS = {
  sent: ['✓', 'Sent'],
  delivered: ['✓✓', 'Delivered to everyone'],
  read: ['✓✓', 'Read by everyone'],
};

/** The ticks of one's own message, in `state` (`sent`, `delivered`, `read`). */
export function ticksItem(state) {
  const span = h('span', { class: 'ticks' });
  setTicks(span, state);
  return span;
}

/** Moves existing ticks to `state`, in place (a message's element is not rebuilt for them). */
export function setTicks(span, state) {
  const [marks, title] = TICKS[state] ?? TICKS.sent;
  if (span.dataset.ticks === state) return;
  span.dataset.ticks = state;
  span.title = title;
  span.textContent = marks;
}

const replies = (n) => `${n} ${n === 1 ? 'reply' : 'replies'}`;

/**
 * One message. `ctx` carries who is looking (`me`), whether the sender is online, the
 * ticks of one's own message (`ticks`), and the actions: `edit(msg, text)`,
 * `remove(msg)`, `toggleReaction(msg, emoji)`, `showAttachment(attachment, img)`,
 * `openThread(msg)` (absent inside the thread panel), `threadRoot(msg)` (the loaded
 * message a reply answers).
 */
export function messageItem(msg, ctx) {
  const mine = msg.sender_id === ctx.me;
  const li = h('li', { class: msg.deleted ? 'msg deleted' : 'msg', dataset: { seq: msg.seq, id: msg.id, sender: msg.sender_id } });
  const text = h('div', { class: 'text' }, msg.deleted ? 'message deleted' : msg.text ?? '');
  const actions = msg.deleted ? null : h('span', { class: 'actions' },
    QUICK_REACTIONS.map((emoji) => h('button', { type: 'button', title: `React ${emoji}`, onclick: () => ctx.toggleReaction(msg, emoji) }, emoji)),
    ctx.openThread ? h('button', { type: 'button', class: 'reply', onclick: () => ctx.openThread(msg) }, 'Reply') : null,
    mine ? h('button', { type: 'button', class: 'edit', onclick: () => startEdit(li, text, msg, ctx) }, 'Edit') : null,
    mine || ctx.canDelete ? deleteButton(msg, ctx) : null);
  li.append(
    h('div', { class: 'meta' },
      h('span', { class: ctx.online ? 'dot online' : 'dot' }),
      h('span', { class: 'sender' }, msg.sender_name || msg.sender_id),
      h('time', { datetime: msg.created_at }, time.format(new Date(msg.created_at))),
      msg.edited_at && !msg.deleted ? h('span', { class: 'edited' }, '(edited)') : null,
      mine && ctx.ticks && !msg.deleted ? ticksItem(ctx.ticks) : null,
      inThread(msg, ctx),
      actions),
    text);
  if (!msg.deleted) {
    for (const attachment of msg.attachments ?? []) li.append(attachmentView(attachment, ctx));
    const reactions = Object.entries(msg.reactions ?? {}).filter(([, users]) => users.length > 0);
    if (reactions.length > 0) {
      li.append(h('div', { class: 'reactions' }, reactions.map(([emoji, users]) =>
        h('button', { type: 'button', class: users.includes(ctx.me) ? 'reaction mine' : 'reaction', title: users.join(', '),
          onclick: () => ctx.toggleReaction(msg, emoji) }, `${emoji} ${users.length}`))));
    }
  }
  if (msg.reply_count > 0 && ctx.openThread) {
    li.append(h('button', { type: 'button', class: 'replies', onclick: () => ctx.openThread(msg) }, replies(msg.reply_count)));
  }
  return li;
}

/** On a reply in the timeline: a link to its thread when its root is loaded, else a plain mark. */
function inThread(msg, ctx) {
  if (msg.reply_to == null || !ctx.openThread) return null;
  const root = ctx.threadRoot?.(msg);
  if (!root) return h('span', { class: 'in-thread' }, '↪ reply');
  return h('button', { type: 'button', class: 'in-thread', title: 'Open the thread', onclick: () => ctx.openThread(root) },
    `↪ reply to ${root.sender_name || root.sender_id}`);
}

/** The thread panel's heading: how many replies the root has. */
export function threadTitle(root) {
  return root.reply_count > 0 ? `Thread · ${replies(root.reply_count)}` : 'Thread';
}

function deleteButton(msg, ctx) {
  // Two clicks, so a stray one cannot delete: the first only asks.
  const button = h('button', { type: 'button', class: 'delete' }, 'Delete');
  button.addEventListener('click', () => {
    if (button.dataset.armed) ctx.remove(msg);
    else { button.dataset.armed = '1'; button.textContent = 'Confirm delete'; }
  });
  return button;
}

function startEdit(li, textEl, msg, ctx) {
  const input = h('input', { class: 'edit-input', maxlength: 4000 });
  input.value = msg.text ?? '';
  input.addEventListener('keydown', (e) => {
    if (e.key === 'Enter' && input.value.trim()) ctx.edit(msg, input.value.trim());
    if (e.key === 'Escape') input.replaceWith(textEl);
  });
  textEl.replaceWith(input);
  input.focus();
}

function attachmentView(attachment, ctx) {
  const box = h('div', { class: 'attachment', dataset: { attachment: attachment.id } });
  if (attachment.content_type.startsWith('image/')) {
    const img = h('img', { alt: attachment.name });
    box.append(img);
    ctx.showAttachment(attachment, img);
  } else {
    box.append(h('button', { type: 'button', onclick: () => ctx.download(attachment) },
      `📄 ${attachment.name} (${Math.ceil(attachment.size / 1024)} KiB)`));
  }
  return box;
}
