// End-to-end test of the browser client: two people in two browsers on two gateways.
//
// Run by `cargo test -p chat-tests --test browser`, which starts a cluster (dev tokens on)
// and passes GATEWAY_A, GATEWAY_B (http://host:port) and ARTIFACTS (a directory for
// screenshots). To restart a gateway this script prints `RESTART <index>` and waits for
// the line `restarted` on stdin. Exit status 0 means every check passed.
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { chromium } from 'playwright-core';

const A = required('GATEWAY_A');
const B = required('GATEWAY_B');
const ARTIFACTS = required('ARTIFACTS');
const CHROMIUM = process.env.CHROMIUM ?? '/usr/bin/chromium';
/** Every wait is bounded by this. */
const WAIT_MS = 30_000;
// Without the networking flags Chromium stalls reaching Google's hosts on a closed network.
const FLAGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
  '--disable-component-update', '--disable-sync'];

function required(name) {
  const value = process.env[name];
  if (!value) throw new Error(`${name} is not set (run through \`cargo test -p chat-tests --test browser\`)`);
  return value;
}

const log = (...args) => console.error('[e2e]', ...args);

// The test harness answers each `RESTART n` with one `restarted` line.
const harness = createInterface({ input: process.stdin });
const replies = harness[Symbol.asyncIterator]();
async function restartGateway(index) {
  console.log(`RESTART ${index}`);
  const { value, done } = await replies.next();
  assert.ok(!done && value === 'restarted', `harness answered ${JSON.stringify(value)}`);
}

/** A person in a browser of their own: headless Chromium with a fresh, empty profile. */
async function person(name, gateway) {
  const profile = mkdtempSync(join(tmpdir(), `chat-e2e-${name}-`));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM, headless: true, args: FLAGS, viewport: { width: 1100, height: 720 },
  });
  const page = context.pages()[0] ?? await context.newPage();
  page.setDefaultTimeout(WAIT_MS);
  page.on('console', (m) => { if (m.type() === 'error') log(`${name} console:`, m.text()); });
  page.on('pageerror', (e) => log(`${name} page error:`, e.message));
  await page.goto(gateway);
  return { name, page, context, profile };
}

async function signIn({ page }, user) {
  await page.fill('#signin-user', user);
  await page.click('#signin-button');
  await page.waitForSelector('#conn-state[data-state="open"]');
  assert.equal(await page.textContent('#me'), user);
}

const shot = (who, file) => who.page.screenshot({ path: join(ARTIFACTS, file) });
const messageText = (who, text) => who.page.locator('#messages li .text', { hasText: text });
const ticks = (who, seq) => who.page.locator(`#messages li[data-seq="${seq}"] .ticks`);

/**
 * Records, in the page, every state the ticks of each of the user's messages pass
 * through (seq → ['sent', 'delivered', …]), so no step can be missed between two looks.
 */
async function recordTicks({ page }) {
  await page.evaluate(() => {
    window.__ticks = {};
    const look = () => {
      for (const span of document.querySelectorAll('#messages .ticks')) {
        const seq = span.closest('li').dataset.seq;
        const seen = (window.__ticks[seq] ??= []);
        if (seen.at(-1) !== span.dataset.ticks) seen.push(span.dataset.ticks);
      }
    };
    new MutationObserver(look).observe(document.getElementById('messages'),
      { subtree: true, childList: true, attributes: true, attributeFilter: ['data-ticks'] });
  });
}
const ticksSeen = ({ page }, seq) => page.evaluate((s) => window.__ticks[s] ?? [], String(seq));
const tickColour = (who, seq) => ticks(who, seq).evaluate((el) => getComputedStyle(el).color);

async function main() {
  mkdirSync(ARTIFACTS, { recursive: true });
  const run = Math.random().toString(36).slice(2, 8);
  const aliceId = `alice-${run}`;
  const bobId = `bob-${run}`;
  const roomName = `e2e ${run}`;

  const alice = await person('alice', A);
  const bob = await person('bob', B);
  try {
    await signIn(alice, aliceId);
    await signIn(bob, bobId);
    await shot(bob, '01-signed-in.png');

    // Alice creates a room with Bob; it appears in Bob's list without a reload.
    await alice.page.fill('#new-room-name', roomName);
    await alice.page.fill('#new-room-members', bobId);
    await alice.page.click('#new-room-create');
    await alice.page.waitForFunction((n) => document.getElementById('room-title').textContent === n, roomName);
    const bobsRoom = bob.page.locator('#rooms li', { hasText: roomName });
    await bobsRoom.waitFor();

    // A message from Alice on gateway A reaches Bob on gateway B, unread first. Her
    // ticks go ✓ (stored), then ✓✓ (Bob's browser has it, though he has not opened the
    // room), then coloured ✓✓ once he reads it.
    await recordTicks(alice);
    await alice.page.fill('#composer', 'hello bob');
    await alice.page.click('#send');
    await bobsRoom.locator('.badge', { hasText: '1' }).waitFor();
    await shot(bob, '02-unread-badge.png');
    await alice.page.locator('#messages li[data-seq="1"] .ticks[data-ticks="delivered"]').waitFor();
    assert.equal(await ticks(alice, 1).textContent(), '✓✓');
    const deliveredColour = await tickColour(alice, 1);
    await shot(alice, '02-delivered-ticks.png');
    await bobsRoom.click();
    await messageText(bob, 'hello bob').waitFor();
    await bob.page.waitForSelector(`#members li[data-user="${aliceId}"] .dot.online`);
    await alice.page.locator('#messages li[data-seq="1"] .ticks[data-ticks="read"]').waitFor();
    assert.equal(await ticks(alice, 1).textContent(), '✓✓');
    assert.notEqual(await tickColour(alice, 1), deliveredColour, 'read ticks are coloured');
    assert.deepEqual(await ticksSeen(alice, 1), ['sent', 'delivered', 'read'], 'the ticks of the first message');
    assert.equal(await bob.page.locator('#messages .ticks').count(), 0, "no ticks on other people's messages");
    await shot(alice, '02-read-ticks.png');
    log('message sent and received; ticks ✓, ✓✓, read ✓✓');

    // Bob types; Alice sees it.
    await bob.page.type('#composer', 'typing something', { delay: 20 });
    await alice.page.waitForFunction((b) => document.getElementById('typing').textContent === `${b} is typing…`, bobId);
    await shot(alice, '03-typing.png');
    await bob.page.fill('#composer', '');
    await alice.page.waitForFunction(() => document.getElementById('typing').textContent === '');
    log('typing indicator shown and cleared');

    // Bob's gateway restarts. A message sent while he is away arrives after he is back,
    // recovered with since_seq, and nothing he had is duplicated.
    const bobDown = bob.page.waitForFunction(() => document.getElementById('conn-state').dataset.state !== 'open');
    const restarted = restartGateway(1);
    await bobDown;
    await shot(bob, '04-reconnecting.png');
    await alice.page.fill('#composer', 'sent while you were away');
    await alice.page.click('#send');
    await messageText(alice, 'sent while you were away').waitFor();
    // Stored, but Bob's browser cannot have it: one tick.
    assert.equal(await ticks(alice, 2).getAttribute('data-ticks'), 'sent');
    assert.equal(await ticks(alice, 2).textContent(), '✓');
    await shot(alice, '04-sent-tick.png');
    await restarted;
    await bob.page.waitForSelector('#conn-state[data-state="open"]');
    await messageText(bob, 'sent while you were away').waitFor();
    // Recovered into the room Bob has open: received and read, so Alice's ticks colour.
    await alice.page.locator('#messages li[data-seq="2"] .ticks[data-ticks="read"]').waitFor();
    const away = await ticksSeen(alice, 2);
    assert.equal(away[0], 'sent', `ticks of the message sent while Bob was away: ${away}`);
    assert.equal(await messageText(bob, 'hello bob').count(), 1, 'a message was duplicated after the reconnect');
    const seqs = await bob.page.$$eval('#messages li', (items) => items.map((li) => Number(li.dataset.seq)));
    assert.deepEqual(seqs, [1, 2], 'Bob should hold seqs 1 and 2 exactly');
    await shot(bob, '05-recovered.png');
    log('gateway restart recovered');

    // Markup in a message is shown as text, never run or rendered.
    const payload = '<img src=x onerror="window.__xss=1">';
    await alice.page.fill('#composer', payload);
    await alice.page.click('#send');
    const shown = messageText(bob, 'onerror');
    await shown.waitFor();
    assert.equal(await shown.textContent(), payload);
    assert.equal(await bob.page.locator('#messages img').count(), 0, 'the payload became an element');
    for (const who of [alice, bob]) {
      assert.equal(await who.page.evaluate(() => window.__xss), undefined, `the payload ran for ${who.name}`);
    }
    await shot(bob, '06-markup-as-text.png');
    log('markup rendered as text');

    // Edit, react, delete: each shows up on the other side.
    const hello = (who) => who.page.locator('#messages li[data-seq="1"]');
    await hello(alice).hover();
    await hello(alice).locator('button.edit').click();
    await alice.page.fill('#messages li[data-seq="1"] .edit-input', 'hello bob (edited)');
    await alice.page.press('#messages li[data-seq="1"] .edit-input', 'Enter');
    await hello(bob).locator('.edited').waitFor();
    assert.equal(await hello(bob).locator('.text').textContent(), 'hello bob (edited)');
    await hello(bob).hover();
    await hello(bob).locator('button[title="React 👍"]').click();
    await hello(alice).locator('.reaction', { hasText: '👍 1' }).waitFor();
    const markup = (who) => who.page.locator('#messages li[data-seq="3"]');
    await markup(alice).hover();
    await markup(alice).locator('button.delete').click(); // asks
    await markup(alice).locator('button.delete', { hasText: 'Confirm delete' }).click();
    await bob.page.waitForSelector('#messages li.deleted[data-seq="3"]');
    log('edit, reaction and delete seen by the other side');

    // An image attachment: uploaded by Alice, previewed for Bob (fetched with his token).
    await alice.page.setInputFiles('#attach', join(ARTIFACTS, '01-signed-in.png'));
    const preview = bob.page.locator('#messages li[data-seq="4"] .attachment img');
    await preview.waitFor();
    await bob.page.waitForFunction(() => {
      const img = document.querySelector('#messages li[data-seq="4"] .attachment img');
      return img && img.complete && img.naturalWidth > 0;
    });
    await shot(bob, '07-attachment.png');
    log('image attachment previewed');

    // Scroll-back: 55 more messages (over HTTP, as any client may send them), then Bob
    // reloads; his tab signs in again, the room shows the newest page, and older
    // messages load on demand.
    const roomId = await bob.page.locator('#rooms li', { hasText: roomName }).getAttribute('data-room');
    await alice.page.evaluate(async (room) => {
      const token = sessionStorage.getItem('chat.token');
      for (let i = 1; i <= 55; i++) {
        const res = await fetch(`/v1/rooms/${room}/messages`, {
          method: 'POST', headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
          body: JSON.stringify({ text: `bulk ${i}` }),
        });
        if (res.status !== 201) throw new Error(`send ${i}: ${res.status}`);
      }
    }, roomId);
    await messageText(bob, 'bulk 55').waitFor();
    await bob.page.reload();
    await bob.page.waitForSelector('#conn-state[data-state="open"]');
    await bob.page.locator('#rooms li', { hasText: roomName }).click();
    await messageText(bob, 'bulk 55').waitFor();
    assert.equal(await bob.page.locator('#messages li').count(), 50, 'the newest page is 50 messages');
    await bob.page.click('#older');
    await messageText(bob, 'hello bob (edited)').waitFor();
    assert.equal(await bob.page.locator('#messages li').count(), 59);
    assert.ok(await bob.page.locator('#older').isHidden(), 'nothing older is left to load');
    await shot(bob, '08-scrolled-back.png');
    log('history scroll-back');

    // Threads: Bob replies to Alice's first message in the side panel; Alice sees
    // "1 reply" under it, opens the thread and answers there; Bob's open panel shows it.
    const root = (who) => who.page.locator('#messages li[data-seq="1"]');
    await root(bob).hover();
    await root(bob).locator('button.reply').click();
    await bob.page.locator('#thread-root li[data-seq="1"] .text', { hasText: 'hello bob (edited)' }).waitFor();
    assert.equal(await bob.page.locator('#thread-replies li').count(), 0);
    await bob.page.fill('#thread-composer', 'a reply in the thread');
    await bob.page.click('#thread-send');
    await bob.page.locator('#thread-replies li .text', { hasText: 'a reply in the thread' }).waitFor();
    await root(alice).locator('button.replies', { hasText: '1 reply' }).click();
    await alice.page.locator('#thread-replies li .text', { hasText: 'a reply in the thread' }).waitFor();
    assert.equal(await alice.page.textContent('#thread-root li .text'), 'hello bob (edited)');
    assert.equal(await alice.page.textContent('#thread-title'), 'Thread · 1 reply');
    await alice.page.fill('#thread-composer', 'and one from alice');
    await alice.page.press('#thread-composer', 'Enter');
    await bob.page.locator('#thread-replies li .text', { hasText: 'and one from alice' }).waitFor();
    assert.deepEqual(await bob.page.$$eval('#thread-replies li .text', (items) => items.map((el) => el.textContent)),
      ['a reply in the thread', 'and one from alice']);
    await root(bob).locator('button.replies', { hasText: '2 replies' }).waitFor();
    await bob.page.waitForFunction(() => document.getElementById('thread-title').textContent === 'Thread · 2 replies');
    // Alice's reply carries her ticks in the panel as anywhere else.
    await alice.page.locator('#thread-replies li .ticks').first().waitFor();
    await shot(bob, '09-thread.png');
    await alice.page.click('#thread-close');
    assert.ok(await alice.page.locator('#thread').isHidden(), 'the thread panel closes');
    log('thread opened, replied to and updated live');
  } catch (err) {
    await Promise.allSettled([shot(alice, 'failure-alice.png'), shot(bob, 'failure-bob.png')]);
    throw err;
  } finally {
    for (const who of [alice, bob]) {
      await who.context.close().catch(() => {});
      rmSync(who.profile, { recursive: true, force: true });
    }
    harness.close();
  }
}

main().then(
  () => { log('all checks passed'); process.exit(0); },
  (err) => { log('FAILED:', err.stack ?? err); process.exit(1); },
);
