/**
 * Wire types of the chat protocol (contract v1), exactly as they travel: field names
 * stay snake_case. Ids are strings; timestamps are RFC 3339 UTC strings with
 * milliseconds (`"2026-11-22T01:02:03.456Z"`).
 *
 * This module has no runtime code: its compiled `types.js` is an empty module, kept so
 * the five SDK files can be served side by side.
 */
export {};
