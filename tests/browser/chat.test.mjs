// The chat example in a real browser: the page's own EventSource must carry an answer through
// dropped connections, a reload and a second tab, with every word exactly once.
//
//   cd tests/browser && npm ci && node --test
//
// Needs Debian's Chromium at /usr/bin/chromium (or CHROMIUM=/path) and cargo. Writes
// screenshot.png beside this file.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync, spawn } from "node:child_process";
import { createInterface } from "node:readline";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, "..", "..");
const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const PROMPT = "why is the sky blue";
const WAIT = 20_000;

let server;
let browser;

/** Builds the example (a no-op when it is up to date) and returns its executable. */
function buildChat() {
  const out = execFileSync(
    process.env.CARGO ?? "cargo",
    ["build", "--quiet", "--example", "chat", "--message-format=json-render-diagnostics"],
    { cwd: root, encoding: "utf8", stdio: ["ignore", "pipe", "inherit"], maxBuffer: 64 << 20 },
  );
  for (const line of out.split("\n")) {
    let msg;
    try {
      msg = JSON.parse(line);
    } catch {
      continue;
    }
    if (msg.reason === "compiler-artifact" && msg.target?.name === "chat" && msg.executable) {
      return msg.executable;
    }
  }
  throw new Error("cargo did not name the chat executable");
}

/** Starts the example on a free port; resolves with its address once it listens. */
async function startChat() {
  const child = spawn(buildChat(), ["--listen", "127.0.0.1:0"], {
    stdio: ["ignore", "pipe", "inherit"],
  });
  const base = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("chat did not print its address")), 60_000);
    createInterface({ input: child.stdout }).on("line", (line) => {
      const m = /^listening on (http:\/\/\S+)$/.exec(line);
      if (m) {
        clearTimeout(timer);
        resolve(m[1]);
      }
    });
    child.on("exit", (code) => reject(new Error(`chat exited with ${code}`)));
  });
  return { base, child };
}

before(async () => {
  server = await startChat();
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    headless: true,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--disable-background-networking",
      "--no-first-run",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
});

after(async () => {
  await browser?.close();
  server?.child.kill();
});

async function expectedAnswer(prompt) {
  const res = await fetch(`${server.base}/answer?${new URLSearchParams({ prompt })}`);
  assert.equal(res.status, 200);
  return res.text();
}

async function openPage(context, url) {
  const page = await context.newPage();
  await page.setViewportSize({ width: 900, height: 860 });
  page.errors = [];
  page.on("pageerror", (e) => page.errors.push(e));
  await page.goto(url);
  return page;
}

const state = (page) => page.locator("#state").getAttribute("data-state");
const events = async (page) => Number(await page.locator("#events").textContent());
const answerText = (page) => page.locator("#answer").textContent();

function waitState(page, wanted, timeout = WAIT) {
  return page.waitForFunction(
    (s) => document.getElementById("state").dataset.state === s,
    wanted,
    { timeout, polling: 5 },
  );
}

function waitEvents(page, n) {
  return page.waitForFunction(
    (n) => Number(document.getElementById("events").textContent) >= n,
    n,
    { timeout: WAIT, polling: 10 },
  );
}

async function ask(page, prompt) {
  await page.fill("#prompt", prompt);
  await page.click("#send");
  await waitState(page, "connected");
}

test("drops, a reload and a second tab keep every word exactly once", { timeout: 120_000 }, async () => {
  const expected = await expectedAnswer(PROMPT);
  const total = expected.split(" ").length;
  const context = await browser.newContext();
  const page = await openPage(context, server.base + "/");
  assert.equal(await state(page), "idle");

  await ask(page, PROMPT);
  const url = new URL(page.url());
  assert.ok(url.searchParams.get("session"), "the session id is kept in the address");
  await waitEvents(page, 5);

  for (let drop = 1; drop <= 2; drop++) {
    await page.click("#drop");
    await waitState(page, "reconnecting");
    await waitState(page, "connected");
    const resumedAt = await events(page);
    assert.ok(resumedAt < total, `drop ${drop} happened mid-answer`);
    await waitEvents(page, resumedAt + 3);
  }
  const log = await page.locator("#log").textContent();
  assert.equal(log.match(/reconnected with Last-Event-ID \S+-\d+/g)?.length, 2, log);

  const beforeReload = await events(page);
  assert.notEqual(await state(page), "done");
  assert.ok(beforeReload < total, "the reload happens mid-answer");
  await page.reload();
  await waitEvents(page, beforeReload);
  assert.ok((await page.locator("#log").textContent()).includes("page loaded"));

  const second = await openPage(context, page.url());
  await Promise.all([waitState(page, "done"), waitState(second, "done")]);

  for (const [name, p] of [["first tab", page], ["second tab", second]]) {
    const text = await answerText(p);
    assert.equal(text, expected, `${name} shows the answer`);
    assert.equal(text.split(expected).length - 1, 1, `${name} shows it once`);
    assert.equal(await events(p), total, `${name} got every word once`);
    assert.deepEqual(p.errors, [], `${name} has no script errors`);
  }
  await page.screenshot({ path: path.join(here, "screenshot.png"), fullPage: true });
  await context.close();
});

test("stop generating ends the answer early in every tab", { timeout: 60_000 }, async () => {
  const prompt = "tell me about tides";
  const expected = await expectedAnswer(prompt);
  const context = await browser.newContext();
  const page = await openPage(context, server.base + "/");
  await ask(page, prompt);
  const second = await openPage(context, page.url());
  await waitState(second, "connected");
  await waitEvents(page, 5);

  await page.click("#stop");
  await Promise.all([waitState(page, "stopped"), waitState(second, "stopped")]);
  const text = await answerText(page);
  assert.ok(text.length > 0 && text.length < expected.length, "stopped mid-answer");
  assert.ok(expected.startsWith(text), "what came is a prefix of the answer");
  assert.equal(await answerText(second), text, "both tabs got the same words");
  await context.close();
});
