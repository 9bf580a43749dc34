/** Every failure the SDK reports: a refused command, a failed HTTP call, a timeout, a lost connection. */
export class ChatError extends Error {
    constructor(code, message, options = {}) {
        super(message);
        this.name = 'ChatError';
        this.code = code;
        if (options.retryAfterMs !== undefined)
            this.retryAfterMs = options.retryAfterMs;
        if (options.status !== undefined)
            this.status = options.status;
    }
    /** The error an `error` frame (`{code, message, retry_after_ms?}`) stands for. */
    static fromFrame(error) {
        const frame = error;
        const code = typeof frame.code === 'string' ? frame.code : 'internal';
        const message = typeof frame.message === 'string' ? frame.message : code;
        const retryAfterMs = typeof frame.retry_after_ms === 'number' ? frame.retry_after_ms : undefined;
        return new ChatError(code, message, retryAfterMs === undefined ? {} : { retryAfterMs });
    }
}
