import type { ErrorCode } from './types.js';

/**
 * Codes a {@link ChatError} can carry: the server's {@link ErrorCode}s, and the SDK's own:
 * - `timeout`: no reply within `requestTimeoutMs`;
 * - `closed`: the client was closed (`close()`), or used after it was;
 * - `disconnected`: the connection dropped while a command that is not safe to repeat
 *   was in flight (its outcome is unknown), or ended for good with commands pending.
 *
 * Open-ended (`string & {}`) so a code added by a newer server still type-checks.
 */
export type ChatErrorCode = ErrorCode | 'timeout' | 'closed' | 'disconnected' | (string & {});

/** Options of a {@link ChatError} beyond its code and message. */
export interface ChatErrorOptions {
  /** With `rate_limited`: how long to wait before trying again. */
  retryAfterMs?: number;
  /** The HTTP status, for errors of HTTP calls. */
  status?: number;
}

/** Every failure the SDK reports: a refused command, a failed HTTP call, a timeout, a lost connection. */
export class ChatError extends Error {
  /** What went wrong, machine-readable. */
  readonly code: ChatErrorCode;
  /** With `rate_limited`: how long to wait before trying again. */
  readonly retryAfterMs?: number;
  /** The HTTP status, for errors of HTTP calls. */
  readonly status?: number;

  constructor(code: ChatErrorCode, message: string, options: ChatErrorOptions = {}) {
    super(message);
    this.name = 'ChatError';
    this.code = code;
    if (options.retryAfterMs !== undefined) this.retryAfterMs = options.retryAfterMs;
    if (options.status !== undefined) this.status = options.status;
  }

  /** The error an `error` frame (`{code, message, retry_after_ms?}`) stands for. */
  static fromFrame(error: object): ChatError {
    const frame = error as { code?: unknown; message?: unknown; retry_after_ms?: unknown };
    const code = typeof frame.code === 'string' ? frame.code : 'internal';
    const message = typeof frame.message === 'string' ? frame.message : code;
    const retryAfterMs = typeof frame.retry_after_ms === 'number' ? frame.retry_after_ms : undefined;
    return new ChatError(code, message, retryAfterMs === undefined ? {} : { retryAfterMs });
  }
}
