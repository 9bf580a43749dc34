import { ChatError } from './errors.js';
import type { Attachment, Message, Receipt, ReceiptsAck, SearchAck, SearchHit, ThreadAck } from './types.js';

/** Bytes an upload accepts. */
export type UploadBody = Blob | ArrayBuffer | Uint8Array;

/** Name and declared type of an upload. */
export interface UploadOptions {
  /** File name; the server drops any path and control characters. */
  name: string;
  /** MIME type; the server keeps it only when it is on its allowlist (else `application/octet-stream`). */
  contentType: string;
}

/** What to search besides the query: `search` over the WebSocket and {@link searchMessages} alike. */
export interface SearchOptions {
  /** Only this room; one the caller is not a member of is `forbidden`, an unknown one `not_found`. */
  room?: string;
  /** The previous page's last `results[…].message.id`: only older messages. */
  beforeId?: string;
  /** 1–50 (default 20). */
  limit?: number;
}

/** A page of search results, newest first; `hasMore`: pass the last result's `message.id` as `beforeId`. */
export interface SearchPage {
  results: SearchHit[];
  hasMore: boolean;
}

/** Which replies of a thread to get: `thread` over the WebSocket and {@link fetchThread} alike. */
export interface ThreadOptions {
  /** Only replies after this seq: the previous page's last reply's `seq`. */
  afterSeq?: number;
  /** 1–100 (default 50). */
  limit?: number;
}

/** A page of a thread: its root and direct replies in ascending seq; `hasMore`: pass the last reply's `seq` as `afterSeq`. */
export interface ThreadPage {
  root: Message;
  replies: Message[];
  hasMore: boolean;
}

/**
 * The WebSocket URL for `url`: a `ws(s)://` URL is kept as given; an `http(s)://` base
 * URL becomes `ws(s)://…/ws` (its path, if any, is kept as a prefix).
 */
export function toWebSocketUrl(url: string): string {
  const u = new URL(url);
  if (u.protocol === 'ws:' || u.protocol === 'wss:') return u.toString();
  if (u.protocol !== 'http:' && u.protocol !== 'https:') {
    throw new TypeError(`unsupported URL scheme ${u.protocol} (want ws:, wss:, http: or https:)`);
  }
  u.protocol = u.protocol === 'https:' ? 'wss:' : 'ws:';
  u.pathname = `${u.pathname.replace(/\/+$/, '')}/ws`;
  u.search = '';
  u.hash = '';
  return u.toString();
}

/**
 * The HTTP base URL (no trailing slash) of the gateway serving `url`, a `ws(s)://…/ws`
 * or `http(s)://` URL: the HTTP API lives on the same host and port as the WebSocket.
 */
export function toHttpBaseUrl(url: string): string {
  const u = new URL(url);
  const websocket = u.protocol === 'ws:' || u.protocol === 'wss:';
  const scheme = u.protocol === 'wss:' || u.protocol === 'https:' ? 'https:' : 'http:';
  let path = u.pathname.replace(/\/+$/, '');
  if (websocket && path.endsWith('/ws')) path = path.slice(0, -'/ws'.length);
  return `${scheme}//${u.host}${path}`;
}

/** The status → code mapping of the server, for error replies without a JSON body. */
function codeForStatus(status: number): string {
  switch (status) {
    case 400:
      return 'bad_request';
    case 401:
      return 'unauthorized';
    case 403:
      return 'forbidden';
    case 404:
      return 'not_found';
    case 409:
      return 'conflict';
    case 413:
      return 'too_large';
    case 429:
      return 'rate_limited';
    case 503:
      return 'unavailable';
    default:
      return 'internal';
  }
}

/** The {@link ChatError} of a non-2xx response: from its `{"error":{code,message}}` body when it has one. */
async function responseError(res: Response): Promise<ChatError> {
  let code = codeForStatus(res.status);
  let message = `HTTP ${res.status}`;
  try {
    const body = (await res.json()) as { error?: { code?: unknown; message?: unknown } };
    if (typeof body.error?.code === 'string') code = body.error.code;
    if (typeof body.error?.message === 'string') message = body.error.message;
  } catch {
    // Not JSON (a proxy's error page, say): the status is all there is.
  }
  const retryAfter = Number(res.headers.get('retry-after'));
  const options = { status: res.status, ...(retryAfter > 0 ? { retryAfterMs: retryAfter * 1000 } : {}) };
  return new ChatError(code, message, options);
}

/** `fetch`, with a network failure turned into a {@link ChatError} `unavailable`. */
async function send(url: string, init: RequestInit): Promise<Response> {
  try {
    return await fetch(url, init);
  } catch (err) {
    throw new ChatError('unavailable', `request to ${url} failed: ${(err as Error)?.message ?? err}`);
  }
}

/**
 * Uploads `body` with `POST /v1/attachments?name=`; resolves with the stored attachment,
 * whose id can go into a message's `attachments`. Rejects with a {@link ChatError}
 * carrying the HTTP `status` (413 `too_large` past 10 MiB).
 */
export async function uploadAttachment(
  baseUrl: string,
  token: string,
  body: UploadBody,
  options: UploadOptions,
): Promise<Attachment> {
  const url = `${baseUrl}/v1/attachments?name=${encodeURIComponent(options.name)}`;
  const res = await send(url, {
    method: 'POST',
    headers: { authorization: `Bearer ${token}`, 'content-type': options.contentType },
    body: body as BodyInit,
  });
  if (!res.ok) throw await responseError(res);
  const reply = (await res.json()) as { attachment: Attachment };
  return reply.attachment;
}

/**
 * Downloads an attachment's bytes with `GET /v1/attachments/{id}` (allowed to its
 * uploader and to members of a room whose message carries it).
 */
export async function fetchAttachment(baseUrl: string, token: string, attachment: string | Attachment): Promise<Blob> {
  // Built from the id, never from `attachment.url`: the bearer token must only ever go
  // to the gateway this client talks to.
  const id = typeof attachment === 'string' ? attachment : attachment.id;
  const url = `${baseUrl}/v1/attachments/${encodeURIComponent(id)}`;
  const res = await send(url, { headers: { authorization: `Bearer ${token}` } });
  if (!res.ok) throw await responseError(res);
  return res.blob();
}

/**
 * Searches the caller's messages with `GET /v1/search`, for callers without a WebSocket
 * (what `ChatClient.search` does over the WebSocket). Rejects with a {@link ChatError} carrying the
 * HTTP `status`: 400 `bad_request` for a blank or over-long `q` or a bad `limit`, 403
 * `forbidden` for a room the caller is not in, 404 `not_found` for an unknown room.
 */
export async function searchMessages(
  baseUrl: string,
  token: string,
  q: string,
  options: SearchOptions = {},
): Promise<SearchPage> {
  const params = new URLSearchParams({ q });
  if (options.room !== undefined) params.set('room', options.room);
  if (options.beforeId !== undefined) params.set('before_id', options.beforeId);
  if (options.limit !== undefined) params.set('limit', String(options.limit));
  const res = await send(`${baseUrl}/v1/search?${params}`, { headers: { authorization: `Bearer ${token}` } });
  if (!res.ok) throw await responseError(res);
  const reply = (await res.json()) as SearchAck;
  return { results: reply.results, hasMore: reply.has_more };
}

/**
 * Every member's delivered and read seq in `room`, with `GET /v1/rooms/{id}/receipts`
 * (what `ChatClient.receipts` does over the WebSocket). Rejects with a {@link ChatError}
 * carrying the HTTP `status`: 403 `forbidden` for a room the caller is not in, 404
 * `not_found` for an unknown one.
 */
export async function fetchReceipts(baseUrl: string, token: string, room: string): Promise<Receipt[]> {
  const url = `${baseUrl}/v1/rooms/${encodeURIComponent(room)}/receipts`;
  const res = await send(url, { headers: { authorization: `Bearer ${token}` } });
  if (!res.ok) throw await responseError(res);
  return ((await res.json()) as ReceiptsAck).members;
}

/**
 * A page of the thread of the message at `rootSeq` in `room`, with
 * `GET /v1/rooms/{id}/threads/{root_seq}` (what `ChatClient.thread` does over the
 * WebSocket). Rejects with a {@link ChatError} carrying the HTTP `status`: 404
 * `not_found` when there is no message at `rootSeq`, 403 `forbidden` for a room the
 * caller is not in, 400 `bad_request` for a bad `limit`.
 */
export async function fetchThread(
  baseUrl: string,
  token: string,
  room: string,
  rootSeq: number,
  options: ThreadOptions = {},
): Promise<ThreadPage> {
  const params = new URLSearchParams();
  if (options.afterSeq !== undefined) params.set('after_seq', String(options.afterSeq));
  if (options.limit !== undefined) params.set('limit', String(options.limit));
  const query = params.toString() === '' ? '' : `?${params}`;
  const url = `${baseUrl}/v1/rooms/${encodeURIComponent(room)}/threads/${encodeURIComponent(String(rootSeq))}${query}`;
  const res = await send(url, { headers: { authorization: `Bearer ${token}` } });
  if (!res.ok) throw await responseError(res);
  const reply = (await res.json()) as ThreadAck;
  return { root: reply.root, replies: reply.replies, hasMore: reply.has_more };
}
