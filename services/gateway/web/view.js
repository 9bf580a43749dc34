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

/**
 * One message. `ctx` carries who is looking (`me`), whether the sender is online, and
 * the actions: `edit(msg, text)`, `remove(msg)`, `toggleReaction(msg, emoji)`,
 * `showAttachment(attachment, img)`.
 */
export function messageItem(msg, ctx) {
  const mine = msg.sender_id === ctx.me;
  const li = h('li', { class: msg.deleted ? 'msg deleted' : 'msg', dataset: { seq: msg.seq, id: msg.id, sender: msg.sender_id } });
  const text = h('div', { class: 'text' }, msg.deleted ? 'message deleted' : msg.text ?? '');
  const actions = msg.deleted ? null : h('span', { class: 'actions' },
    QUICK_REACTIONS.map((emoji) => h('button', { type: 'button', title: `React ${emoji}`, onclick: () => ctx.toggleReaction(msg, emoji) }, emoji)),
    mine ? h('button', { type: 'button', class: 'edit', onclick: () => startEdit(li, text, msg, ctx) }, 'Edit') : null,
    mine || ctx.canDelete ? deleteButton(msg, ctx) : null);
  li.append(
    h('div', { class: 'meta' },
      h('span', { class: ctx.online ? 'dot online' : 'dot' }),
      h('span', { class: 'sender' }, msg.sender_name || msg.sender_id),
      h('time', { datetime: msg.created_at }, time.format(new Date(msg.created_at))),
      msg.edited_at && !msg.deleted ? h('span', { class: 'edited' }, '(edited)') : null,
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
  return li;
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
