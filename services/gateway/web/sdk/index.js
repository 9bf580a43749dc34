/**
 * `@chat/client`: the TypeScript SDK of the chat backend. Plain ES modules with no
 * dependencies: they run unbundled in browsers and in node (with the `ws` package).
 */
export { ChatClient } from './client.js';
export { ChatError } from './errors.js';
export { fetchAttachment, fetchReceipts, fetchThread, searchMessages, toHttpBaseUrl, toWebSocketUrl, uploadAttachment, } from './http.js';
