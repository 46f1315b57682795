//! A chat page whose answers survive dropped connections, reloads and second tabs.
//!
//! ```text
//! cargo run --example chat                        # then open http://127.0.0.1:3000
//! cargo run --example chat -- --listen 127.0.0.1:0 --bare
//! ```
//!
//! Ask something and watch a fake language model answer word by word. Press "drop connection"
//! (the server ends this tab's response), reload the page, or open the same address in a second
//! tab: the browser's own `EventSource` reconnects and the answer goes on with no word missing and
//! none repeated. The handlers below are plain axum SSE handlers that know nothing of
//! resumption; [`ResumableSseLayer`] does it all.
//!
//! # Options
//!
//! - `--listen ADDR`: where to listen (default `127.0.0.1:3000`; port 0 picks a free port). Once
//!   the server accepts connections it prints one line on stdout, `listening on http://ADDR`,
//!   with the address it is bound to.
//! - `--bare`: the same routes without the layer, for side-by-side measurement (and to see a
//!   reconnect start the answer over).
//! - `--redis URL`: keep sessions in Redis (build with `--features redis`), so that several
//!   instances can share them: start two on two ports with the same URL and a reconnect may land
//!   on either. `--lease-ms MS` sets the producer lease (default 5000): how soon the other
//!   instances notice that this one died mid-answer.
//! - `--max-events N`: also bound each session by a count of events (by default the stores bound
//!   a session by bytes only: 64 MiB, a million token events and more); older ones are evicted.
//!
//! Log lines go to stderr (`RUST_LOG` sets the level, `warn` by default).
//!
//! # Routes
//!
//! | route | answer |
//! |---|---|
//! | `GET /` | the page; `/?session=ID&prompt=TEXT` is a session's own address (reloading it or opening it in another tab replays the answer, then follows it live), and `&interval_ms=MS` sets the pace of its answers |
//! | `GET /chat?session_id=ID&tokens=N&interval_ms=MS` | `N` message events whose data are `token 0` .. `token N-1`, `MS` milliseconds apart (default 0: no sleep at all), then the end; no other event or field |
//! | `GET /chat?session_id=ID&prompt=TEXT&interval_ms=MS` | the fake answer to `TEXT`: one message event per word (the data of every word but the first starts with its space), `MS` milliseconds apart (default 50); the first event also carries `retry: 500`; a last event `event: done` with data `[DONE]` marks a normal end |
//! | `GET /answer?prompt=TEXT` | the whole answer to `TEXT` as `text/plain`: what the message events of `/chat?prompt=TEXT` add up to |
//! | `POST /drop?session_id=ID&client=C` | ends the open `/chat` responses of session `ID` that were opened with `&client=C` (every one of the session's without `client`); their clients reconnect by themselves. `200` with `{"dropped": n}` |
//! | `POST /cancel?session_id=ID` | [`Sessions::cancel`]: `204` when a running session was cancelled, `404` when there was none |
//! | `GET /session?session_id=ID` | [`Sessions::status`]: `{"status": S, "events": n}` with `S` one of `starting`, `running`, `completed`, `failed`, `cancelled`; `404` with `{"status": "unknown"}` |
//! | `GET /metrics` | the library's counters and gauges in the Prometheus text format |
//! | `POST /api/chat` | starts a chat the way the Vercel AI SDK's resumable streams do: the body is the prompt (`text/plain`, or JSON with a `prompt` string or a `messages` array whose last user message is the prompt); answers `{"id": ID}` |
//! | `GET /api/chat/{id}/stream` | the answer to that prompt, as on `/chat`: the first request starts it, later ones resume it (`Last-Event-ID`) |
//!
//! On `/chat` the session key is the `session_id` query parameter (without one, the answer is
//! streamed unresumable); on `/api/chat/{id}/stream` it is the `{id}` path segment
//! (`FromPath::segment(2)`). `POST /api/chat` only remembers the prompt under a new random id (for
//! ten minutes); the generation starts with the first `GET` of its stream. Each route is a key
//! space of its own; `/cancel` and `/session` take either kind of id and ask the layers'
//! [`Sessions`] handles, which name sessions as the layers do.

// The server around the routes, shared with the load tool's fixture server: flags, logs,
// metrics, the listening socket, `/drop`.
#[path = "chat/server.rs"]
mod server;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{FromRef, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware;
use axum::response::sse::{Event, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures_util::stream::{self, Stream, StreamExt};
use metrics_exporter_prometheus::PrometheusHandle;
use resumable_sse::store::{Status, Store};
use resumable_sse::{BoxError, FromPath, MemoryStore, ResumableSseLayer, SessionKey, Sessions};
use serde_json::{json, Value};

use crate::server::{
    drop_connections, droppable, init_logs, install_metrics, render_metrics, Connections, Flags,
};

const USAGE: &str =
    "usage: chat [--listen ADDR] [--bare] [--redis URL [--lease-ms MS]] [--max-events N]";
/// The pause between two words of an answer, unless `interval_ms` says otherwise.
const ANSWER_INTERVAL: Duration = Duration::from_millis(50);
/// How soon a browser reconnects after losing the stream (sent as `retry:`).
const RECONNECT_DELAY: Duration = Duration::from_millis(500);
/// How long `POST /api/chat` remembers a prompt, and how many it remembers at most.
const PROMPT_TTL: Duration = Duration::from_secs(600);
const MAX_PROMPTS: usize = 10_000;

struct Options {
    listen: String,
    bare: bool,
    redis: Option<String>,
    lease_ms: u64,
    max_events: Option<usize>,
}

fn parse_args(args: impl Iterator<Item = String>) -> Result<Options, String> {
    let mut opts = Options {
        listen: "127.0.0.1:3000".to_owned(),
        bare: false,
        redis: None,
        lease_ms: 5000,
        max_events: None,
    };
    let mut args = Flags::new(args);
    while let Some(flag) = args.next_flag() {
        match flag.as_str() {
            "--listen" => opts.listen = args.value("--listen")?,
            "--redis" => opts.redis = Some(args.value("--redis")?),
            "--bare" => opts.bare = true,
            "--lease-ms" => {
                opts.lease_ms = args
                    .value("--lease-ms")?
                    .parse()
                    .map_err(|_| "--lease-ms needs a number of milliseconds".to_owned())?
            }
            "--max-events" => {
                opts.max_events = Some(
                    args.value("--max-events")?
                        .parse()
                        .map_err(|_| "--max-events needs a number of events".to_owned())?,
                )
            }
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
    init_logs();
    let opts = parse_args(std::env::args().skip(1)).unwrap_or_else(|e| {
        eprintln!("error: {e}\n{USAGE}");
        std::process::exit(2);
    });
    let metrics = install_metrics();
    let result = match opts.redis.clone() {
        #[cfg(feature = "redis")]
        Some(url) => {
            let mut builder =
                resumable_sse::RedisStore::builder(url).lease(Duration::from_millis(opts.lease_ms));
            if let Some(max) = opts.max_events {
                builder = builder.max_events_per_session(max);
            }
            let store = builder.connect().await;
            match store {
                Ok(store) => serve(store, &opts, metrics).await,
                Err(e) => Err(format!("cannot connect to Redis: {e}").into()),
            }
        }
        #[cfg(not(feature = "redis"))]
        Some(_) => Err("this build has no Redis support; rebuild with --features redis".into()),
        None => {
            let mut builder = MemoryStore::builder();
            if let Some(max) = opts.max_events {
                builder = builder.max_events_per_session(max);
            }
            serve(builder.build(), &opts, metrics).await
        }
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}

/// Serves the app on `store` until the process is stopped.
async fn serve<S: Store>(
    store: S,
    opts: &Options,
    metrics: PrometheusHandle,
) -> Result<(), BoxError> {
    server::serve(&opts.listen, app(store, opts.bare, metrics)).await
}

/// What the handlers share.
#[derive(Clone)]
struct App<S> {
    /// The layers' handles, which name sessions as the layers do: `/chat`'s and the AI SDK
    /// stream's.
    chat: Sessions<S>,
    api: Sessions<S, FromPath>,
    connections: Connections,
    prompts: Prompts,
    metrics: PrometheusHandle,
}

// The shared handlers (`/drop`, `/metrics`) take their part of the state.
impl<S> FromRef<App<S>> for Connections {
    fn from_ref(app: &App<S>) -> Self {
        app.connections.clone()
    }
}

impl<S> FromRef<App<S>> for PrometheusHandle {
    fn from_ref(app: &App<S>) -> Self {
        app.metrics.clone()
    }
}

fn app<S: Store>(store: S, bare: bool, metrics: PrometheusHandle) -> Router {
    let layer = ResumableSseLayer::new(store.clone());
    // `/api/chat/{id}/stream`: the key is the `{id}` segment.
    let api_layer = layer.clone().session_key(FromPath::segment(2));
    let state = App {
        chat: layer.sessions(),
        api: api_layer.sessions(),
        connections: Connections::default(),
        prompts: Prompts::default(),
        metrics,
    };
    let chat = Router::new().route("/chat", get(chat));
    let api_stream = Router::new()
        .route("/api/chat/{id}/stream", get(api_stream::<S>))
        .with_state(state.clone());
    let (chat, api_stream) = if bare {
        (chat, api_stream)
    } else {
        (chat.layer(layer), api_stream.layer(api_layer))
    };
    // Outside the layer: `/drop` can end a client's response while the session goes on.
    let chat = chat.layer(middleware::from_fn_with_state(
        state.connections.clone(),
        droppable,
    ));
    Router::new()
        .route("/", get(page))
        .route("/answer", get(answer_text))
        .route("/drop", post(drop_connections))
        .route("/cancel", post(cancel::<S>))
        .route("/session", get(session_status::<S>))
        .route("/metrics", get(render_metrics))
        .route("/api/chat", post(api_start::<S>))
        .with_state(state)
        .merge(chat)
        .merge(api_stream)
}

async fn page() -> impl IntoResponse {
    (
        [(header::CACHE_CONTROL, "no-store")],
        Html(include_str!("chat/index.html")),
    )
}

type Params = Query<HashMap<String, String>>;

fn bad_request(message: impl Into<String>) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({ "error": message.into() })),
    )
        .into_response()
}

fn interval_param(q: &HashMap<String, String>, default: Duration) -> Result<Duration, String> {
    match q.get("interval_ms") {
        None => Ok(default),
        Some(ms) => ms
            .parse()
            .map(Duration::from_millis)
            .map_err(|_| "interval_ms must be a whole number of milliseconds".to_owned()),
    }
}

/// `GET /chat`: a plain SSE handler, unaware of sessions and reconnects.
async fn chat(Query(q): Params) -> Response {
    if let Some(n) = q.get("tokens") {
        let Ok(n) = n.parse::<u64>() else {
            return bad_request("tokens must be a whole number");
        };
        return match interval_param(&q, Duration::ZERO) {
            Ok(interval) => Sse::new(token_events(n, interval)).into_response(),
            Err(message) => bad_request(message),
        };
    }
    let prompt = q.get("prompt").map_or("", String::as_str);
    match interval_param(&q, ANSWER_INTERVAL) {
        Ok(interval) => Sse::new(answer_events(prompt, interval)).into_response(),
        Err(message) => bad_request(message),
    }
}

/// `token 0` .. `token n-1` as message events, `interval` apart.
fn token_events(n: u64, interval: Duration) -> impl Stream<Item = Result<Event, Infallible>> {
    stream::iter(0..n).then(move |i| async move {
        if i > 0 && !interval.is_zero() {
            tokio::time::sleep(interval).await;
        }
        Ok(Event::default().data(format!("token {i}")))
    })
}

/// The fake answer, one word per event, then `event: done`.
fn answer_events(
    prompt: &str,
    interval: Duration,
) -> impl Stream<Item = Result<Event, Infallible>> {
    let words = answer_tokens(&answer(prompt));
    let words = stream::iter(words.into_iter().enumerate()).then(move |(i, word)| async move {
        let event = Event::default().data(word);
        if i == 0 {
            return Ok(event.retry(RECONNECT_DELAY));
        }
        if !interval.is_zero() {
            tokio::time::sleep(interval).await;
        }
        Ok(event)
    });
    words.chain(stream::once(async {
        Ok(Event::default().event("done").data("[DONE]"))
    }))
}

/// The whole answer to `prompt`: the same text for the same prompt, 60 to 80 words long.
fn answer(prompt: &str) -> String {
    let words: Vec<&str> = prompt.split_whitespace().take(8).collect();
    let topic = if words.is_empty() {
        "nothing in particular".to_owned()
    } else {
        words.join(" ")
    };
    format!(
        "You asked: \u{201c}{topic}\u{201d}. Here is a made-up answer, sent one word at a time the \
         way a language model streams its tokens. The handler knows nothing of reconnections: the \
         middleware gives every word an id and keeps it. Drop the connection, reload the page or \
         open a second tab: the browser reconnects with the id of the last word it got, and the \
         answer goes on with no word missing and none repeated."
    )
}

/// Splits `text` into words; every word but the first keeps the space before it, so the events'
/// data add up to `text`.
fn answer_tokens(text: &str) -> Vec<String> {
    let mut words = text.split(' ');
    let first = words.next().unwrap_or_default().to_owned();
    std::iter::once(first)
        .chain(words.map(|w| format!(" {w}")))
        .collect()
}

async fn answer_text(Query(q): Params) -> String {
    answer(q.get("prompt").map_or("", String::as_str))
}

/// The keys `session_id` may name: a `/chat` session's, or an AI SDK stream's. Each route is a
/// key space of its own; the layers' handles name them.
fn session_keys<S: Store>(
    app: &App<S>,
    q: &HashMap<String, String>,
) -> Result<[SessionKey; 2], String> {
    let id = q.get("session_id").ok_or("session_id is missing")?;
    let chat = app.chat.key_at("/chat", id).map_err(|e| e.to_string())?;
    let api = app
        .api
        .key_at(&format!("/api/chat/{id}/stream"), id)
        .map_err(|e| e.to_string())?;
    Ok([chat, api])
}

async fn cancel<S: Store>(State(app): State<App<S>>, Query(q): Params) -> Response {
    let [chat, api] = match session_keys(&app, &q) {
        Ok(keys) => keys,
        Err(message) => return bad_request(message),
    };
    let cancelled = match app.chat.cancel(&chat).await {
        Ok(false) => app.api.cancel(&api).await,
        done => done,
    };
    match cancelled {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => (
            StatusCode::NOT_FOUND,
            Json(json!({ "error": "no running session" })),
        )
            .into_response(),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}

async fn session_status<S: Store>(State(app): State<App<S>>, Query(q): Params) -> Response {
    let [chat, api] = match session_keys(&app, &q) {
        Ok(keys) => keys,
        Err(message) => return bad_request(message),
    };
    let found = match app.chat.status(&chat).await {
        Ok(None) => app.api.status(&api).await,
        found => found,
    };
    let info = match found {
        Ok(Some(info)) => info,
        Ok(None) => {
            return (StatusCode::NOT_FOUND, Json(json!({ "status": "unknown" }))).into_response()
        }
        Err(e) => return (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    };
    let status = match info.status {
        Status::Starting => "starting",
        Status::Running => "running",
        Status::Finished(outcome) => outcome.reason().as_str(),
    };
    Json(json!({ "status": status, "events": info.last_seq })).into_response()
}

/// Prompts posted to `/api/chat`, by id.
#[derive(Clone, Default)]
struct Prompts(Arc<Mutex<HashMap<String, (String, Instant)>>>);

impl Prompts {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, (String, Instant)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

async fn api_start<S>(State(app): State<App<S>>, headers: HeaderMap, body: Bytes) -> Response {
    let prompt = match prompt_from_body(&headers, &body) {
        Ok(prompt) => prompt,
        Err(message) => return bad_request(message),
    };
    let id = random_id();
    let mut prompts = app.prompts.lock();
    prompts.retain(|_, (_, at)| at.elapsed() < PROMPT_TTL);
    if prompts.len() >= MAX_PROMPTS {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "too many chats waiting to start",
        )
            .into_response();
    }
    prompts.insert(id.clone(), (prompt, Instant::now()));
    Json(json!({ "id": id })).into_response()
}

fn prompt_from_body(headers: &HeaderMap, body: &[u8]) -> Result<String, &'static str> {
    let text = std::str::from_utf8(body).map_err(|_| "the body must be UTF-8")?;
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.trim_start().starts_with("application/json"));
    if !is_json {
        return Ok(text.to_owned());
    }
    let value: Value = serde_json::from_str(text).map_err(|_| "the body is not valid JSON")?;
    if let Some(prompt) = value.get("prompt").and_then(Value::as_str) {
        return Ok(prompt.to_owned());
    }
    // `{"messages": [{"role": "user", "content": "..."}]}`, or with `"parts": [{"type": "text",
    // "text": "..."}]` as the AI SDK's UI messages have.
    let message = value
        .get("messages")
        .and_then(Value::as_array)
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .ok_or(
            "the JSON body needs a \"prompt\" string or a \"messages\" array with a user message",
        )?;
    if let Some(content) = message["content"].as_str() {
        return Ok(content.to_owned());
    }
    let parts = message["parts"]
        .as_array()
        .ok_or("the user message has no text")?;
    Ok(parts
        .iter()
        .filter(|p| p["type"] == "text")
        .filter_map(|p| p["text"].as_str())
        .collect::<Vec<_>>()
        .join("\n"))
}

/// An unguessable id: a random (version 4) UUID.
fn random_id() -> String {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("the system's random number generator works");
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..]
    )
}

/// `GET /api/chat/{id}/stream`: the answer to the posted prompt, unaware of reconnects.
async fn api_stream<S>(
    State(app): State<App<S>>,
    Path(id): Path<String>,
    Query(q): Params,
) -> Response {
    let Some(prompt) = app.prompts.lock().get(&id).map(|(p, _)| p.clone()) else {
        return (StatusCode::NOT_FOUND, "no such chat").into_response();
    };
    match interval_param(&q, ANSWER_INTERVAL) {
        Ok(interval) => Sse::new(answer_events(&prompt, interval)).into_response(),
        Err(message) => bad_request(message),
    }
}
