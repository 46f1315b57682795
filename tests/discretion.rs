//! What the layer and its stores keep to themselves: a session key (a capability) never appears
//! in a Redis announcement, and a reconnect never gets the first client's cookie. Over real TCP,
//! with axum, on both stores. The logs are checked in `tests/log_discretion.rs`.

mod common;

use std::net::SocketAddr;

use axum::http::header;
use axum::response::sse::{Event, Sse};
use axum::response::IntoResponse;
use axum::routing;
use axum::Router;
use common::*;
use futures_util::stream;
use resumable_sse::store::Store;
use resumable_sse::{MemoryStore, ResumableSseLayer, SessionKey};

const COOKIE: &str = "sid=first-clients-secret; HttpOnly";
const OLD_DATE: &str = "Mon, 01 Jan 2001 00:00:00 GMT";

/// `GET /cookie`: three events, with a cookie, a date of its own and a header of the app's.
async fn cookie_app<St: Store>(store: St) -> SocketAddr {
    let app = Router::new()
        .route(
            "/cookie",
            routing::get(|| async {
                let events = stream::iter((0..3).map(|i| {
                    Ok::<_, std::convert::Infallible>(Event::default().data(format!("token {i}")))
                }));
                (
                    [
                        (header::SET_COOKIE, COOKIE),
                        (header::DATE, OLD_DATE),
                        (header::HeaderName::from_static("x-app"), "kept"),
                    ],
                    Sse::new(events),
                )
                    .into_response()
            }),
        )
        .layer(ResumableSseLayer::new(store));
    serve_router(app).await
}

async fn assert_replays_drop_the_cookie_and_the_date<St: Store>(store: St) {
    let addr = cookie_app(store).await;
    let mut first = get(addr, "/cookie?session_id=c1", None).await;
    assert_eq!(
        first.headers[header::SET_COOKIE],
        COOKIE,
        "the first client's own"
    );
    assert_eq!(first.headers[header::DATE], OLD_DATE);
    let evs = first.collect().await;
    assert_eq!(datas(&evs), expected_tokens(0..3));
    let id = evs[0].id.clone().expect("an id");
    for last in [Some(id.as_str()), None] {
        let mut again = get(addr, "/cookie?session_id=c1", last).await;
        assert_eq!(again.status, 200);
        assert!(
            again.headers.get(header::SET_COOKIE).is_none(),
            "a reconnect ({last:?}) got the first client's cookie: {:?}",
            again.headers
        );
        assert_ne!(
            again.headers.get(header::DATE).map(|d| d.as_bytes()),
            Some(OLD_DATE.as_bytes()),
            "a reconnect got the first response's date"
        );
        assert_eq!(
            again.headers["x-app"], "kept",
            "the app's headers are replayed"
        );
        let want = if last.is_some() { 1..3 } else { 0..3 };
        assert_eq!(datas(&again.collect().await), expected_tokens(want));
    }
}

#[tokio::test]
async fn replayed_responses_carry_neither_the_first_clients_cookie_nor_its_date_in_memory() {
    assert_replays_drop_the_cookie_and_the_date(MemoryStore::new()).await;
}

#[cfg(feature = "redis")]
mod on_redis {
    use futures_util::StreamExt;
    use resumable_sse::RedisStore;

    use super::common::redis::{shared_url, unique_prefix};
    use super::*;

    async fn store(url: String) -> Option<RedisStore> {
        Some(
            RedisStore::builder(url)
                .prefix(unique_prefix())
                .connect()
                .await
                .expect("connect to redis"),
        )
    }

    #[tokio::test]
    async fn replayed_responses_carry_neither_the_first_clients_cookie_nor_its_date_on_redis() {
        let Some(url) = shared_url() else { return };
        let store = store(url).await.expect("a store");
        assert_replays_drop_the_cookie_and_the_date(store).await;
    }

    #[tokio::test]
    async fn redis_announcements_name_a_session_by_digest_never_by_its_key() {
        let Some(url) = shared_url() else { return };
        let prefix = unique_prefix();
        // A client allowed to subscribe, and nothing else, listens to every announcement.
        let client = ::redis::Client::open(url.as_str()).expect("a client");
        let mut pubsub = client.get_async_pubsub().await.expect("pub/sub");
        pubsub
            .subscribe(format!("{prefix}:notify"))
            .await
            .expect("subscribed");
        let store = RedisStore::builder(url)
            .prefix(prefix)
            .connect()
            .await
            .expect("connect");
        let app = serve_with(store, |l| l).await;
        let secret = "announced-secret-7781";
        let evs = get(app.addr, &format!("/tokens?session_id={secret}&n=3"), None)
            .await
            .collect()
            .await;
        assert_eq!(datas(&evs), expected_tokens(0..3));
        let digest = SessionKey::new(format!("/tokens {secret}"))
            .unwrap()
            .digest()
            .to_string();
        // Start, events, finish: at least three announcements, each naming the digest.
        let mut messages = pubsub.into_on_message();
        let mut seen = Vec::new();
        let collect = async {
            while seen.len() < 3 {
                let msg = messages.next().await.expect("an announcement");
                seen.push(String::from_utf8_lossy(msg.get_payload_bytes()).into_owned());
            }
        };
        tokio::time::timeout(TIMEOUT, collect)
            .await
            .expect("announcements in time");
        for payload in &seen {
            assert!(!payload.contains(secret), "the key in {payload:?}");
            assert_eq!(&payload[1..], digest, "announcement {payload:?}");
        }
    }
}
