// The ai_sdk example with the Vercel AI SDK's own chat transport (the `ai` package's
// DefaultChatTransport, as useChat({ resume: true }) uses it; no browser): an answer whose
// connection is dropped mid-way is resumed whole and once by reconnectToStream, which resolves to
// null once the answer has finished; the stop endpoint ends the answer for every viewer. On the
// memory store, and on two instances sharing a Redis server of the test's own.
//
//   cd tests/ai_sdk && npm ci && node --test
//
// Needs cargo (the example is built with --features redis; CARGO_TARGET_DIR is honoured) and
// redis-server on PATH. EXAMPLE_FLAGS adds flags to the example's command line.
//
// Without the layer (EXAMPLE_FLAGS=--bare: the same routes, no ResumableSseLayer) all four tests
// fail: the POST still streams, but nothing keeps its answer, so reconnectToStream resolves to
// null while it is being generated ("a running answer is resumed", "both viewers follow the
// running answer"). Without the layer's replay_finished(false), a reconnect after the finish gets
// the whole answer again instead of null ("a finished answer is not resumed"). Without its
// restart_finished([POST]), the next message of a chat gets no answer: its POST is told the first
// answer completed (a 204, "the next message of a chat gets an answer of its own").

import { test, describe, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync, spawn } from "node:child_process";
import { randomUUID } from "node:crypto";
import { createInterface } from "node:readline";
import net from "node:net";
import path from "node:path";
import { fileURLToPath } from "node:url";
import { DefaultChatTransport, readUIMessageStream } from "ai";

const here = path.dirname(fileURLToPath(import.meta.url));
const root = path.resolve(here, "..", "..");
/** The longest any single wait of the test may take. */
const WAIT = 20_000;
const EXTRA_FLAGS = (process.env.EXAMPLE_FLAGS ?? "").split(/\s+/).filter(Boolean);

let executable;
const children = [];

/** Rejects with `what` when `promise` has not settled within `ms`. */
function within(promise, what, ms = WAIT) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: not within ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

/** Polls `cond` until it holds; throws naming `what` after `ms`. */
async function until(cond, what, ms = WAIT) {
  const deadline = Date.now() + ms;
  while (!(await cond())) {
    if (Date.now() > deadline) throw new Error(`${what}: not within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** Builds the example (a no-op when it is up to date) and returns its executable. */
function buildExample() {
  const out = execFileSync(
    process.env.CARGO ?? "cargo",
    [
      "build",
      "--quiet",
      "--example",
      "ai_sdk",
      "--features",
      "redis",
      "--message-format=json-render-diagnostics",
    ],
    {
      cwd: root,
      encoding: "utf8",
      stdio: ["ignore", "pipe", "inherit"],
      maxBuffer: 64 << 20,
      timeout: 30 * 60_000,
    },
  );
  for (const line of out.split("\n")) {
    let msg;
    try {
      msg = JSON.parse(line);
    } catch {
      continue;
    }
    if (msg.reason === "compiler-artifact" && msg.target?.name === "ai_sdk" && msg.executable) {
      return msg.executable;
    }
  }
  throw new Error("cargo did not name the ai_sdk executable");
}

/** Starts the example on a free port; resolves with its address once it listens. */
async function startExample(args = []) {
  const child = spawn(executable, ["--listen", "127.0.0.1:0", ...args, ...EXTRA_FLAGS], {
    stdio: ["ignore", "pipe", "inherit"],
  });
  children.push(child);
  const listening = new Promise((resolve, reject) => {
    createInterface({ input: child.stdout }).on("line", (line) => {
      const m = /^listening on (http:\/\/\S+)$/.exec(line);
      if (m) resolve(m[1]);
    });
    child.on("exit", (code) => reject(new Error(`ai_sdk exited with ${code}`)));
  });
  return within(listening, "ai_sdk printed its address", 60_000);
}

/** A TCP port nobody listens on. */
function freePort() {
  return new Promise((resolve, reject) => {
    const server = net.createServer();
    server.on("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolve(port));
    });
  });
}

/** Whether a Redis server answers PING on `port`. */
function pings(port) {
  return new Promise((resolve) => {
    const socket = net.connect(port, "127.0.0.1");
    socket.setTimeout(500, () => socket.destroy());
    socket.on("connect", () => socket.write("PING\r\n"));
    socket.on("data", (data) => {
      resolve(data.toString().startsWith("+PONG"));
      socket.destroy();
    });
    socket.on("error", () => resolve(false));
    socket.on("close", () => resolve(false));
  });
}

/** Starts a Redis server of the test's own, without persistence; resolves with its URL. */
async function startRedis() {
  const port = await freePort();
  const child = spawn(
    "redis-server",
    ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
    { stdio: ["ignore", "ignore", "inherit"] },
  );
  children.push(child);
  await until(async () => {
    if (child.exitCode !== null) throw new Error(`redis-server exited with ${child.exitCode}`);
    return pings(port);
  }, "redis-server answered PING");
  return `redis://127.0.0.1:${port}`;
}

/** The transport as an application configures it: the POST names its chat in `?id=`. */
function transport(base) {
  return new DefaultChatTransport({
    api: `${base}/api/chat`,
    prepareSendMessagesRequest: ({ api, id }) => ({ api: `${api}?id=${encodeURIComponent(id)}` }),
  });
}

/** Sends `text` as a new user message of chat `chatId`; resolves with the answer's chunks. */
function send(base, chatId, text, abortSignal) {
  const messages = [{ id: randomUUID(), role: "user", parts: [{ type: "text", text }] }];
  return within(
    transport(base).sendMessages({
      trigger: "submit-message",
      chatId,
      messageId: undefined,
      messages,
      abortSignal,
    }),
    "the POST answered",
  );
}

/** What reconnectToStream resolves to: a stream of the answer's chunks, or null. */
function reconnect(base, chatId) {
  return within(transport(base).reconnectToStream({ chatId }), "reconnectToStream resolved");
}

/** The answer to `words:n`. */
function words(n) {
  return Array.from({ length: n }, (_, i) => `w${i}`).join(" ");
}

/** Reads chunks until `n` text deltas have come; returns the chunks read. */
async function readDeltas(reader, n) {
  const chunks = [];
  const read = async () => {
    while (chunks.filter((c) => c.type === "text-delta").length < n) {
      const { value, done } = await reader.read();
      if (done) throw new Error(`the answer ended after ${chunks.length} chunks`);
      chunks.push(value);
    }
  };
  await within(read(), `${n} text deltas came`);
  return chunks;
}

/** Every chunk of `stream`, to its end. */
async function allChunks(stream) {
  const chunks = [];
  const read = async () => {
    for await (const chunk of stream) chunks.push(chunk);
  };
  await within(read(), "the answer ended");
  return chunks;
}

/** The assistant message the SDK assembles from `stream`, read to its end; `onText` sees each
 * version of its text. */
async function assemble(stream, onText = () => {}) {
  let message;
  const read = async () => {
    for await (const m of readUIMessageStream({ stream, terminateOnError: true })) {
      message = m;
      onText(text(m));
    }
  };
  await within(read(), "the SDK assembled the message");
  assert.ok(message, "the stream held a message");
  return message;
}

function text(message) {
  return message.parts
    .filter((p) => p.type === "text")
    .map((p) => p.text)
    .join("");
}

/** `GET /api/chat/{id}/stream` as it is: status and reason header. */
async function streamAnswer(base, chatId) {
  const res = await within(fetch(`${base}/api/chat/${chatId}/stream`), "GET answered");
  await res.body?.cancel();
  return { status: res.status, reason: res.headers.get("resumable-sse-reason") };
}

async function resumeAfterADrop(sendTo, resumeOn) {
  const chatId = randomUUID();
  const n = 200;
  const aborter = new AbortController();
  const first = await send(sendTo, chatId, `words:${n} interval_ms:20`, aborter.signal);
  const reader = first.getReader();
  const before = await readDeltas(reader, 5);
  assert.equal(before[0].type, "start");
  // The page goes away mid-answer.
  aborter.abort();
  await reader.cancel().catch(() => {});

  const resumed = await reconnect(resumeOn, chatId);
  assert.notEqual(resumed, null, "a running answer is resumed");
  const [forChunks, forMessage] = resumed.tee();
  const [chunks, message] = await Promise.all([allChunks(forChunks), assemble(forMessage)]);
  assert.equal(text(message), words(n), "the SDK rebuilt the whole answer, once");
  const count = (type) => chunks.filter((c) => c.type === type).length;
  assert.equal(count("text-delta"), n, "every word once");
  assert.equal(count("start"), 1);
  assert.equal(count("finish"), 1);
  assert.equal(chunks[0].messageId, before[0].messageId, "the answer the POST started");

  // Finished: nothing to resume, on either instance.
  for (const base of new Set([sendTo, resumeOn])) {
    assert.equal(await reconnect(base, chatId), null, "a finished answer is not resumed");
    assert.deepEqual(await streamAnswer(base, chatId), { status: 204, reason: "completed" });
  }
}

async function stopForEveryViewer(sendTo, viewerA, viewerB, stopOn) {
  const chatId = randomUUID();
  const n = 2000;
  const first = await send(sendTo, chatId, `words:${n} interval_ms:20`, undefined);
  const [firstChunks, firstMessage] = first.tee();
  const reader = firstChunks.getReader();
  await readDeltas(reader, 3);
  reader.releaseLock();

  // Two more viewers: another tab, another device.
  const viewers = [await reconnect(viewerA, chatId), await reconnect(viewerB, chatId)];
  assert.ok(viewers.every((v) => v !== null), "both viewers follow the running answer");
  const seen = [false, false, false];
  const texts = Promise.all(
    [firstMessage, ...viewers].map((s, i) =>
      assemble(s, (t) => {
        seen[i] ||= t.length > 0;
      }),
    ),
  );
  const drained = allChunks(firstChunks);
  await until(() => seen.every(Boolean), "every viewer has some of the answer");

  const stop = await within(
    fetch(`${stopOn}/api/chat/${chatId}/stream`, { method: "DELETE" }),
    "the stop endpoint answered",
  );
  assert.equal(stop.status, 204, "the stop endpoint stopped the answer");
  const messages = await texts;
  await drained;
  const [shown, ...others] = messages.map(text);
  assert.ok(shown.length > 0 && shown.length < words(n).length, "stopped mid-answer");
  assert.ok(words(n).startsWith(shown), "what came is the start of the answer");
  assert.deepEqual(others, [shown, shown], "every viewer got the same words");

  for (const base of new Set([sendTo, viewerA, viewerB, stopOn])) {
    assert.equal(await reconnect(base, chatId), null, "a stopped answer is not resumed");
    assert.deepEqual(await streamAnswer(base, chatId), { status: 204, reason: "cancelled" });
  }
  const again = await within(
    fetch(`${stopOn}/api/chat/${chatId}/stream`, { method: "DELETE" }),
    "the second stop answered",
  );
  assert.equal(again.status, 404, "nothing left to stop");
}

async function secondTurn(sendTo, resumeOn) {
  const chatId = randomUUID();
  const firstTurn = await send(sendTo, chatId, "words:5 interval_ms:5", undefined);
  assert.equal(text(await assemble(firstTurn)), words(5), "the first answer");
  assert.equal(await reconnect(resumeOn, chatId), null, "the first answer finished");
  // The next message of the same chat: a new answer, generated, not the first one again.
  const aborter = new AbortController();
  const nextTurn = await send(sendTo, chatId, "words:80 interval_ms:20", aborter.signal);
  const reader = nextTurn.getReader();
  await readDeltas(reader, 3);
  aborter.abort();
  await reader.cancel().catch(() => {});
  const resumed = await reconnect(resumeOn, chatId);
  assert.notEqual(resumed, null, "the second answer is resumed while it runs");
  assert.equal(text(await assemble(resumed)), words(80), "the second answer, whole, once");
  assert.equal(await reconnect(resumeOn, chatId), null, "the second answer finished");
}

before(() => {
  executable = buildExample();
});

after(() => {
  for (const child of children) child.kill();
});

describe("on the memory store", () => {
  let base;
  before(async () => {
    base = await startExample();
  });

  test("a dropped answer is resumed whole, once, then not at all", { timeout: 60_000 }, () =>
    resumeAfterADrop(base, base));

  test("stop ends the answer for every viewer", { timeout: 60_000 }, () =>
    stopForEveryViewer(base, base, base, base));

  test("the next message of a chat gets an answer of its own", { timeout: 60_000 }, () =>
    secondTurn(base, base));
});

describe("on two instances sharing Redis", () => {
  let a;
  let b;
  before(async () => {
    const url = await startRedis();
    [a, b] = await Promise.all([startExample(["--redis", url]), startExample(["--redis", url])]);
  });

  test("a dropped answer is resumed whole, once, on the other instance", { timeout: 60_000 }, () =>
    resumeAfterADrop(a, b));

  test("stop on one instance ends the answer for viewers on both", { timeout: 60_000 }, () =>
    stopForEveryViewer(a, a, b, b));

  test("the next message of a chat gets an answer of its own, on either instance", { timeout: 60_000 }, () =>
    secondTurn(a, b));
});
