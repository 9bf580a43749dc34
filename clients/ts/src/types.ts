/**
 * Wire types of the chat protocol (contract v1), exactly as they travel: field names
 * stay snake_case. Ids are strings; timestamps are RFC 3339 UTC strings with
 * milliseconds (`"2026-11-22T01:02:03.456Z"`).
 *
 * This module has no runtime code: its compiled `types.js` is an empty module, kept so
 * the five SDK files can be served side by side.
 */

/** Error codes the server puts in `error` frames and HTTP error bodies. */
export type ErrorCode =
  | 'bad_request'
  | 'unauthorized'
  | 'forbidden'
  | 'not_found'
  | 'rate_limited'
  | 'too_large'
  | 'conflict'
  | 'unavailable'
  | 'internal';

/** Kinds of room. `direct`: two people; `support`: its creator plus every admin. */
export type RoomKind = 'group' | 'direct' | 'support';

/** Kinds of message. */
export type MessageKind = 'text' | 'image' | 'file';

/** A member's role in a room (not the JWT `admin` role). */
export type RoomRole = 'owner' | 'member';

/** An uploaded file. `url` is relative to the gateway's HTTP base (`/v1/attachments/{id}`). */
export interface Attachment {
  id: string;
  name: string;
  content_type: string;
  size: number;
  url: string;
}

/** A chat message. `seq` is per room, gapless, starting at 1. */
export interface Message {
  id: string;
  room: string;
  seq: number;
  sender_id: string;
  /** Present only when the sender's token carried a `name`. */
  sender_name?: string;
  kind: MessageKind;
  /** `null` once the message is deleted. */
  text: string | null;
  attachments: Attachment[];
  reply_to: string | null;
  client_msg_id: string | null;
  created_at: string;
  edited_at: string | null;
  deleted: boolean;
  /** Emoji → ids of the users who reacted with it. */
  reactions: Record<string, string[]>;
  /**
   * (v1.1) How many messages reply to this one (`reply_to` = its id), deleted ones
   * included: the size of its thread. As of when the object was sent; after each reply
   * the room gets `message_edited` for this message with the new count.
   */
  reply_count: number;
  /** (v1.1) The newest reply's `created_at`; `null` without replies. */
  last_reply_at: string | null;
}

/** A room member. */
export interface RoomMember {
  user_id: string;
  role: RoomRole;
}

/** A room, as in `create_room` / `add_members` acks and `room_added` events. */
export interface Room {
  id: string;
  name: string | null;
  kind: RoomKind;
  members: RoomMember[];
  created_at: string;
}

/** One entry of the `rooms` reply. */
export interface RoomSummary {
  id: string;
  name: string | null;
  kind: RoomKind;
  last_seq: number;
  /** Messages by others, not deleted, above the caller's read position. */
  unread: number;
  last_message: Message | null;
}

/** A stored notification (`notification` event, `GET /v1/notifications`). */
export interface Notification {
  id: string;
  title: string;
  body: string;
  data: unknown;
  created_at: string;
  read: boolean;
}

/** The server's first frame after a successful authentication. */
export interface Welcome {
  type: 'welcome';
  /** The id of the `auth` frame it answers, when that frame had one. */
  id?: string;
  user_id: string;
  session_id: string;
  /** Interval of the server's WebSocket pings. */
  heartbeat_ms: number;
  server_time: string;
}

/** An `error` frame: a command's failure (with its `id`) or a connection-level one (without). */
export interface ErrorFrame {
  type: 'error';
  id?: string;
  code: ErrorCode;
  message: string;
  /** With `rate_limited`: when to try again. */
  retry_after_ms?: number;
}

/** An empty ack body. */
export type EmptyAck = Record<string, never>;

// ---------------------------------------------------------------------------
// Commands: the fields of each client frame (besides `type` and `id`) and of its ack
// (besides `type` and `id`).

/** `create_room` fields. */
export interface CreateRoomParams {
  kind: RoomKind;
  name?: string;
  members: string[];
}
/** `create_room` ack. */
export interface CreateRoomAck {
  room: Room;
}

/** `add_members` fields (room owner or admin). */
export interface AddMembersParams {
  room: string;
  members: string[];
}
/** `add_members` ack: `added` lists who was not a member before. */
export interface AddMembersAck {
  room: Room;
  added: string[];
}

/** `remove_member` fields (owner/admin, or a member removing themself). */
export interface RemoveMemberParams {
  room: string;
  user_id: string;
}
/** `remove_member` ack. */
export type RemoveMemberAck = EmptyAck;

/** `rooms` fields: a page of at most `limit` rooms after the cursor `after`. */
export interface RoomsParams {
  limit?: number;
  after?: string;
}
/** `rooms` ack: the caller's rooms, most recent activity first; `next` when `has_more`. */
export interface RoomsAck {
  rooms: RoomSummary[];
  has_more: boolean;
  next?: string;
}

/** `join` fields. With `since_seq`, every message above it is replayed before the ack. */
export interface JoinParams {
  room: string;
  since_seq?: number;
}
/** `join` ack. */
export interface JoinAck {
  /** The room id. */
  room: string;
  /** The newest seq this connection has been given. */
  last_seq: number;
  /** Members with a live connection anywhere in the cluster. */
  online: string[];
  /** More than 1000 messages were missed: page the rest with `history`. */
  truncated: boolean;
}

/** `leave` fields. */
export interface LeaveParams {
  room: string;
}
/** `leave` ack. */
export type LeaveAck = EmptyAck;

/** `send` fields. `text` is 1–4000 characters unless there are attachments. */
export interface SendParams {
  room: string;
  text: string;
  kind?: MessageKind;
  attachments?: string[];
  reply_to?: string;
  /** 1–64 characters; the same sender and id again returns the stored message. */
  client_msg_id?: string;
}
/** `send` ack. */
export interface SendAck {
  message: Message;
}

/** `edit` fields (the sender only). */
export interface EditParams {
  message_id: string;
  text: string;
}
/** `edit` ack. */
export interface EditAck {
  message: Message;
}

/** `delete` fields (sender, room owner or admin). */
export interface DeleteParams {
  message_id: string;
}
/** `delete` ack. */
export type DeleteAck = EmptyAck;

/** `react` / `unreact` fields. */
export interface ReactParams {
  message_id: string;
  /** 1–32 characters. */
  emoji: string;
}
/** `react` / `unreact` ack. */
export type ReactAck = EmptyAck;

/** `typing` fields. */
export interface TypingParams {
  room: string;
  active: boolean;
}
/** `typing` ack. */
export type TypingAck = EmptyAck;

/** `read` fields. */
export interface ReadParams {
  room: string;
  seq: number;
}
/** `read` ack: the read position after the call (clamped, never backwards). */
export interface ReadAck {
  seq: number;
}

/** `history` fields. No cursor: the newest `limit` (1–100, default 50). */
export interface HistoryParams {
  room: string;
  before_seq?: number;
  after_seq?: number;
  limit?: number;
}
/** `history` ack: messages in ascending seq order. */
export interface HistoryAck {
  messages: Message[];
  has_more: boolean;
}

/** `search` fields (v1.1). */
export interface SearchParams {
  /** Words (all must appear), `"quoted phrases"`, `-excluded` words, `or`; 1–256 characters, not blank. */
  q: string;
  /** Only this room (one the caller is a member of). */
  room?: string;
  /** Only messages older than this one: the last result's `message.id`, for the next page. */
  before_id?: string;
  /** 1–50, default 20. */
  limit?: number;
}
/** One search result. */
export interface SearchHit {
  /** The message as it is now (a deleted message never matches). */
  message: Message;
  /** Plain text around the match (up to 24 words). */
  snippet: string;
}
/** `search` ack (and `GET /v1/search`): newest first. */
export interface SearchAck {
  results: SearchHit[];
  has_more: boolean;
}

/** `received` fields (v1.1): this device has every message of `room` up to `seq`. */
export interface ReceivedParams {
  room: string;
  /** ≥ 0. Moves the caller's delivered seq forward only, at most to the room's newest. */
  seq: number;
}
/** `received` ack: the room and the `seq` as sent (a lower one changed nothing). */
export interface ReceivedAck {
  room: string;
  seq: number;
}

/** `receipts` fields (v1.1). */
export interface ReceiptsParams {
  room: string;
}
/** One member's delivery state in a room. `delivered_seq >= read_seq` always. */
export interface Receipt {
  user_id: string;
  /** The highest seq this member's devices have said they received (`received`, or `read`). */
  delivered_seq: number;
  /** The member's read position (`read`). */
  read_seq: number;
}
/** `receipts` ack (and `GET /v1/rooms/{id}/receipts`): every member, by user id. */
export interface ReceiptsAck {
  members: Receipt[];
}

/** `thread` fields (v1.1). */
export interface ThreadParams {
  room: string;
  /** The seq of the thread's root message. */
  root_seq: number;
  /** Only replies after this seq: the previous page's last reply's seq. */
  after_seq?: number;
  /** 1–100, default 50. */
  limit?: number;
}
/** `thread` ack (and `GET /v1/rooms/{id}/threads/{root_seq}`). */
export interface ThreadAck {
  /** The root message (returned deleted when it is). */
  root: Message;
  /** The messages whose `reply_to` is the root (one level), ascending seq. */
  replies: Message[];
  has_more: boolean;
}

/** `presence` fields. */
export interface PresenceParams {
  room: string;
}
/** `presence` ack. */
export interface PresenceAck {
  online: string[];
  /** More members are online than the server lists (`PRESENCE_MAX_ONLINE`). */
  online_truncated?: boolean;
}

/** `ping` fields; the reply is a `pong` frame. */
export type PingParams = Record<string, never>;
/** `ping` reply body. */
export type PongAck = EmptyAck;

/** `refresh_token` fields: a token for the same user. */
export interface RefreshTokenParams {
  token: string;
}
/** `refresh_token` ack: the connection's new expiry. */
export interface RefreshTokenAck {
  expires_at: string;
}

/** Every command: its fields and its ack body. */
export interface Commands {
  create_room: [CreateRoomParams, CreateRoomAck];
  add_members: [AddMembersParams, AddMembersAck];
  remove_member: [RemoveMemberParams, RemoveMemberAck];
  rooms: [RoomsParams, RoomsAck];
  join: [JoinParams, JoinAck];
  leave: [LeaveParams, LeaveAck];
  send: [SendParams, SendAck];
  edit: [EditParams, EditAck];
  delete: [DeleteParams, DeleteAck];
  react: [ReactParams, ReactAck];
  unreact: [ReactParams, ReactAck];
  typing: [TypingParams, TypingAck];
  read: [ReadParams, ReadAck];
  history: [HistoryParams, HistoryAck];
  presence: [PresenceParams, PresenceAck];
  ping: [PingParams, PongAck];
  refresh_token: [RefreshTokenParams, RefreshTokenAck];
  search: [SearchParams, SearchAck];
  received: [ReceivedParams, ReceivedAck];
  receipts: [ReceiptsParams, ReceiptsAck];
  thread: [ThreadParams, ThreadAck];
}

/** A command's type. */
export type CommandType = keyof Commands;

// ---------------------------------------------------------------------------
// Events: server frames without an id. Room events reach every connection that joined
// the room (the sender's own included, except `typing`).

/** `message`: a new message in a joined room. */
export interface NewMessageEvent {
  type: 'message';
  room: string;
  message: Message;
}

/** `message_edited`. */
export interface MessageEditedEvent {
  type: 'message_edited';
  room: string;
  message: Message;
}

/** `message_deleted`: history keeps the seq, marked deleted. */
export interface MessageDeletedEvent {
  type: 'message_deleted';
  room: string;
  message_id: string;
  seq: number;
}

/** `reaction`: sent only when something changed. */
export interface ReactionEvent {
  type: 'reaction';
  room: string;
  message_id: string;
  user_id: string;
  emoji: string;
  added: boolean;
}

/** `typing`: never to the typist's own connections; `active:true` lapses after 6 s. */
export interface TypingEvent {
  type: 'typing';
  room: string;
  user_id: string;
  active: boolean;
}

/** `read`: a member's new read position. */
export interface ReadEvent {
  type: 'read';
  room: string;
  user_id: string;
  seq: number;
}

/**
 * `delivered` (v1.1): a member's delivered seq moved forward (their `received`).
 * Coalesced: at most about one per member and room a second, always the latest value. A
 * `read` moves delivered too, without this event: the `read` event says it.
 */
export interface DeliveredEvent {
  type: 'delivered';
  room: string;
  user_id: string;
  seq: number;
}

/** `presence`: a member's first connection anywhere, or their last one gone. */
export interface PresenceEvent {
  type: 'presence';
  room: string;
  user_id: string;
  status: 'online' | 'offline';
}

/** `room_added`: this user was added to a room (`room` is the room object). */
export interface RoomAddedEvent {
  type: 'room_added';
  room: Room;
}

/** `room_removed`: this user was removed from a room (`room` is the room id). */
export interface RoomRemovedEvent {
  type: 'room_removed';
  room: string;
}

/** `notification`: a stored notification for this user. */
export interface NotificationEvent {
  type: 'notification';
  notification: Notification;
}

/** `push`: an application event sent by an admin; `data` is any JSON value. */
export interface PushEvent {
  type: 'push';
  event: string;
  data: unknown;
}

/** `reconnect`: the gateway is shutting down; close 1012 follows. */
export interface ReconnectEvent {
  type: 'reconnect';
  after_ms: number;
}

/** Every server event, by its `type`. */
export interface ServerEvents {
  message: NewMessageEvent;
  message_edited: MessageEditedEvent;
  message_deleted: MessageDeletedEvent;
  reaction: ReactionEvent;
  typing: TypingEvent;
  read: ReadEvent;
  delivered: DeliveredEvent;
  presence: PresenceEvent;
  room_added: RoomAddedEvent;
  room_removed: RoomRemovedEvent;
  notification: NotificationEvent;
  push: PushEvent;
  reconnect: ReconnectEvent;
}

/** Any server event. */
export type ServerEvent = ServerEvents[keyof ServerEvents];
