use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Response;
use pin_project_lite::pin_project;

use crate::body::ResumableBody;

pin_project! {
    /// The response future of [`ResumableSse`](crate::ResumableSse).
    ///
    /// A request without a session key polls the inner future directly (no allocation); a request
    /// with one runs the session logic in a boxed future.
    pub struct ResponseFuture<F, B, E> {
        #[pin]
        kind: Kind<F, B, E>,
    }
}

type SessionFuture<B, E> =
    Pin<Box<dyn Future<Output = Result<Response<ResumableBody<B>>, E>> + Send>>;

pin_project! {
    #[project = KindProj]
    enum Kind<F, B, E> {
        Passthrough { #[pin] inner: F },
        Session { fut: SessionFuture<B, E> },
    }
}

impl<F, B, E> ResponseFuture<F, B, E> {
    pub(crate) fn passthrough(inner: F) -> Self {
        Self {
            kind: Kind::Passthrough { inner },
        }
    }

    pub(crate) fn session(fut: SessionFuture<B, E>) -> Self {
        Self {
            kind: Kind::Session { fut },
        }
    }
}

impl<F, B, E> std::fmt::Debug for ResponseFuture<F, B, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

impl<F, B, E> Future for ResponseFuture<F, B, E>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<ResumableBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project().kind.project() {
            KindProj::Passthrough { inner } => inner
                .poll(cx)
                .map(|r| r.map(|res| res.map(ResumableBody::passthrough))),
            KindProj::Session { fut } => fut.as_mut().poll(cx),
        }
    }
}
