// Copies the built SDK modules into the gateway's web directory, from which the gateway
// serves them to its browser page as plain ES modules. `npm run sync-web` builds first;
// test/web-copy.test.mjs fails while the copies are stale.
import { copyFileSync, mkdirSync } from 'node:fs';

const FILES = ['index.js', 'client.js', 'types.js', 'errors.js', 'http.js'];
const dist = new URL('../dist/', import.meta.url);
const web = new URL('../../../services/gateway/web/sdk/', import.meta.url);

mkdirSync(web, { recursive: true });
for (const file of FILES) copyFileSync(new URL(file, dist), new URL(file, web));
console.log(`copied ${FILES.join(', ')} to services/gateway/web/sdk/`);
