// End-to-end tests of the SDK against a real running cluster (never a mock).
//
// CHAT_GATEWAYS: comma-separated http base URLs of two gateways of one cluster
// (default: `make run`'s 8080 and 8081). JWT_SECRET: the cluster's HS256 secret
// (default: make run's dev default). `cargo test -p chat-tests --test sdk` starts a
// fresh cluster and runs these with both set.
import assert from 'node:assert/strict';
import { createHmac, randomBytes } from 'node:crypto';
import { after, afterEach, describe, test } from 'node:test';
import WebSocket from 'ws';

import {
  ChatClient,
  ChatError,
  fetchReceipts,
  fetchThread,
  searchMessages,
  toHttpBaseUrl,
  toWebSocketUrl,
} from '../dist/index.js';

const GATEWAYS = (process.env.CHAT_GATEWAYS || 'http://127.0.0.1:8080,http://127.0.0.1:8081')
  .split(',')
  .map((s) => s.trim())
  .filter(Boolean);
const SECRET = process.env.JWT_SECRET || 'dev-secret-change-me';
/** The longest any single expected thing may take. */
const WAIT_MS = 10_000;
/** Every test is bounded, so a client that never settles fails instead of hanging the run. */
const BOUNDED = { timeout: 30_000 };
/** Users are unique per run: the database may be shared with other runs. */
const RUN = randomBytes(4).toString('hex');
const user = (name) => `${name}-${RUN}`;
const [A, B] = [GATEWAYS[0], GATEWAYS[1] ?? GATEWAYS[0]];

// ---------------------------------------------------------------------------------
// Helpers

/** An HS256 JWT with these claims. */
function mint(claims, secret = SECRET) {
  const part = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const data = `${part({ alg: 'HS256', typ: 'JWT' })}.${part(claims)}`;
  return `${data}.${createHmac('sha256', secret).update(data).digest('base64url')}`;
}

/** A token for `sub`, valid for an hour. */
const token = (sub, extra = {}) => mint({ sub, exp: Math.floor(Date.now() / 1000) + 3600, ...extra });

/** A `ws` subclass that records every socket it opens, so a test can kill one. */
function recordingWebSocket() {
  const sockets = [];
  class Recording extends WebSocket {
    constructor(...args) {
      super(...args);
      sockets.push(this);
    }
  }
  return { Recording, sockets };
}

/** A `ws` subclass that records every frame the client sends, parsed, with when (`at`). */
function framesSent() {
  const frames = [];
  class Counting extends WebSocket {
    send(data, ...rest) {
      try {
        frames.push({ ...JSON.parse(data), at: Date.now() });
      } catch {
        frames.push({ at: Date.now() });
      }
      return super.send(data, ...rest);
    }
  }
  return { Counting, frames, sent: (type) => frames.filter((f) => f.type === type) };
}

/** Every member's `[user_id, delivered_seq, read_seq]`, by user id. */
const receiptRows = (members) => members.map((m) => [m.user_id, m.delivered_seq, m.read_seq]).sort();

/** A gate a token provider can wait on: closed, nobody (re)connects until it opens again. */
function gate() {
  let open = Promise.resolve();
  let release = () => {};
  return {
    wait: () => open,
    close() {
      open = new Promise((resolve) => (release = resolve));
    },
    open: () => release(),
  };
}

const clients = [];
afterEach(() => {
  for (const c of clients.splice(0)) c.close();
});

/** A client for `sub` on gateway `url` (not yet connected); closed after the test. */
function client(sub, url = A, options = {}) {
  const c = new ChatClient({ url, token: token(sub), WebSocket, ...options });
  clients.push(c);
  return c;
}

/** A connected client. */
async function connected(sub, url = A, options = {}) {
  const c = client(sub, url, options);
  await c.connect();
  return c;
}

/** Every event of `type` the client emits from now on. */
function record(c, type) {
  const list = [];
  c.on(type, (ev) => list.push(ev));
  return list;
}

/** The next event of `type` matching `pred`, within WAIT_MS. */
function nextEvent(c, type, pred = () => true) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      off();
      reject(new Error(`no ${type} event within ${WAIT_MS} ms`));
    }, WAIT_MS);
    const off = c.on(type, (ev) => {
      if (!pred(ev)) return;
      clearTimeout(timer);
      off();
      resolve(ev);
    });
  });
}

/** Resolves once `cond()` holds; fails after WAIT_MS with `what`. */
async function until(cond, what) {
  const deadline = Date.now() + WAIT_MS;
  while (!cond()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** Asserts that `promise` rejects with a ChatError of `code`; returns the error. */
async function rejectsWith(promise, code) {
  let error;
  await assert.rejects(promise, (err) => {
    error = err;
    assert.ok(err instanceof ChatError, `expected a ChatError, got ${err}`);
    assert.equal(err.code, code, err.message);
    return true;
  });
  return error;
}

/** A group room of `owner` with `members`, both of them joined. */
async function sharedRoom(owner, ...members) {
  const room = await owner.createRoom({ kind: 'group', name: `room-${RUN}`, members: members.map((m) => m.userId) });
  await owner.join(room.id);
  for (const m of members) await m.join(room.id);
  return room.id;
}

after(() => {
  for (const c of clients.splice(0)) c.close();
});

// ---------------------------------------------------------------------------------

describe('connection', () => {
  test('http base URLs map to the WebSocket endpoint and back', BOUNDED, () => {
    assert.equal(toWebSocketUrl('http://127.0.0.1:8080'), 'ws://127.0.0.1:8080/ws');
    assert.equal(toWebSocketUrl('https://chat.example.com/api/'), 'wss://chat.example.com/api/ws');
    assert.equal(toWebSocketUrl('ws://127.0.0.1:8080/ws'), 'ws://127.0.0.1:8080/ws');
    assert.equal(toHttpBaseUrl('ws://127.0.0.1:8080/ws'), 'http://127.0.0.1:8080');
    assert.equal(toHttpBaseUrl('wss://chat.example.com/api/ws'), 'https://chat.example.com/api');
    assert.throws(() => toWebSocketUrl('ftp://x'), TypeError);
  });

  test('connect resolves with the welcome and the client is open', BOUNDED, async () => {
    const c = client(user('alice'));
    const states = record(c, 'state');
    const welcomes = record(c, 'welcome');
    assert.equal(c.state, 'idle');
    const welcome = await c.connect();
    assert.equal(welcome.type, 'welcome');
    assert.equal(welcome.user_id, user('alice'));
    assert.equal(typeof welcome.session_id, 'string');
    assert.ok(welcome.heartbeat_ms > 0);
    assert.equal(c.userId, user('alice'));
    assert.equal(c.state, 'open');
    assert.deepEqual(
      states.map((s) => [s.previous, s.state]),
      [
        ['idle', 'connecting'],
        ['connecting', 'open'],
      ],
    );
    assert.equal(welcomes.length, 1);
    // A second connect() on an open client is the same welcome.
    assert.equal(await c.connect(), welcome);
    await c.ping();
  });

  test('a refused token rejects connect() with unauthorized, and no reconnect loop follows', BOUNDED, async () => {
    const { Recording, sockets } = recordingWebSocket();
    const c = new ChatClient({
      url: A,
      token: mint({ sub: user('mallory'), exp: Math.floor(Date.now() / 1000) + 3600 }, 'not-the-secret'),
      WebSocket: Recording,
      reconnect: { initialDelayMs: 20, maxDelayMs: 50 },
    });
    clients.push(c);
    const states = record(c, 'state');
    const errors = record(c, 'error');
    await rejectsWith(c.connect(), 'unauthorized');
    assert.equal(c.state, 'closed');
    assert.equal(states.at(-1).closeCode, 1008);
    assert.equal(errors.length, 1);
    assert.equal(errors[0].code, 'unauthorized');
    // With a 20 ms backoff a retry loop would have opened several sockets by now.
    await new Promise((r) => setTimeout(r, 500));
    assert.equal(sockets.length, 1, 'no reconnect after auth was refused');
    assert.equal(c.state, 'closed');
    await rejectsWith(c.rooms(), 'closed');
  });

  test('commands issued before connect() wait for the connection', BOUNDED, async () => {
    const c = client(user('early'));
    const rooms = c.rooms();
    await c.connect();
    assert.deepEqual(await rooms, []);
  });

  test('a command waiting for a connection that never comes times out', BOUNDED, async () => {
    const never = new Promise(() => {});
    const c = new ChatClient({ url: A, token: () => never, WebSocket, requestTimeoutMs: 300 });
    clients.push(c);
    void c.connect().catch(() => {});
    const started = Date.now();
    await rejectsWith(c.ping(), 'timeout');
    assert.ok(Date.now() - started >= 250);
  });

  test('close() rejects pending commands with closed, and later ones too', BOUNDED, async () => {
    const c = await connected(user('closer'));
    const pending = c.history('1');
    const queued = client(user('closer2'));
    const waiting = queued.rooms();
    c.close();
    queued.close();
    await rejectsWith(pending, 'closed');
    await rejectsWith(waiting, 'closed');
    assert.equal(c.state, 'closed');
    await rejectsWith(c.ping(), 'closed');
    await rejectsWith(c.connect(), 'closed');
  });
});

describe('commands', () => {
  test('acks resolve and errors reject with the server code', BOUNDED, async () => {
    const alice = await connected(user('alice'));
    const room = await alice.createRoom({ kind: 'group', name: 'ops', members: [user('bob')] });
    assert.equal(typeof room.id, 'string');
    assert.equal(room.kind, 'group');
    assert.deepEqual(
      room.members.map((m) => [m.user_id, m.role]).sort(),
      [
        [user('alice'), 'owner'],
        [user('bob'), 'member'],
      ],
    );
    const joined = await alice.join(room.id);
    assert.equal(joined.room, room.id);
    assert.equal(joined.last_seq, 0);
    assert.ok(joined.online.includes(user('alice')));
    const summaries = await alice.rooms();
    assert.ok(summaries.some((r) => r.id === room.id && r.last_message === null));
    assert.deepEqual(await alice.presence(room.id), [user('alice')]);
    const added = await alice.addMembers(room.id, [user('carol'), user('bob')]);
    assert.deepEqual(added.added, [user('carol')]);

    const mallory = await connected(user('mallory'));
    await rejectsWith(mallory.join(room.id), 'forbidden');
    await rejectsWith(mallory.send(room.id, 'hi'), 'forbidden');
    await rejectsWith(alice.join('987654321'), 'not_found');
    await assert.rejects(alice.join('not-a-room'), (err) => {
      assert.ok(err instanceof ChatError);
      assert.ok(['not_found', 'bad_request'].includes(err.code), err.code);
      return true;
    });
    await rejectsWith(alice.send(room.id, ''), 'bad_request');
    await rejectsWith(alice.request('no_such_command'), 'bad_request');
    // The raw request resolves with the ack minus type and id.
    assert.deepEqual(await alice.request('read', { room: room.id, seq: 0 }), { seq: 0 });
  });

  test('a message sent on gateway A reaches a member on gateway B', BOUNDED, async () => {
    const alice = await connected(user('alice'), A);
    const bob = await connected(user('bob'), B);
    const room = await sharedRoom(alice, bob);
    const got = nextEvent(bob, 'message', (ev) => ev.room === room);
    const own = nextEvent(alice, 'message', (ev) => ev.room === room);
    const sent = await alice.send(room, 'hello across gateways');
    const ev = await got;
    assert.equal(ev.type, 'message');
    assert.deepEqual(ev.message, sent);
    assert.equal(sent.text, 'hello across gateways');
    assert.equal(sent.sender_id, user('alice'));
    assert.equal(sent.seq, 1);
    assert.match(sent.client_msg_id, /^[0-9a-f]{32}$/, 'a client_msg_id is generated');
    assert.deepEqual((await own).message, sent, "the sender's own connection gets the event too");

    // Edits, reactions, reads and deletes reach the other side as events.
    const edited = nextEvent(bob, 'message_edited');
    await alice.edit(sent.id, 'hello, edited');
    assert.equal((await edited).message.text, 'hello, edited');
    const reaction = nextEvent(bob, 'reaction');
    await alice.react(sent.id, '👍');
    assert.deepEqual(
      { ...(await reaction), room: undefined },
      { type: 'reaction', room: undefined, message_id: sent.id, user_id: user('alice'), emoji: '👍', added: true },
    );
    const removed = nextEvent(bob, 'reaction', (ev) => ev.added === false);
    await alice.unreact(sent.id, '👍');
    await removed;
    const read = nextEvent(alice, 'read', (ev) => ev.user_id === user('bob'));
    assert.equal(await bob.read(room, 1), 1);
    assert.equal((await read).seq, 1);
    const deleted = nextEvent(bob, 'message_deleted');
    await alice.deleteMessage(sent.id);
    assert.deepEqual(await deleted, { type: 'message_deleted', room, message_id: sent.id, seq: 1 });
  });

  test('the same clientMsgId twice is one message', BOUNDED, async () => {
    const alice = await connected(user('alice'));
    const room = (await alice.createRoom({ kind: 'group', members: [] })).id;
    const first = await alice.send(room, 'once', { clientMsgId: `idem-${RUN}` });
    const second = await alice.send(room, 'once', { clientMsgId: `idem-${RUN}` });
    assert.equal(second.id, first.id);
    assert.equal(second.seq, first.seq);
    const page = await alice.history(room);
    assert.equal(page.messages.length, 1);
  });

  test('history pages in ascending seq order', BOUNDED, async () => {
    const alice = await connected(user('alice'));
    const room = (await alice.createRoom({ kind: 'group', members: [] })).id;
    for (const text of ['one', 'two', 'three', 'four']) await alice.send(room, text);
    const newest = await alice.history(room, { limit: 2 });
    assert.deepEqual(
      newest.messages.map((m) => [m.seq, m.text]),
      [
        [3, 'three'],
        [4, 'four'],
      ],
    );
    assert.equal(newest.hasMore, true);
    const older = await alice.history(room, { beforeSeq: 3, limit: 10 });
    assert.deepEqual(
      older.messages.map((m) => m.seq),
      [1, 2],
    );
    assert.equal(older.hasMore, false);
    const forward = await alice.history(room, { afterSeq: 1, limit: 2 });
    assert.deepEqual(
      forward.messages.map((m) => m.seq),
      [2, 3],
    );
    assert.equal(forward.hasMore, true);
  });

  test('typing reaches the other member, not the typist', BOUNDED, async () => {
    const alice = await connected(user('alice'), A);
    const bob = await connected(user('bob'), B);
    const room = await sharedRoom(alice, bob);
    const own = record(alice, 'typing');
    const typing = nextEvent(bob, 'typing');
    await alice.typing(room, true);
    assert.deepEqual(await typing, { type: 'typing', room, user_id: user('alice'), active: true });
    const stopped = nextEvent(bob, 'typing', (ev) => !ev.active);
    await alice.typing(room, false);
    await stopped;
    assert.equal(own.length, 0);
  });
});

describe('search', () => {
  // Words unique to this run: a shared database may hold other runs' messages, and
  // other tests of this run put alice and bob in more rooms.
  const word = `kiwi${RUN}`;
  const other = `plum${RUN}`;

  test('search finds matches in the callers rooms only, newest first, and pages by beforeId', BOUNDED, async () => {
    const alice = await connected(user('alice'), A);
    const bob = await connected(user('bob'), B);
    const carol = await connected(user('carol'), A);
    const room = await sharedRoom(alice, bob);
    const carolsRoom = (await carol.createRoom({ kind: 'group', members: [] })).id;
    await carol.send(carolsRoom, `carol's ${word} is private`);
    const sent = [];
    for (const text of [`one ${word}`, `two ${other}`, `three ${word} and ${other}`, `four ${word}`]) {
      sent.push(await alice.send(room, text));
    }
    const gone = await alice.send(room, `deleted ${word}`);
    await alice.deleteMessage(gone.id);

    // Bob, on the other gateway: his room's matches only, newest first, as stored.
    const all = await bob.search(word.toUpperCase());
    assert.deepEqual(
      all.results.map((hit) => hit.message.text),
      [`four ${word}`, `three ${word} and ${other}`, `one ${word}`],
    );
    assert.equal(all.hasMore, false);
    assert.deepEqual(all.results[0].message, sent[3]);
    for (const hit of all.results) {
      assert.equal(typeof hit.snippet, 'string');
      assert.ok(hit.snippet.includes(word), `snippet ${JSON.stringify(hit.snippet)} shows the match`);
    }
    assert.deepEqual(Object.keys(all).sort(), ['hasMore', 'results'], 'camelCase page, like history');

    // Pages of one, each after the previous page's last message, add up to the whole.
    const paged = [];
    let page = await bob.search(word, { room, limit: 1 });
    while (true) {
      paged.push(...page.results.map((hit) => hit.message.id));
      if (!page.hasMore) break;
      assert.ok(paged.length < 10, 'paging ends');
      page = await bob.search(word, { room, limit: 1, beforeId: paged.at(-1) });
    }
    assert.deepEqual(
      paged,
      all.results.map((hit) => hit.message.id),
    );

    // Phrases and exclusions travel as typed.
    const both = await bob.search(`${word} ${other}`);
    assert.deepEqual(
      both.results.map((hit) => hit.message.id),
      [sent[2].id],
    );
    const without = await bob.search(`${word} -${other}`);
    assert.deepEqual(
      without.results.map((hit) => hit.message.id),
      [sent[3].id, sent[0].id],
    );
    const mine = await carol.search(word);
    assert.deepEqual(
      mine.results.map((hit) => hit.message.room),
      [carolsRoom],
    );

    await rejectsWith(bob.search(word, { room: carolsRoom }), 'forbidden');
    await rejectsWith(bob.search(word, { room: '987654321' }), 'not_found');
    await rejectsWith(bob.search('   '), 'bad_request');
    await rejectsWith(bob.search(word, { limit: 51 }), 'bad_request');
    await rejectsWith(bob.search('x'.repeat(257)), 'bad_request');
    assert.equal(bob.state, 'open', 'refused searches leave the connection open');
  });

  test('searchMessages gives the same pages over HTTP, and HTTP errors with their status', BOUNDED, async () => {
    const alice = await connected(user('alice'), A);
    const room = (await alice.createRoom({ kind: 'group', members: [user('bob')] })).id;
    const lonely = (await alice.createRoom({ kind: 'group', members: [] })).id;
    for (const text of [`first ${word} & co`, `second ${word}`, `third ${word}`]) await alice.send(room, text);
    const base = toHttpBaseUrl(B);
    const bobToken = token(user('bob'));

    const page = await searchMessages(base, bobToken, `"second ${word}" or "first ${word}"`, { room, limit: 1 });
    assert.deepEqual(
      page.results.map((hit) => hit.message.text),
      [`second ${word}`],
    );
    assert.equal(page.hasMore, true);
    const rest = await searchMessages(base, bobToken, `"second ${word}" or "first ${word}"`, {
      room,
      beforeId: page.results[0].message.id,
    });
    assert.deepEqual(
      rest.results.map((hit) => hit.message.text),
      [`first ${word} & co`],
    );
    assert.equal(rest.hasMore, false);
    const overWs = await alice.search(word, { room });
    const overHttp = await searchMessages(toHttpBaseUrl(A), token(user('alice')), word, { room });
    assert.deepEqual(overHttp, overWs);

    const status = async (promise, code, httpStatus) => {
      const err = await rejectsWith(promise, code);
      assert.equal(err.status, httpStatus);
    };
    await status(searchMessages(base, bobToken, word, { room: lonely }), 'forbidden', 403);
    await status(searchMessages(base, bobToken, word, { room: '987654321' }), 'not_found', 404);
    await status(searchMessages(base, bobToken, ' '), 'bad_request', 400);
    await status(searchMessages(base, bobToken, word, { limit: 0 }), 'bad_request', 400);
    await status(searchMessages(base, mint({ sub: user('bob'), exp: 1 }), word), 'unauthorized', 401);
  });
});

describe('delivery ticks', () => {
  test('received goes out by itself, coalesced, and shows in receipts and delivered events', BOUNDED, async () => {
    const alice = await connected(user('alice'), A);
    const { Counting, sent } = framesSent();
    const bob = await connected(user('bob'), B, { WebSocket: Counting });
    const carol = await connected(user('carol'), A, { autoReceived: false });
    const room = await sharedRoom(alice, bob, carol);
    assert.deepEqual(receiptRows(await bob.receipts(room)), [
      [user('alice'), 0, 0],
      [user('bob'), 0, 0],
      [user('carol'), 0, 0],
    ]);

    // Three messages at once: bob's client reports them without being asked, in at most
    // two frames (the first at once, the rest of the burst a second later).
    const delivered = nextEvent(alice, 'delivered', (ev) => ev.user_id === user('bob') && ev.seq === 3);
    const bobGotThree = nextEvent(bob, 'message', (ev) => ev.room === room && ev.message.seq === 3);
    const sentAt = Date.now();
    for (const text of ['one', 'two', 'three']) await alice.send(room, text);
    await bobGotThree;
    assert.deepEqual(await delivered, { type: 'delivered', room, user_id: user('bob'), seq: 3 });
    // The server stores a second's reports at once: receipts show them within about two
    // seconds of the messages (bounded at three for a loaded machine). Alice's own client
    // reports her own messages too; carol's reports nothing.
    const delivered3 = (rows, who) => rows.find(([id]) => id === user(who))[1] === 3;
    let rows;
    while (true) {
      rows = receiptRows(await alice.receipts(room));
      if (delivered3(rows, 'bob') && delivered3(rows, 'alice')) break;
      assert.ok(Date.now() - sentAt < 3000, `delivered seqs not in receipts after 3 s: ${JSON.stringify(rows)}`);
      await new Promise((r) => setTimeout(r, 100));
    }
    assert.deepEqual(rows, [
      [user('alice'), 3, 0],
      [user('bob'), 3, 0],
      [user('carol'), 0, 0],
    ]);
    const reports = sent('received');
    assert.ok(reports.length >= 1, 'bob reported');
    assert.deepEqual(
      reports.at(-1) && { room: reports.at(-1).room, seq: reports.at(-1).seq },
      { room, seq: 3 },
    );
    for (let i = 1; i < reports.length; i++) {
      const gap = reports[i].at - reports[i - 1].at;
      assert.ok(gap >= 900, `two reports for one room ${gap} ms apart: ${JSON.stringify(reports)}`);
    }

    // Nothing new, nothing sent.
    await new Promise((r) => setTimeout(r, 1500));
    assert.equal(sent('received').length, reports.length, 'no report without new messages');

    // Carol reports by hand; a lower seq later acks and changes nothing.
    const carolDelivered = nextEvent(bob, 'delivered', (ev) => ev.user_id === user('carol'));
    assert.deepEqual(await carol.received(room, 2), { room, seq: 2 });
    assert.deepEqual(await carol.received(room, 1), { room, seq: 1 });
    assert.equal((await carolDelivered).seq, 2);
    // A read moves delivered too.
    await carol.read(room, 3);
    const after = receiptRows(await bob.receipts(room));
    assert.deepEqual(after.find(([id]) => id === user('carol')), [user('carol'), 3, 3]);
  });

  test('messages replayed after a reconnect are reported too', BOUNDED, async () => {
    const alice = await connected(user('alice'), A);
    const { client: bob, sockets, gate: bobGate } = await gatedClient(user('bob'), B);
    const room = await sharedRoom(alice, bob);
    bobGate.close();
    sockets.at(-1).terminate();
    await until(() => bob.state === 'reconnecting', 'bob reconnecting');
    for (const text of ['while', 'you', 'were', 'away']) await alice.send(room, text);
    const delivered = nextEvent(alice, 'delivered', (ev) => ev.user_id === user('bob') && ev.seq === 4);
    bobGate.open();
    await delivered;
  });
});

describe('threads', () => {
  test('thread and receipts work across gateways, over WebSocket and HTTP alike', BOUNDED, async () => {
    // Reports off: receipts must stay put between the WebSocket and the HTTP look.
    const alice = await connected(user('alice'), A, { autoReceived: false });
    const bob = await connected(user('bob'), B, { autoReceived: false });
    const room = await sharedRoom(alice, bob);
    const root = await alice.send(room, 'lunch?');
    assert.equal(root.reply_count, 0);
    assert.equal(root.last_reply_at, null);

    // Bob replies on the other gateway; alice hears each reply, then the root's new count.
    const counted = nextEvent(alice, 'message_edited', (ev) => ev.message.id === root.id && ev.message.reply_count === 2);
    const first = await bob.send(room, 'yes', { replyTo: root.id });
    assert.equal(first.reply_to, root.id);
    await alice.send(room, 'not in the thread');
    await bob.send(room, 'noon', { replyTo: root.id });
    const edited = (await counted).message;
    assert.equal(typeof edited.last_reply_at, 'string');

    const page = await alice.thread(room, root.seq);
    assert.deepEqual(Object.keys(page).sort(), ['hasMore', 'replies', 'root'], 'camelCase page, like history');
    assert.equal(page.root.id, root.id);
    assert.equal(page.root.reply_count, 2);
    assert.deepEqual(
      page.replies.map((m) => m.text),
      ['yes', 'noon'],
    );
    assert.equal(page.hasMore, false);
    const one = await bob.thread(room, root.seq, { limit: 1 });
    assert.deepEqual(
      [one.replies.map((m) => m.text), one.hasMore],
      [['yes'], true],
    );
    const rest = await bob.thread(room, root.seq, { afterSeq: one.replies[0].seq });
    assert.deepEqual(
      rest.replies.map((m) => m.text),
      ['noon'],
    );
    assert.deepEqual(await fetchThread(toHttpBaseUrl(B), token(user('bob')), room, root.seq), page);
    assert.deepEqual(
      await fetchThread(toHttpBaseUrl(A), token(user('alice')), room, root.seq, { afterSeq: first.seq, limit: 5 }),
      rest,
    );

    // Receipts: bob read up to the first reply; the same over both transports.
    await bob.read(room, first.seq);
    const members = await alice.receipts(room);
    assert.deepEqual(receiptRows(members), [
      [user('alice'), 0, 0],
      [user('bob'), first.seq, first.seq],
    ]);
    assert.deepEqual(receiptRows(await fetchReceipts(toHttpBaseUrl(B), token(user('bob')), room)), receiptRows(members));

    const mallory = await connected(user('mallory'), B);
    await rejectsWith(alice.thread(room, 99), 'not_found');
    await rejectsWith(mallory.thread(room, root.seq), 'forbidden');
    await rejectsWith(mallory.receipts(room), 'forbidden');
    await rejectsWith(alice.thread(room, root.seq, { limit: 101 }), 'bad_request');
    const status = async (promise, code, httpStatus) => {
      const err = await rejectsWith(promise, code);
      assert.equal(err.status, httpStatus);
    };
    const malloryToken = token(user('mallory'));
    await status(fetchReceipts(toHttpBaseUrl(A), malloryToken, room), 'forbidden', 403);
    await status(fetchReceipts(toHttpBaseUrl(A), malloryToken, '987654321'), 'not_found', 404);
    await status(fetchThread(toHttpBaseUrl(A), malloryToken, room, root.seq), 'forbidden', 403);
    await status(fetchThread(toHttpBaseUrl(A), token(user('alice')), room, 99), 'not_found', 404);
  });
});

describe('attachments', () => {
  test('upload and fetch round trip, for the uploader and for a room member', BOUNDED, async () => {
    const alice = await connected(user('alice'), A);
    const bob = await connected(user('bob'), B);
    const room = await sharedRoom(alice, bob);
    const bytes = new Uint8Array(100_000).map((_, i) => (i * 7) % 256);
    const attachment = await alice.uploadAttachment(bytes, { name: 'dir/notes.txt', contentType: 'text/plain' });
    assert.equal(attachment.name, 'notes.txt');
    assert.equal(attachment.content_type, 'text/plain');
    assert.equal(attachment.size, bytes.length);
    assert.equal(attachment.url, `/v1/attachments/${attachment.id}`);
    const mine = await alice.fetchAttachment(attachment.id);
    assert.deepEqual(new Uint8Array(await mine.arrayBuffer()), bytes);

    // Not yet shared: bob may not read it.
    await assert.rejects(bob.fetchAttachment(attachment), (err) => {
      assert.ok(err instanceof ChatError);
      assert.ok([403, 404].includes(err.status), `status ${err.status}`);
      return true;
    });
    const got = nextEvent(bob, 'message', (ev) => ev.room === room);
    const sent = await alice.send(room, '', { kind: 'file', attachments: [attachment.id] });
    const ev = await got;
    assert.deepEqual(ev.message.attachments, [attachment]);
    assert.equal(sent.kind, 'file');
    const theirs = await bob.fetchAttachment(ev.message.attachments[0]);
    assert.deepEqual(new Uint8Array(await theirs.arrayBuffer()), bytes);
    await assert.rejects(bob.fetchAttachment('987654321'), (err) => err instanceof ChatError && err.status === 404);
  });
});

/**
 * A connected client whose sockets are recorded (so a test can cut them) and whose
 * token source waits on a gate (so a test can hold a reconnect back).
 */
async function gatedClient(userId, url) {
  const { Recording, sockets } = recordingWebSocket();
  const tokenGate = gate();
  const client = new ChatClient({
    url,
    token: async () => {
      await tokenGate.wait();
      return token(userId);
    },
    WebSocket: Recording,
    reconnect: { initialDelayMs: 50, maxDelayMs: 200 },
  });
  clients.push(client);
  await client.connect();
  return { client, sockets, gate: tokenGate };
}

describe('reconnect', () => {
  test('missed messages arrive exactly once, in order, after a reconnect', BOUNDED, async () => {
    const alice = await connected(user('alice'), A);
    const { client: bob, sockets, gate: bobGate } = await gatedClient(user('bob'), B);
    const room = await sharedRoom(alice, bob);
    const messages = record(bob, 'message');
    const recovered = record(bob, 'recovered');
    const states = record(bob, 'state');
    await alice.send(room, 'before');
    await until(() => messages.length === 1, 'the first message');

    // Bob's socket dies; he can't come back until the gate opens.
    bobGate.close();
    sockets.at(-1).terminate();
    await until(() => bob.state === 'reconnecting', 'bob reconnecting');
    const texts = ['m1', 'm2', 'm3', 'm4', 'm5'];
    for (const text of texts) await alice.send(room, text);
    // Commands issued while down wait and go out after the re-join, in order.
    const history = bob.history(room, { limit: 3 });
    const queued = bob.send(room, 'sent while down');
    assert.equal(messages.length, 1, 'nothing arrives while down');
    bobGate.open();

    const mine = await queued;
    assert.equal(mine.seq, 7, 'after the five missed');
    assert.deepEqual(
      (await history).messages.map((m) => m.seq),
      [4, 5, 6],
      'sent after the re-join: the missed ones are there',
    );
    await until(() => messages.length === 7, 'every missed message and the queued one');
    assert.deepEqual(
      messages.map((ev) => ev.message.seq),
      [1, 2, 3, 4, 5, 6, 7],
    );
    assert.deepEqual(
      messages.slice(1, 6).map((ev) => ev.message.text),
      texts,
    );
    assert.deepEqual(recovered, [{ room, truncated: false, lastSeq: 6 }]);
    assert.equal(sockets.length, 2);
    assert.deepEqual(
      states.map((s) => s.state),
      ['reconnecting', 'open'],
    );
    assert.equal(states[0].closeCode, 1006);

    // Live delivery goes on, still exactly once.
    await alice.send(room, 'after');
    await until(() => messages.length === 8, 'the live message');
    // A replay of what was delivered (it arrives before the join's ack) is dropped.
    await bob.request('join', { room, since_seq: 0 });
    assert.deepEqual(
      messages.map((ev) => ev.message.seq),
      [1, 2, 3, 4, 5, 6, 7, 8],
    );
  });

  test('in flight at a drop: send and reads are repeated once, other commands fail as disconnected', BOUNDED, async () => {
    const alice = await connected(user('alice'), A);
    const { Recording, sockets } = recordingWebSocket();
    const bob = await connected(user('bob'), B, { WebSocket: Recording, reconnect: { initialDelayMs: 50 } });
    const room = await sharedRoom(alice, bob);
    const clientMsgId = `inflight-${RUN}`;
    const sending = bob.send(room, 'in flight', { clientMsgId });
    const typing = bob.typing(room, true);
    // Read-only, so repeated too: it answers from the new connection, the send included.
    const searching = bob.search(`flight`, { room });
    sockets.at(-1).terminate();
    await rejectsWith(typing, 'disconnected');
    const sent = await sending;
    assert.equal(sent.client_msg_id, clientMsgId);
    assert.deepEqual(
      (await searching).results.map((hit) => hit.message.id),
      [sent.id],
    );
    const page = await alice.history(room);
    assert.deepEqual(
      page.messages.map((m) => m.client_msg_id),
      [clientMsgId],
      'stored exactly once',
    );
    assert.equal(bob.state, 'open');
    assert.equal(sockets.length, 2);
  });

  test('leave and room_removed forget a room; one removed while disconnected is dropped', BOUNDED, async () => {
    const alice = await connected(user('alice'), A);
    const { client: bob, sockets, gate: bobGate } = await gatedClient(user('bob'), B);
    const kept = await sharedRoom(alice, bob);
    const left = await sharedRoom(alice, bob);
    const removedLive = await sharedRoom(alice, bob);
    const removedOffline = await sharedRoom(alice, bob);
    await bob.leave(left);
    const removed = nextEvent(bob, 'room_removed');
    await alice.removeMember(removedLive, user('bob'));
    assert.deepEqual(await removed, { type: 'room_removed', room: removedLive });
    await rejectsWith(bob.history(removedLive), 'forbidden');

    const errors = record(bob, 'error');
    const recovered = record(bob, 'recovered');
    bobGate.close();
    sockets.at(-1).terminate();
    await until(() => bob.state === 'reconnecting', 'bob reconnecting');
    await alice.removeMember(removedOffline, user('bob'));
    bobGate.open();
    await until(() => bob.state === 'open', 'bob open again');
    assert.deepEqual(recovered, [{ room: kept, truncated: false, lastSeq: 0 }], 'only the kept room is re-joined');
    assert.equal(errors.length, 1);
    assert.equal(errors[0].code, 'forbidden');
    assert.match(errors[0].message, new RegExp(`room ${removedOffline}`));
  });
});
