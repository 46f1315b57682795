//! A chat backend for the Vercel AI SDK's `useChat({ resume: true })`: answers survive a reload,
//! a dropped connection and a second tab, and "stop" stops them everywhere.
//!
//! ```text
//! cargo run --example ai_sdk                          # http://127.0.0.1:3000
//! cargo run --example ai_sdk --features redis -- --redis redis://127.0.0.1:6379
//! # a second instance sharing its sessions: the same with --listen 127.0.0.1:3001
//! ```
//!
//! The handler streams a fake model's answer in the AI SDK's UI message stream protocol (SSE with
//! `x-vercel-ai-ui-message-stream: v1`: `start`, `start-step`, `text-start`, one `text-delta` per
//! word, `text-end`, `finish-step`, `finish`, then `[DONE]`) and knows nothing of reconnects.
//! [`ResumableSseLayer`] keeps the answer going when the client goes away and serves it again to
//! the SDK's `reconnectToStream`, on any instance sharing the store.
//!
//! # Routes
//!
//! | route | answer |
//! |---|---|
//! | `POST /api/chat?id=ID` | the answer to the last user message of the JSON body (`{"id": ID, "messages": [..]}`, as `DefaultChatTransport` sends it), streamed; the generation goes on when the client goes away |
//! | `GET /api/chat/{id}/stream` | the chat's answer from its start while it is generated (then live); `204` when none is (never was, or it finished: the client has it already, with the reason header naming how it ended) |
//! | `DELETE /api/chat/{id}/stream` | stops the chat's generation ([`Sessions::cancel`]), from any instance: every client's stream ends; `204`, or `404` when nothing was running |
//!
//! The session key is the chat id, so that the `POST` and the reconnects name the same session:
//! the layer reads it from the stream's path (`FromPath::segment(2)`) or, on the `POST`, from
//! `?id=` ([`FromQuery`]), as it cannot read the JSON body. [`KeyScope::Shared`] makes both one
//! key space, and [`ResumableSseLayer::methods`] adds `POST` to what the layer resumes. The
//! client sends the id with the transport's `prepareSendMessagesRequest`:
//!
//! ```js
//! import { useChat } from "@ai-sdk/react";
//! import { DefaultChatTransport } from "ai";
//!
//! const chat = useChat({
//!   id: chatId, // unguessable: crypto.randomUUID()
//!   resume: true, // on load: GET /api/chat/{id}/stream
//!   transport: new DefaultChatTransport({
//!     api: "/api/chat",
//!     prepareSendMessagesRequest: ({ api, id }) => ({
//!       api: `${api}?id=${encodeURIComponent(id)}`,
//!     }),
//!   }),
//! });
//! // Stop generating, in every tab and on every device:
//! await fetch(`/api/chat/${chatId}/stream`, { method: "DELETE" });
//! ```
//!
//! [`ResumableSseLayer::replay_finished`]`(false)` makes the reconnect of a chat whose answer has
//! finished a `204`, which the SDK takes for "nothing to resume"; a running answer is sent from its
//! start, and the SDK rebuilds the message from it.
//! [`ResumableSseLayer::restart_finished`]`([Method::POST])` gives a chat several turns: the
//! `POST` of the next message replaces the finished answer of the chat with a new one, under the
//! same id, while a `POST` that comes while an answer runs joins it.
//!
//! # The fake model
//!
//! A prompt that contains `words:N` is answered `w0 w1 .. w(N-1)` (at most 100,000 words), one
//! text delta per word, `interval_ms:M` milliseconds apart (default 20, at most 60,000); any
//! other prompt gets a made-up sentence about it.
//!
//! # Options
//!
//! - `--listen ADDR`: where to listen (default `127.0.0.1:3000`; port 0 picks a free port). Once
//!   the server accepts connections it prints `listening on http://ADDR` on stdout.
//! - `--redis URL`: keep sessions in Redis (build with `--features redis`), so that several
//!   instances share them: a reconnect or a stop may reach any of them.
//! - `--bare`: the same routes without the layer, to see what the layer does: an answer is lost
//!   with its connection, and reconnects find nothing.
//!
//! Log lines go to stderr (`RUST_LOG` sets the level, `warn` by default). The test with the AI
//! SDK's own transport is `tests/ai_sdk/` (`cd tests/ai_sdk && npm ci && node --test`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::io::Write;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Query, Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures_util::stream::{self, Stream, StreamExt};
use resumable_sse::store::Store;
use resumable_sse::{
    BoxError, ExtractSessionKey, FromPath, FromQuery, KeyScope, Or, ResumableSseLayer, Sessions,
};
use serde_json::{json, Value};

const USAGE: &str = "usage: ai_sdk [--listen ADDR] [--redis URL]";
/// The pause between two words, unless the prompt says `interval_ms:M`.
const WORD_INTERVAL: Duration = Duration::from_millis(20);
const MAX_WORDS: usize = 100_000;
const MAX_INTERVAL_MS: u64 = 60_000;

/// The chat id: the `{id}` of `/api/chat/{id}/stream`, or `?id=` on `POST /api/chat`.
type ChatId = Or<FromPath, FromQuery>;

struct Options {
    listen: String,
    redis: Option<String>,
    bare: bool,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Options, String> {
    let mut opts = Options {
        listen: "127.0.0.1:3000".to_owned(),
        redis: None,
        bare: false,
    };
    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((flag, value)) => (flag.to_owned(), Some(value.to_owned())),
            None => (arg, None),
        };
        let mut value = || {
            inline
                .clone()
                .or_else(|| args.next())
                .ok_or_else(|| format!("{flag} needs a value"))
        };
        match flag.as_str() {
            "--listen" => opts.listen = value()?,
            "--redis" => opts.redis = Some(value()?),
            "--bare" => opts.bare = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(opts)
}

#[tokio::main]
async fn main() {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let opts = parse_args(std::env::args().skip(1)).unwrap_or_else(|e| {
        eprintln!("error: {e}\n{USAGE}");
        std::process::exit(2);
    });
    let result = match opts.redis.clone() {
        #[cfg(feature = "redis")]
        Some(url) => match resumable_sse::RedisStore::builder(url).connect().await {
            Ok(store) => serve(store, &opts).await,
            Err(e) => Err(format!("cannot connect to Redis: {e}").into()),
        },
        #[cfg(not(feature = "redis"))]
        Some(_) => Err("this build has no Redis support; rebuild with --features redis".into()),
        None => serve(resumable_sse::MemoryStore::new(), &opts).await,
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// Serves the app on `store` until the process is stopped; prints `listening on http://ADDR`
/// once it accepts connections.
async fn serve<S: Store>(store: S, opts: &Options) -> Result<(), BoxError> {
    let listener = tokio::net::TcpListener::bind(&opts.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", opts.listen))?;
    let addr = listener.local_addr()?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "listening on http://{addr}")?;
    stdout.flush()?;
    drop(stdout);
    axum::serve(listener, app(store, opts.bare)).await?;
    Ok(())
}

fn app<S: Store>(store: S, bare: bool) -> Router {
    let layer = ResumableSseLayer::new(store)
        // The `POST` starts the answer: it is resumable too.
        .methods([Method::GET, Method::HEAD, Method::POST])
        .session_key(FromPath::segment(2).or(FromQuery::new("id")))
        // `POST /api/chat?id=X` and `GET /api/chat/X/stream` name one session.
        .key_scope(KeyScope::Shared)
        // A reconnect after the answer finished is told there is nothing to resume...
        .replay_finished(false)
        // ...and the next message of the chat starts a new answer over it.
        .restart_finished([Method::POST]);
    let routes = Router::new()
        .route("/api/chat", post(chat))
        // `DELETE` is not a method the layer resumes: it reaches `stop`.
        .route("/api/chat/{id}/stream", get(no_stream).delete(stop::<S>))
        .with_state(layer.sessions());
    // Only the chat routes are behind the layer: its keys are theirs.
    if bare {
        routes
    } else {
        routes.layer(layer)
    }
}

fn bad_request(message: &str) -> Response {
    (StatusCode::BAD_REQUEST, message.to_owned()).into_response()
}

/// `POST /api/chat?id=ID`: a plain streaming handler, unaware of sessions and reconnects.
async fn chat(Query(q): Query<HashMap<String, String>>, body: Bytes) -> Response {
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return bad_request("the body must be JSON");
    };
    // The layer keyed the session by `?id=`: it must be the chat the body names.
    if let Some(id) = q.get("id") {
        if body["id"].as_str() != Some(id.as_str()) {
            return bad_request("?id= is not the body's chat id");
        }
    }
    let prompt = last_user_text(&body);
    let (words, interval) = match answer(&prompt) {
        Ok(answer) => answer,
        Err(message) => return bad_request(&message),
    };
    let mut res = Sse::new(ui_message_stream(words, interval)).into_response();
    let headers = res.headers_mut();
    headers.insert(
        HeaderName::from_static("x-vercel-ai-ui-message-stream"),
        HeaderValue::from_static("v1"),
    );
    headers.insert(
        HeaderName::from_static("x-accel-buffering"),
        HeaderValue::from_static("no"),
    );
    res
}

/// The text of the last user message of a `DefaultChatTransport` body (its `text` parts).
fn last_user_text(body: &Value) -> String {
    let message = body["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"));
    let Some(parts) = message.and_then(|m| m["parts"].as_array()) else {
        return String::new();
    };
    parts
        .iter()
        .filter(|p| p["type"] == "text")
        .filter_map(|p| p["text"].as_str())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The fake model: the words of its answer to `prompt`, and the pause between them.
fn answer(prompt: &str) -> Result<(Vec<String>, Duration), String> {
    let setting = |name: &str| {
        prompt
            .split_whitespace()
            .find_map(|w| w.strip_prefix(name)?.strip_prefix(':'))
    };
    let interval = match setting("interval_ms") {
        None => WORD_INTERVAL,
        Some(ms) => match ms.parse::<u64>() {
            Ok(ms) if ms <= MAX_INTERVAL_MS => Duration::from_millis(ms),
            _ => {
                return Err(format!(
                    "interval_ms must be a number up to {MAX_INTERVAL_MS}"
                ))
            }
        },
    };
    let words =
        match setting("words") {
            Some(n) => match n.parse::<usize>() {
                Ok(n) if n <= MAX_WORDS => (0..n).map(|i| format!("w{i}")).collect(),
                _ => return Err(format!("words must be a number up to {MAX_WORDS}")),
            },
            None => {
                format!(
            "You said \u{201c}{}\u{201d}. This made-up answer comes one word at a time, as a \
             model streams its tokens: reload the page and it goes on where it is.",
            prompt.split_whitespace().take(12).collect::<Vec<_>>().join(" ")
        )
                .split(' ')
                .map(str::to_owned)
                .collect()
            }
        };
    Ok((words, interval))
}

/// One UI message stream part as an SSE event: `data: {json}`.
fn part(value: Value) -> Event {
    Event::default().data(value.to_string())
}

/// The answer in the UI message stream protocol: one text part, one delta per word (every word
/// but the first after its space), `interval` apart, then the finish and `[DONE]`.
fn ui_message_stream(
    words: Vec<String>,
    interval: Duration,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let opening = [
        json!({ "type": "start", "messageId": random_id() }),
        json!({ "type": "start-step" }),
        json!({ "type": "text-start", "id": "text-0" }),
    ];
    let deltas = stream::iter(words.into_iter().enumerate()).then(move |(i, word)| async move {
        let delta = if i == 0 { word } else { format!(" {word}") };
        if i > 0 && !interval.is_zero() {
            tokio::time::sleep(interval).await;
        }
        Ok(part(
            json!({ "type": "text-delta", "id": "text-0", "delta": delta }),
        ))
    });
    let closing = [
        json!({ "type": "text-end", "id": "text-0" }),
        json!({ "type": "finish-step" }),
        json!({ "type": "finish", "finishReason": "stop" }),
    ];
    stream::iter(opening.map(|p| Ok(part(p))))
        .chain(deltas)
        .chain(stream::iter(closing.map(|p| Ok(part(p)))))
        .chain(stream::once(async { Ok(Event::default().data("[DONE]")) }))
}

/// `GET /api/chat/{id}/stream`, reached when the layer has no answer for the chat: nothing to
/// resume (`DefaultChatTransport.reconnectToStream` resolves to `null`).
async fn no_stream() -> StatusCode {
    StatusCode::NO_CONTENT
}

/// `DELETE /api/chat/{id}/stream`: stops the chat's generation, whichever instance runs it.
async fn stop<S: Store>(State(sessions): State<Sessions<S, ChatId>>, req: Request) -> Response {
    let (parts, _) = req.into_parts();
    match sessions.cancel_request(&parts).await {
        // The generation stops; every client's stream ends.
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => (StatusCode::NOT_FOUND, "no answer is being generated").into_response(),
        Err(e) => (e.status(), e.to_string()).into_response(),
    }
}

/// A message id for the answer: random, so two answers never share one.
fn random_id() -> String {
    let mut b = [0u8; 12];
    if getrandom::fill(&mut b).is_err() {
        // Only the client's bookkeeping uses it; a clock-based id will do.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        return format!("msg-{nanos:x}");
    }
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("msg-{hex}")
}
