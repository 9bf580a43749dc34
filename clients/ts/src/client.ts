import { ChatError } from './errors.js';
import { fetchAttachment, toHttpBaseUrl, toWebSocketUrl, uploadAttachment } from './http.js';
import type { SearchOptions, SearchPage, ThreadOptions, ThreadPage, UploadBody, UploadOptions } from './http.js';
import type {
  AddMembersAck,
  Attachment,
  CreateRoomAck,
  EditAck,
  HistoryAck,
  JoinAck,
  Message,
  MessageKind,
  PresenceAck,
  ReadAck,
  Receipt,
  ReceiptsAck,
  ReceivedAck,
  RefreshTokenAck,
  Room,
  RoomKind,
  RoomsAck,
  RoomSummary,
  SearchAck,
  SendAck,
  ServerEvents,
  ThreadAck,
  Welcome,
} from './types.js';

/**
 * Where the client's connection stands:
 * - `idle`: `connect()` not called yet;
 * - `connecting`: getting the first connection (retrying if the server can't be reached);
 * - `open`: authenticated, rooms re-joined, commands flowing;
 * - `reconnecting`: an open connection was lost; getting it back;
 * - `closed`: `close()` was called, or the server ended the session for good (auth
 *   refused, close 1008), or the connection dropped with `reconnect: false`.
 */
export type ConnectionState = 'idle' | 'connecting' | 'open' | 'reconnecting' | 'closed';

/** Backoff between reconnect attempts: `initialDelayMs × factor^attempt`, at most `maxDelayMs`, ± `jitter`. */
export interface ReconnectOptions {
  /** Delay before the first retry (default 500 ms). */
  initialDelayMs?: number;
  /** Longest delay (default 15 000 ms). */
  maxDelayMs?: number;
  /** Growth per failed attempt (default 2). */
  factor?: number;
  /** Random spread as a fraction of the delay: 0.5 = ±50% (the default). */
  jitter?: number;
}

/** Options of a {@link ChatClient}. */
export interface ChatClientOptions {
  /** `ws(s)://host:port/ws`, or an `http(s)://` base URL (mapped to `ws(s)://…/ws`). */
  url: string;
  /** A JWT, or a function giving one; called before every (re)connect and for HTTP calls. */
  token: string | (() => string | Promise<string>);
  /** WebSocket constructor (default `globalThis.WebSocket`); in node 20 pass the `ws` package's. */
  WebSocket?: any;
  /** Reconnect automatically (default `true`: 500 ms, ×2, at most 15 s, ±50% jitter). */
  reconnect?: boolean | ReconnectOptions;
  /** How long a command may wait for its reply, queueing included (default 15 000 ms). */
  requestTimeoutMs?: number;
  /**
   * Tell the server, by itself, which messages this client has received (default
   * `true`): for each joined room, the highest seq delivered as a `message` event goes
   * out as `received`, at most about once a second per room (the first at once, the
   * rest of a burst a second later in one frame), and never when nothing new came.
   * Messages the user sent themself count too: their device has them. This is what
   * gives senders their "delivered" ticks (`delivered` events, `receipts`).
   * `false`: only {@link ChatClient.received} calls report anything.
   */
  autoReceived?: boolean;
}

/** The `state` event: the connection state changed. */
export interface StateChangeEvent {
  state: ConnectionState;
  previous: ConnectionState;
  /** The WebSocket close code that caused the change, when a socket closed. */
  closeCode?: number;
  /** The close reason the server gave, if any. */
  reason?: string;
}

/**
 * The `recovered` event: after a reconnect, a room was re-joined with `since_seq` and
 * the messages missed meanwhile were delivered as `message` events.
 */
export interface RecoveredEvent {
  room: string;
  /** More than the server replays (1000) were missed: page the gap with `history`. */
  truncated: boolean;
  /** The newest seq this client has been given in the room. */
  lastSeq: number;
}

/** Everything {@link ChatClient.on} can listen to: the server's events as received, plus the SDK's own. */
export interface ChatEvents extends ServerEvents {
  state: StateChangeEvent;
  welcome: Welcome;
  recovered: RecoveredEvent;
  /** Connection-level problems: auth refused, a room that could not be re-joined, an unsolicited error frame. */
  error: ChatError;
}

/** The part of the WebSocket API the client uses: the browser's and `ws`'s both have it. */
interface Socket {
  onopen: ((ev: unknown) => void) | null;
  onmessage: ((ev: { data: unknown }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: unknown) => void) | null;
  send(data: string): void;
  close(code?: number, reason?: string): void;
}

type SocketConstructor = new (url: string) => Socket;

/** A command waiting for its reply. */
interface Pending {
  type: string;
  text: string;
  /** Safe to send again on a new connection if the old one dropped before the reply. */
  repeatable: boolean;
  /** A re-join sent by the client itself while a new connection is being set up. */
  internal: boolean;
  /** Written to the current socket. */
  sent: boolean;
  timer: ReturnType<typeof setTimeout>;
  resolve(body: any): void;
  reject(err: ChatError): void;
}

const DEFAULT_BACKOFF: Required<ReconnectOptions> = { initialDelayMs: 500, maxDelayMs: 15_000, factor: 2, jitter: 0.5 };
const DEFAULT_TIMEOUT_MS = 15_000;
/** Auth refused, admin disconnect, connection cap: the server does not want this session back. */
const CLOSE_POLICY = 1008;
/** The token expired: reconnect at once with a fresh one. */
const CLOSE_TOKEN_EXPIRED = 4001;
/** Longest pause before reconnecting after 4001 (spreads many clients a little). */
const TOKEN_EXPIRED_JITTER_MS = 250;
/**
 * Commands repeated after a reconnect when the connection dropped before their reply:
 * reads, `join` (harmless twice) and `send` (always carries a `client_msg_id`, so the
 * server returns the stored message instead of storing a second one).
 */
const REPEATABLE = new Set([
  'send',
  'rooms',
  'history',
  'presence',
  'search',
  'receipts',
  'thread',
  // Forward only: the same seq twice changes nothing.
  'received',
  'join',
  'ping',
]);
/** Automatic `received` reports go out at most this often per room. */
const RECEIVED_INTERVAL_MS = 1000;
/** A failed automatic `received` with one of these codes is reported again with the next batch. */
const RECEIVED_RETRY = new Set(['disconnected', 'timeout', 'rate_limited', 'unavailable', 'internal']);
/** Event names the SDK emits itself; frames of these types from the server are not forwarded. */
const SDK_EVENTS = new Set(['state', 'welcome', 'recovered', 'error']);

/** 128 random bits as hex, for `client_msg_id`s. */
function randomId(): string {
  const bytes = new Uint8Array(16);
  if (typeof crypto !== 'undefined' && typeof crypto.getRandomValues === 'function') {
    crypto.getRandomValues(bytes);
  } else {
    for (let i = 0; i < bytes.length; i++) bytes[i] = Math.floor(Math.random() * 256);
  }
  return Array.from(bytes, (b) => b.toString(16).padStart(2, '0')).join('');
}

/** Makes a socket inert: its later events (including a late `error`) go nowhere. */
function detach(socket: Socket): void {
  socket.onopen = null;
  socket.onmessage = null;
  socket.onclose = null;
  // Kept as a no-op rather than null: `ws` throws on an `error` event nobody listens to.
  socket.onerror = () => {};
}

/**
 * A chat connection: commands as promises, server events as callbacks, and automatic
 * reconnection that re-joins rooms and delivers the messages missed meanwhile.
 *
 * ```ts
 * const client = new ChatClient({ url: 'wss://chat.example.com', token: getToken });
 * client.on('message', (ev) => render(ev.message));
 * await client.connect();
 * await client.join(roomId);
 * await client.send(roomId, 'hello');
 * ```
 */
export class ChatClient {
  private readonly wsUrl: string;
  private readonly httpBase: string;
  private readonly Socket: SocketConstructor;
  /** `null`: do not reconnect. */
  private readonly backoff: Required<ReconnectOptions> | null;
  private readonly timeoutMs: number;
  private tokenSource: string | (() => string | Promise<string>);

  private current: ConnectionState = 'idle';
  private socket: Socket | null = null;
  /** The current socket got its `welcome`. */
  private welcomed = false;
  /** An `error` frame the current socket got instead of `welcome`. */
  private refusal: ChatError | null = null;
  /** Bumped by every connection attempt and by `close()`: stale async steps see it and stop. */
  private generation = 0;
  private handshakeTimer: ReturnType<typeof setTimeout> | undefined;
  private reconnectTimer: ReturnType<typeof setTimeout> | undefined;
  /** Failed attempts since the last open connection, for the backoff. */
  private attempt = 0;
  /** From a `reconnect` event: wait at least this long before reconnecting. */
  private minDelayMs = 0;
  private everOpen = false;
  private closedByUser = false;
  private lastWelcome: Welcome | undefined;
  private connecting: { promise: Promise<Welcome>; resolve(w: Welcome): void; reject(e: ChatError): void } | null =
    null;
  private nextId = 0;
  /** Commands awaiting their reply, in the order they were issued (a Map keeps insertion order). */
  private readonly pending = new Map<string, Pending>();
  /** Joined rooms → the highest message seq delivered in each. */
  private readonly joined = new Map<string, number>();
  private readonly handlers = new Map<string, Set<(ev: any) => void>>();
  /** Report received seqs by itself (`options.autoReceived`). */
  private readonly autoReceived: boolean;
  /** Joined rooms → the highest seq delivered there and not yet reported with `received`. */
  private readonly unreported = new Map<string, number>();
  /** Joined rooms → the highest seq reported with `received` (sent; its ack may be pending). */
  private readonly reported = new Map<string, number>();
  /** The next batch of `received` reports, when one is due. */
  private receivedTimer: ReturnType<typeof setTimeout> | undefined;
  /** When the latest batch went out (`Date.now()`), for the once-a-second pace. */
  private receivedAt = 0;

  constructor(options: ChatClientOptions) {
    this.wsUrl = toWebSocketUrl(options.url);
    this.httpBase = toHttpBaseUrl(this.wsUrl);
    this.tokenSource = options.token;
    const Socket = options.WebSocket ?? (globalThis as { WebSocket?: unknown }).WebSocket;
    if (typeof Socket !== 'function') {
      throw new TypeError('no WebSocket implementation: pass options.WebSocket (in node, the `ws` package)');
    }
    this.Socket = Socket as SocketConstructor;
    const reconnect = options.reconnect ?? true;
    this.backoff = reconnect === false ? null : { ...DEFAULT_BACKOFF, ...(reconnect === true ? {} : reconnect) };
    this.timeoutMs = options.requestTimeoutMs ?? DEFAULT_TIMEOUT_MS;
    this.autoReceived = options.autoReceived ?? true;
  }

  /** The connection state. */
  get state(): ConnectionState {
    return this.current;
  }

  /** The authenticated user's id, from the latest `welcome`. */
  get userId(): string | undefined {
    return this.lastWelcome?.user_id;
  }

  // -------------------------------------------------------------------------------
  // Connection

  /**
   * Connects and authenticates. Resolves with the first `welcome`, once the connection
   * is open. If the server can't be reached, or answers `unavailable`, it keeps
   * retrying (unless `reconnect` is false). Rejects with {@link ChatError} `unauthorized` when the token is refused (no
   * retry then), `rate_limited` at the per-user connection cap, `closed` after
   * {@link close}. After the server ended the session (state `closed`), calling it
   * again starts over.
   */
  connect(): Promise<Welcome> {
    if (this.closedByUser) return Promise.reject(new ChatError('closed', 'the client was closed'));
    if (this.current === 'open' && this.lastWelcome) return Promise.resolve(this.lastWelcome);
    if (!this.connecting) {
      let resolve!: (w: Welcome) => void;
      let reject!: (e: ChatError) => void;
      const promise = new Promise<Welcome>((res, rej) => {
        resolve = res;
        reject = rej;
      });
      this.connecting = { promise, resolve, reject };
      if (this.current === 'idle' || this.current === 'closed') {
        this.attempt = 0;
        this.setState('connecting');
        void this.openSocket();
      }
    }
    return this.connecting.promise;
  }

  /**
   * Closes the connection for good: no reconnect; pending commands and a pending
   * `connect()` reject with {@link ChatError} `closed`, as does every later command.
   */
  close(): void {
    if (this.closedByUser) return;
    this.closedByUser = true;
    this.generation++;
    clearTimeout(this.reconnectTimer);
    clearTimeout(this.handshakeTimer);
    clearTimeout(this.receivedTimer);
    this.receivedTimer = undefined;
    const socket = this.socket;
    this.socket = null;
    this.welcomed = false;
    if (socket) {
      detach(socket);
      try {
        socket.close(1000, 'client closed');
      } catch {
        // Already closing: nothing more to do.
      }
    }
    const err = new ChatError('closed', 'the client was closed');
    this.failAll(err);
    this.connecting?.reject(err);
    this.connecting = null;
    this.setState('closed');
  }

  /** Listens to an event; returns a function that stops listening. */
  on<K extends keyof ChatEvents>(type: K, handler: (ev: ChatEvents[K]) => void): () => void {
    let set = this.handlers.get(type);
    if (!set) {
      set = new Set();
      this.handlers.set(type, set);
    }
    const listeners = set;
    listeners.add(handler);
    return () => {
      listeners.delete(handler);
    };
  }

  // -------------------------------------------------------------------------------
  // Commands

  /**
   * Sends a raw command. Resolves with its ack (without `type` and `id`); rejects with
   * a {@link ChatError}: the server's code, or `timeout`, `closed`, `disconnected`.
   * While the client is not open the command waits (within the timeout) and goes out
   * once the connection is open and joined rooms are re-joined.
   */
  request<T = any>(type: string, fields: Record<string, unknown> = {}): Promise<T> {
    return this.issue<T>(type, fields, false);
  }

  /** Creates a room; the caller becomes its owner. A `direct` room asked for again is the same room. */
  async createRoom(p: { kind: RoomKind; name?: string; members: string[] }): Promise<Room> {
    const ack = await this.request<CreateRoomAck>('create_room', { kind: p.kind, name: p.name, members: p.members });
    return ack.room;
  }

  /** Adds members (room owner or admin); `added` lists who was not a member before. */
  addMembers(room: string, members: string[]): Promise<{ room: Room; added: string[] }> {
    return this.request<AddMembersAck>('add_members', { room, members });
  }

  /** Removes a member (owner/admin, or yourself to leave the room for good). */
  async removeMember(room: string, userId: string): Promise<void> {
    await this.request('remove_member', { room, user_id: userId });
  }

  /** The caller's rooms, most recent activity first. */
  async rooms(): Promise<RoomSummary[]> {
    return (await this.request<RoomsAck>('rooms')).rooms;
  }

  /**
   * Joins a room: its events start flowing to this client. The client remembers the
   * room and the newest seq it delivered there, and re-joins with `since_seq` after a
   * reconnect. With `sinceSeq`, every message above it is delivered as a `message`
   * event before this resolves.
   */
  async join(room: string, opts: { sinceSeq?: number } = {}): Promise<JoinAck> {
    const since = opts.sinceSeq;
    const before = this.joined.get(room);
    // Lower the mark first, or the replay the caller asked for would be dropped as duplicates.
    if (since !== undefined) this.joined.set(room, since);
    try {
      const ack = await this.request<JoinAck>('join', since === undefined ? { room } : { room, since_seq: since });
      this.joined.set(room, Math.max(this.joined.get(room) ?? ack.last_seq, ack.last_seq));
      return ack;
    } catch (err) {
      if (since !== undefined) {
        if (before === undefined) this.joined.delete(room);
        else this.joined.set(room, Math.max(before, this.joined.get(room) ?? before));
      }
      throw err;
    }
  }

  /** Leaves a room: no more of its events, and it is not re-joined after a reconnect. */
  async leave(room: string): Promise<void> {
    this.forget(room);
    await this.request('leave', { room });
  }

  /**
   * Sends a message. A `clientMsgId` is generated when absent, which makes the send safe
   * to repeat: the SDK re-sends it after a reconnect if the reply was lost.
   */
  async send(
    room: string,
    text: string,
    opts: { kind?: MessageKind; attachments?: string[]; replyTo?: string; clientMsgId?: string } = {},
  ): Promise<Message> {
    const ack = await this.request<SendAck>('send', {
      room,
      text,
      kind: opts.kind,
      attachments: opts.attachments,
      reply_to: opts.replyTo,
      client_msg_id: opts.clientMsgId ?? randomId(),
    });
    return ack.message;
  }

  /** Edits a message (its sender only). */
  async edit(messageId: string, text: string): Promise<Message> {
    return (await this.request<EditAck>('edit', { message_id: messageId, text })).message;
  }

  /** Deletes a message (its sender, the room owner or an admin). */
  async deleteMessage(messageId: string): Promise<void> {
    await this.request('delete', { message_id: messageId });
  }

  /** Adds a reaction. */
  async react(messageId: string, emoji: string): Promise<void> {
    await this.request('react', { message_id: messageId, emoji });
  }

  /** Removes a reaction. */
  async unreact(messageId: string, emoji: string): Promise<void> {
    await this.request('unreact', { message_id: messageId, emoji });
  }

  /** Tells the room's other connections that this user is (not) typing; `true` lapses after 6 s. */
  async typing(room: string, active: boolean): Promise<void> {
    await this.request('typing', { room, active });
  }

  /** Moves the read position; resolves with the position after the call (clamped, never backwards). */
  async read(room: string, seq: number): Promise<number> {
    return (await this.request<ReadAck>('read', { room, seq })).seq;
  }

  /** A page of a room's messages, in ascending seq order. No cursor: the newest `limit` (default 50). */
  async history(
    room: string,
    opts: { beforeSeq?: number; afterSeq?: number; limit?: number } = {},
  ): Promise<{ messages: Message[]; hasMore: boolean }> {
    const ack = await this.request<HistoryAck>('history', {
      room,
      before_seq: opts.beforeSeq,
      after_seq: opts.afterSeq,
      limit: opts.limit,
    });
    return { messages: ack.messages, hasMore: ack.has_more };
  }

  /**
   * Messages matching `q` in the caller's rooms (or only `room`), newest first, each with
   * a plain-text snippet around the match. `q` takes words (all must appear), `"quoted
   * phrases"`, `-excluded` words and `or`; blank is `bad_request`. While `hasMore`, the
   * next page is `beforeId` = the last result's `message.id`.
   */
  async search(q: string, opts: SearchOptions = {}): Promise<SearchPage> {
    const ack = await this.request<SearchAck>('search', {
      q,
      room: opts.room,
      before_id: opts.beforeId,
      limit: opts.limit,
    });
    return { results: ack.results, hasMore: ack.has_more };
  }

  /**
   * Tells the server this user's device has every message of `room` up to `seq`: their
   * delivered seq there moves forward (never back), and the room's joined connections
   * get a `delivered` event (coalesced, within about a second). The client does this by
   * itself for joined rooms unless `autoReceived` is off. Resolves with the ack.
   */
  received(room: string, seq: number): Promise<{ room: string; seq: number }> {
    return this.request<ReceivedAck>('received', { room, seq });
  }

  /**
   * Every member's `delivered_seq` and `read_seq` in the room (`delivered_seq >=
   * read_seq`). A `received` of the last second may not show yet; follow `delivered`
   * and `read` events to keep the picture current.
   */
  async receipts(room: string): Promise<Receipt[]> {
    return (await this.request<ReceiptsAck>('receipts', { room })).members;
  }

  /**
   * A page of the thread of the message at `rootSeq`: the root and the messages that
   * reply to it (one level), ascending seq. While `hasMore`, the next page is `afterSeq`
   * = the last reply's `seq`. New replies arrive as `message` events (with `reply_to` =
   * the root's id), each followed by `message_edited` for the root with its new
   * `reply_count`.
   */
  async thread(room: string, rootSeq: number, opts: ThreadOptions = {}): Promise<ThreadPage> {
    const ack = await this.request<ThreadAck>('thread', {
      room,
      root_seq: rootSeq,
      after_seq: opts.afterSeq,
      limit: opts.limit,
    });
    return { root: ack.root, replies: ack.replies, hasMore: ack.has_more };
  }

  /** Members of the room with a live connection anywhere in the cluster. */
  async presence(room: string): Promise<string[]> {
    return (await this.request<PresenceAck>('presence', { room })).online;
  }

  /** A round trip to the server (not needed to stay connected: the server's pings do that). */
  async ping(): Promise<void> {
    await this.request('ping');
  }

  /**
   * Extends the connection's expiry with a new token for the same user (default: one
   * from `options.token`); resolves with the new `expires_at`. A token given here also
   * replaces a fixed-string `options.token` for later reconnects and HTTP calls.
   */
  async refreshToken(token?: string): Promise<string> {
    const fresh = token ?? (await this.token());
    const ack = await this.request<RefreshTokenAck>('refresh_token', { token: fresh });
    if (token !== undefined && typeof this.tokenSource === 'string') this.tokenSource = token;
    return ack.expires_at;
  }

  // -------------------------------------------------------------------------------
  // HTTP

  /** Uploads a file (at most 10 MiB) over HTTP; its id can then go into `send`'s `attachments`. */
  async uploadAttachment(body: UploadBody, opts: UploadOptions): Promise<Attachment> {
    return uploadAttachment(this.httpBase, await this.token(), body, opts);
  }

  /** Downloads an attachment's bytes over HTTP. */
  async fetchAttachment(idOrAttachment: string | Attachment): Promise<Blob> {
    return fetchAttachment(this.httpBase, await this.token(), idOrAttachment);
  }

  // -------------------------------------------------------------------------------
  // Internals: the socket's life

  private async token(): Promise<string> {
    const source = this.tokenSource;
    return typeof source === 'function' ? await source() : source;
  }

  /** One connection attempt: token, socket, `auth` frame; the socket's events take it from there. */
  private async openSocket(): Promise<void> {
    const generation = ++this.generation;
    let token: string;
    try {
      token = await this.token();
    } catch (err) {
      if (generation !== this.generation) return;
      this.emit('error', new ChatError('unavailable', `the token provider failed: ${describe(err)}`));
      this.socketGone(undefined, 'no token');
      return;
    }
    if (generation !== this.generation) return;
    let socket: Socket;
    try {
      socket = new this.Socket(this.wsUrl);
    } catch (err) {
      this.emit('error', new ChatError('unavailable', `cannot open ${this.wsUrl}: ${describe(err)}`));
      this.socketGone(undefined, 'cannot open a socket');
      return;
    }
    this.socket = socket;
    this.welcomed = false;
    this.refusal = null;
    // The token goes in the first frame, not the URL, so it stays out of logs.
    const auth = JSON.stringify({ type: 'auth', id: this.newId(), token });
    socket.onopen = () => socket.send(auth);
    socket.onmessage = (ev) => {
      if (socket === this.socket && typeof ev.data === 'string') this.onFrame(ev.data);
    };
    socket.onclose = (ev) => {
      if (socket === this.socket) this.socketGone(ev.code, ev.reason);
    };
    // A `close` event follows every `error` and says what there is to say.
    socket.onerror = () => {};
    this.handshakeTimer = setTimeout(() => {
      if (socket === this.socket && !this.welcomed) this.dropSocket('no welcome in time');
    }, this.timeoutMs);
  }

  /** Abandons the current socket without waiting for its close handshake. */
  private dropSocket(reason: string): void {
    const socket = this.socket;
    if (!socket) return;
    detach(socket);
    try {
      socket.close(1000, reason);
    } catch {
      // Already closing.
    }
    this.socketGone(undefined, reason);
  }

  /**
   * The current socket is gone (or never came): settles what was in flight on it, then
   * either ends the session or schedules the next attempt.
   */
  private socketGone(code: number | undefined, reason: string | undefined): void {
    if (this.socket) detach(this.socket);
    this.socket = null;
    this.welcomed = false;
    clearTimeout(this.handshakeTimer);
    const refusal = this.refusal;
    this.refusal = null;
    for (const [id, p] of this.pending) {
      if (!p.sent) continue;
      if (p.repeatable && !p.internal) {
        p.sent = false; // goes out again on the next connection
      } else {
        const message = `the connection dropped before the reply to ${p.type}; it may or may not have taken effect`;
        this.settle(id)?.reject(new ChatError('disconnected', message));
      }
    }
    if (this.closedByUser) return;
    // `unavailable` instead of welcome (the gateway could not subscribe our event
    // channel; close 1013 follows) is a refusal for now, not for good: retry.
    if ((refusal && refusal.code !== 'unavailable') || code === CLOSE_POLICY || this.backoff === null) {
      const detail = reason ? `: ${reason}` : '';
      const err = refusal ?? new ChatError('disconnected', `the connection ended (${code ?? 'no code'})${detail}`);
      this.end(err, code, reason);
      return;
    }
    this.setState(this.everOpen ? 'reconnecting' : 'connecting', code, reason);
    let delay: number;
    if (code === CLOSE_TOKEN_EXPIRED) {
      delay = Math.random() * TOKEN_EXPIRED_JITTER_MS;
    } else {
      delay = this.minDelayMs + this.nextBackoff();
    }
    this.minDelayMs = 0;
    clearTimeout(this.reconnectTimer);
    this.reconnectTimer = setTimeout(() => {
      this.reconnectTimer = undefined;
      void this.openSocket();
    }, delay);
  }

  /** The session is over (the server refused or ended it, or reconnecting is off). */
  private end(err: ChatError, code: number | undefined, reason: string | undefined): void {
    clearTimeout(this.reconnectTimer);
    this.failAll(err);
    this.connecting?.reject(err);
    this.connecting = null;
    this.setState('closed', code, reason);
    this.emit('error', err);
  }

  private nextBackoff(): number {
    const b = this.backoff ?? DEFAULT_BACKOFF;
    const base = Math.min(b.maxDelayMs, b.initialDelayMs * Math.pow(b.factor, this.attempt++));
    const jittered = base * (1 + b.jitter * (2 * Math.random() - 1));
    return Math.max(0, Math.min(b.maxDelayMs, jittered));
  }

  private onFrame(text: string): void {
    let frame: any;
    try {
      frame = JSON.parse(text);
    } catch {
      return; // the server only sends JSON objects; nothing to do with anything else
    }
    if (!frame || typeof frame !== 'object' || typeof frame.type !== 'string') return;
    if (!this.welcomed) {
      if (frame.type === 'welcome') this.onWelcome(frame as Welcome);
      // An error instead of welcome: auth refused or the connection cap. Close 1008
      // follows; the session ends then.
      else if (frame.type === 'error') this.refusal = ChatError.fromFrame(frame);
      return;
    }
    switch (frame.type) {
      case 'ack':
      case 'pong':
      case 'error':
        if (typeof frame.id === 'string') this.onReply(frame);
        else if (frame.type === 'error') this.emit('error', ChatError.fromFrame(frame));
        return;
      case 'message':
        if (!this.isNew(frame)) return;
        this.noteReceived(String(frame.room), frame.message?.seq);
        break;
      case 'room_removed':
        this.forget(String(frame.room));
        break;
      case 'reconnect':
        this.minDelayMs = Math.max(0, Number(frame.after_ms) || 0);
        break;
    }
    if (!SDK_EVENTS.has(frame.type)) this.emit(frame.type, frame);
  }

  /** Whether a `message` event is news, tracking the room's newest seq; replays of what was delivered are not. */
  private isNew(frame: { room?: unknown; message?: { seq?: unknown } }): boolean {
    const room = String(frame.room);
    const seq = frame.message?.seq;
    const last = this.joined.get(room);
    if (last === undefined || typeof seq !== 'number') return true;
    if (seq <= last) return false;
    this.joined.set(room, seq);
    return true;
  }

  private onReply(frame: { type: string; id: string; [k: string]: unknown }): void {
    const p = this.settle(frame.id);
    if (!p) return; // timed out already
    if (frame.type === 'error') {
      p.reject(ChatError.fromFrame(frame));
    } else {
      const { type: _type, id: _id, ...body } = frame;
      p.resolve(body);
    }
  }

  /** Authenticated: re-join the remembered rooms (replaying what was missed), then open. */
  private onWelcome(welcome: Welcome): void {
    this.welcomed = true;
    clearTimeout(this.handshakeTimer);
    this.lastWelcome = welcome;
    this.emit('welcome', welcome);
    const socket = this.socket;
    const rooms = [...this.joined];
    if (rooms.length === 0) {
      this.open();
      return;
    }
    // Commands of one connection run in order, so all re-joins can go at once.
    void Promise.all(rooms.map(([room, since]) => this.rejoin(room, since))).then((outcomes) => {
      if (socket !== this.socket) return; // dropped meanwhile: the next connection re-joins
      if (outcomes.includes('retry')) this.dropSocket('could not re-join every room');
      else this.open();
    });
  }

  private async rejoin(room: string, since: number): Promise<'ok' | 'gone' | 'retry'> {
    try {
      const ack = await this.issue<JoinAck>('join', { room, since_seq: since }, true);
      const last = this.joined.get(room);
      if (last === undefined) return 'ok'; // left meanwhile
      this.joined.set(room, Math.max(last, ack.last_seq));
      this.emit('recovered', { room, truncated: ack.truncated === true, lastSeq: Math.max(last, ack.last_seq) });
      return 'ok';
    } catch (err) {
      const e = err instanceof ChatError ? err : new ChatError('internal', describe(err));
      if (e.code === 'forbidden' || e.code === 'not_found') {
        // Removed from the room (or it is gone) while disconnected: stop following it.
        this.forget(room);
        this.emit('error', new ChatError(e.code, `room ${room} could not be re-joined: ${e.message}`));
        return 'gone';
      }
      return 'retry';
    }
  }

  /** The connection is ready: send what waited, oldest first, then tell the listeners. */
  private open(): void {
    const previous = this.current;
    this.current = 'open';
    this.attempt = 0;
    this.minDelayMs = 0;
    this.everOpen = true;
    for (const p of this.pending.values()) if (!p.sent) this.transmit(p);
    this.scheduleReceived();
    const connecting = this.connecting;
    this.connecting = null;
    if (this.lastWelcome) connecting?.resolve(this.lastWelcome);
    this.emitState(previous);
  }

  // -------------------------------------------------------------------------------
  // Internals: automatic `received`

  /** Stops following a room: it is not re-joined, and nothing more is reported for it. */
  private forget(room: string): void {
    this.joined.delete(room);
    this.unreported.delete(room);
    this.reported.delete(room);
  }

  /** A message event delivered `seq` in `room`: due for the next `received` report. */
  private noteReceived(room: string, seq: unknown): void {
    if (!this.autoReceived || typeof seq !== 'number' || !this.joined.has(room)) return;
    if (seq <= (this.reported.get(room) ?? 0) || seq <= (this.unreported.get(room) ?? 0)) return;
    this.unreported.set(room, seq);
    this.scheduleReceived();
  }

  /**
   * Schedules the next batch: at once after a quiet second, else a second after the
   * previous batch. Only while open; {@link open} calls it again after a reconnect.
   */
  private scheduleReceived(): void {
    if (this.receivedTimer !== undefined || this.unreported.size === 0 || this.current !== 'open') return;
    const delay = Math.max(0, this.receivedAt + RECEIVED_INTERVAL_MS - Date.now());
    this.receivedTimer = setTimeout(() => {
      this.receivedTimer = undefined;
      this.flushReceived();
    }, delay);
  }

  /** Sends one `received` per room with something new, fire and forget. */
  private flushReceived(): void {
    if (this.current !== 'open' || this.closedByUser) return;
    this.receivedAt = Date.now();
    const batch = [...this.unreported];
    this.unreported.clear();
    for (const [room, seq] of batch) {
      if (!this.joined.has(room)) continue; // left meanwhile
      this.reported.set(room, seq);
      this.issue<ReceivedAck>('received', { room, seq }, false).catch((err: unknown) => {
        // Left or removed (`forbidden`), or closed: nothing to report any more. A
        // passing failure: report it again with the next batch (unless a newer seq
        // went out meanwhile).
        const code = err instanceof ChatError ? err.code : 'internal';
        if (!RECEIVED_RETRY.has(code) || this.reported.get(room) !== seq) return;
        this.reported.delete(room);
        this.noteReceived(room, seq);
      });
    }
  }

  // -------------------------------------------------------------------------------
  // Internals: commands

  private newId(): string {
    return `c${++this.nextId}`;
  }

  private issue<T>(type: string, fields: Record<string, unknown>, internal: boolean): Promise<T> {
    if (this.closedByUser || this.current === 'closed') {
      return Promise.reject(new ChatError('closed', 'the client is closed'));
    }
    const id = this.newId();
    let text: string;
    try {
      text = JSON.stringify({ ...fields, type, id });
    } catch (err) {
      return Promise.reject(new ChatError('bad_request', `cannot encode ${type}: ${describe(err)}`));
    }
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.settle(id);
        reject(new ChatError('timeout', `no reply to ${type} within ${this.timeoutMs} ms`));
      }, this.timeoutMs);
      const repeatable = REPEATABLE.has(type);
      const p: Pending = { type, text, repeatable, internal, sent: false, timer, resolve, reject };
      this.pending.set(id, p);
      // Re-joins go out on the fresh connection before it opens; everything else waits for open.
      if (internal ? this.welcomed : this.current === 'open') this.transmit(p);
    });
  }

  private transmit(p: Pending): void {
    const socket = this.socket;
    if (!socket) return;
    p.sent = true;
    try {
      socket.send(p.text);
    } catch {
      // The socket is closing: its close event re-sends or fails this command.
    }
  }

  /** Removes a pending command and stops its timer; the command, if it was still pending. */
  private settle(id: string): Pending | undefined {
    const p = this.pending.get(id);
    if (!p) return undefined;
    this.pending.delete(id);
    clearTimeout(p.timer);
    return p;
  }

  private failAll(err: ChatError): void {
    for (const id of [...this.pending.keys()]) this.settle(id)?.reject(err);
  }

  // -------------------------------------------------------------------------------
  // Internals: events

  private setState(state: ConnectionState, closeCode?: number, reason?: string): void {
    const previous = this.current;
    if (previous === state) return;
    this.current = state;
    this.emitState(previous, closeCode, reason);
  }

  private emitState(previous: ConnectionState, closeCode?: number, reason?: string): void {
    const ev: StateChangeEvent = { state: this.current, previous };
    if (closeCode !== undefined) ev.closeCode = closeCode;
    if (reason) ev.reason = reason;
    this.emit('state', ev);
  }

  private emit(type: string, ev: unknown): void {
    const set = this.handlers.get(type);
    if (!set) return;
    for (const handler of [...set]) {
      try {
        handler(ev);
      } catch (err) {
        // A listener's bug must not break the client's bookkeeping: rethrow it outside.
        setTimeout(() => {
          throw err;
        }, 0);
      }
    }
  }
}

function describe(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
