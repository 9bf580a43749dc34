import { ChatError } from './errors.js';
/**
 * The WebSocket URL for `url`: a `ws(s)://` URL is kept as given; an `http(s)://` base
 * URL becomes `ws(s)://…/ws` (its path, if any, is kept as a prefix).
 */
export function toWebSocketUrl(url) {
    const u = new URL(url);
    if (u.protocol === 'ws:' || u.protocol === 'wss:')
        return u.toString();
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
export function toHttpBaseUrl(url) {
    const u = new URL(url);
    const websocket = u.protocol === 'ws:' || u.protocol === 'wss:';
    const scheme = u.protocol === 'wss:' || u.protocol === 'https:' ? 'https:' : 'http:';
    let path = u.pathname.replace(/\/+$/, '');
    if (websocket && path.endsWith('/ws'))
        path = path.slice(0, -'/ws'.length);
    return `${scheme}//${u.host}${path}`;
}
/** The status → code mapping of the server, for error replies without a JSON body. */
function codeForStatus(status) {
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
async function responseError(res) {
    let code = codeForStatus(res.status);
    let message = `HTTP ${res.status}`;
    try {
        const body = (await res.json());
        if (typeof body.error?.code === 'string')
            code = body.error.code;
        if (typeof body.error?.message === 'string')
            message = body.error.message;
    }
    catch {
        // Not JSON (a proxy's error page, say): the status is all there is.
    }
    const retryAfter = Number(res.headers.get('retry-after'));
    const options = { status: res.status, ...(retryAfter > 0 ? { retryAfterMs: retryAfter * 1000 } : {}) };
    return new ChatError(code, message, options);
}
/** `fetch`, with a network failure turned into a {@link ChatError} `unavailable`. */
async function send(url, init) {
    try {
        return await fetch(url, init);
    }
    catch (err) {
        throw new ChatError('unavailable', `request to ${url} failed: ${err?.message ?? err}`);
    }
}
/**
 * Uploads `body` with `POST /v1/attachments?name=`; resolves with the stored attachment,
 * whose id can go into a message's `attachments`. Rejects with a {@link ChatError}
 * carrying the HTTP `status` (413 `too_large` past 10 MiB).
 */
export async function uploadAttachment(baseUrl, token, body, options) {
    const url = `${baseUrl}/v1/attachments?name=${encodeURIComponent(options.name)}`;
    const res = await send(url, {
        method: 'POST',
        headers: { authorization: `Bearer ${token}`, 'content-type': options.contentType },
        body: body,
    });
    if (!res.ok)
        throw await responseError(res);
    const reply = (await res.json());
    return reply.attachment;
}
/**
 * Downloads an attachment's bytes with `GET /v1/attachments/{id}` (allowed to its
 * uploader and to members of a room whose message carries it).
 */
export async function fetchAttachment(baseUrl, token, attachment) {
    // Built from the id, never from `attachment.url`: the bearer token must only ever go
    // to the gateway this client talks to.
    const id = typeof attachment === 'string' ? attachment : attachment.id;
    const url = `${baseUrl}/v1/attachments/${encodeURIComponent(id)}`;
    const res = await send(url, { headers: { authorization: `Bearer ${token}` } });
    if (!res.ok)
        throw await responseError(res);
    return res.blob();
}
/**
 * Searches the caller's messages with `GET /v1/search`, for callers without a WebSocket
 * (what `ChatClient.search` does over the WebSocket). Rejects with a {@link ChatError} carrying the
 * HTTP `status`: 400 `bad_request` for a blank or over-long `q` or a bad `limit`, 403
 * `forbidden` for a room the caller is not in, 404 `not_found` for an unknown room.
 */
export async function searchMessages(baseUrl, token, q, options = {}) {
    const params = new URLSearchParams({ q });
    if (options.room !== undefined)
        params.set('room', options.room);
    if (options.beforeId !== undefined)
        params.set('before_id', options.beforeId);
    if (options.limit !== undefined)
        params.set('limit', String(options.limit));
    const res = await send(`${baseUrl}/v1/search?${params}`, { headers: { authorization: `Bearer ${token}` } });
    if (!res.ok)
        throw await responseError(res);
    const reply = (await res.json());
    return { results: reply.results, hasMore: reply.has_more };
}
/**
 * Every member's delivered and read seq in `room`, with `GET /v1/rooms/{id}/receipts`
 * (what `ChatClient.receipts` does over the WebSocket). Rejects with a {@link ChatError}
 * carrying the HTTP `status`: 403 `forbidden` for a room the caller is not in, 404
 * `not_found` for an unknown one.
 */
export async function fetchReceipts(baseUrl, token, room) {
    const url = `${baseUrl}/v1/rooms/${encodeURIComponent(room)}/receipts`;
    const res = await send(url, { headers: { authorization: `Bearer ${token}` } });
    if (!res.ok)
        throw await responseError(res);
    return (await res.json()).members;
}
/**
 * A page of the thread of the message at `rootSeq` in `room`, with
 * `GET /v1/rooms/{id}/threads/{root_seq}` (what `ChatClient.thread` does over the
 * WebSocket). Rejects with a {@link ChatError} carrying the HTTP `status`: 404
 * `not_found` when there is no message at `rootSeq`, 403 `forbidden` for a room the
 * caller is not in, 400 `bad_request` for a bad `limit`.
 */
export async function fetchThread(baseUrl, token, room, rootSeq, options = {}) {
    const params = new URLSearchParams();
    if (options.afterSeq !== undefined)
        params.set('after_seq', String(options.afterSeq));
    if (options.limit !== undefined)
        params.set('limit', String(options.limit));
    const query = params.toString() === '' ? '' : `?${params}`;
    const url = `${baseUrl}/v1/rooms/${encodeURIComponent(room)}/threads/${encodeURIComponent(String(rootSeq))}${query}`;
    const res = await send(url, { headers: { authorization: `Bearer ${token}` } });
    if (!res.ok)
        throw await responseError(res);
    const reply = (await res.json());
    return { root: reply.root, replies: reply.replies, hasMore: reply.has_more };
}
