// The gateway serves the SDK to its browser page from services/gateway/web/sdk/: those
// copies must be the JS this package builds, byte for byte.
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';

const FILES = ['index.js', 'client.js', 'types.js', 'errors.js', 'http.js'];
const dist = new URL('../dist/', import.meta.url);
const web = new URL('../../../services/gateway/web/sdk/', import.meta.url);

test('the gateway serves the freshly built SDK', () => {
  for (const file of FILES) {
    const built = readFileSync(new URL(file, dist));
    let served;
    try {
      served = readFileSync(new URL(file, web));
    } catch {
      assert.fail(`services/gateway/web/sdk/${file} is missing: run \`npm run sync-web\` in clients/ts`);
    }
    assert.ok(
      built.equals(served),
      `services/gateway/web/sdk/${file} differs from dist/${file}: run \`npm run sync-web\` in clients/ts`,
    );
  }
});
