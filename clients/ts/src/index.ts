/**
 * `@chat/client`: the TypeScript SDK of the chat backend. Plain ES modules with no
 * dependencies: they run unbundled in browsers and in node (with the `ws` package).
 */
export { ChatClient } from './client.js';
export type {
  ChatClientOptions,
  ChatEvents,
  ConnectionState,
  RecoveredEvent,
  ReconnectOptions,
  StateChangeEvent,
} from './client.js';
export { ChatError } from './errors.js';
export type { ChatErrorCode, ChatErrorOptions } from './errors.js';
export {
  fetchAttachment,
  fetchReceipts,
  fetchThread,
  searchMessages,
  toHttpBaseUrl,
  toWebSocketUrl,
  uploadAttachment,
} from './http.js';
export type { SearchOptions, SearchPage, ThreadOptions, ThreadPage, UploadBody, UploadOptions } from './http.js';
export type * from './types.js';
