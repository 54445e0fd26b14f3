//! A client-side layer in front of kube's HTTP stack: records every request
//! the code under test makes, and answers those matching an injected fault
//! with an error status instead of sending them (an API server does not
//! fail on demand). Everything else goes to the real server unchanged.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use futures::future::BoxFuture;
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use kube::client::{Body, DynBody};
use tower::{BoxError, Layer, Service};

/// One request as sent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub method: Method,
    pub path: String,
    pub query: String,
    /// The answer's status code (0 while unanswered, or if the request
    /// never got an answer).
    pub code: u16,
}

impl Call {
    /// Anything but a read.
    pub fn is_write(&self) -> bool {
        self.method != Method::GET
    }
}

#[derive(Default)]
struct State {
    log: Vec<Call>,
    /// Calls cleared so far: a call's number minus this is its place in `log`.
    cleared: usize,
    /// (method, path substring, status code).
    faults: Vec<(Method, String, u16)>,
    /// (method, path substring): held until [`Recorder::release`], as a
    /// server that does not answer.
    holds: Vec<(Method, String)>,
}

/// The record of a client's requests, and the faults it injects.
#[derive(Clone)]
pub struct Recorder {
    state: Arc<Mutex<State>>,
    /// Bumped by [`Recorder::release`]; held requests wait for it.
    gate: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Default for Recorder {
    fn default() -> Self {
        Recorder {
            state: Arc::default(),
            gate: Arc::new(tokio::sync::watch::channel(0).0),
        }
    }
}

impl Recorder {
    /// Every request so far.
    pub fn log(&self) -> Vec<Call> {
        self.state.lock().unwrap().log.clone()
    }

    /// Every request but reads.
    pub fn writes(&self) -> Vec<Call> {
        self.log().into_iter().filter(Call::is_write).collect()
    }

    /// Requests the server refused as not authorized (403).
    pub fn denied(&self) -> Vec<Call> {
        self.log().into_iter().filter(|c| c.code == 403).collect()
    }

    /// Forgets what was recorded.
    pub fn clear(&self) {
        let mut st = self.state.lock().unwrap();
        st.cleared += st.log.len();
        st.log.clear();
    }

    /// From now on, `method` requests whose path contains `path` are
    /// answered with `code` and never reach the server.
    pub fn fail(&self, method: Method, path: &str, code: u16) {
        self.state
            .lock()
            .unwrap()
            .faults
            .push((method, path.to_string(), code));
    }

    /// From now on, `method` requests whose path contains `path` get no
    /// answer until [`Recorder::release`] (they are sent then).
    pub fn hold(&self, method: Method, path: &str) {
        self.state
            .lock()
            .unwrap()
            .holds
            .push((method, path.to_string()));
    }

    /// Lets every held request go on, and holds no more.
    pub fn release(&self) {
        self.state.lock().unwrap().holds.clear();
        self.gate.send_modify(|g| *g += 1);
    }

    /// Removes every injected fault.
    pub fn heal(&self) {
        self.state.lock().unwrap().faults.clear();
    }
}

impl<S> Layer<S> for Recorder {
    type Service = Recorded<S>;
    fn layer(&self, inner: S) -> Recorded<S> {
        Recorded {
            inner,
            rec: self.clone(),
        }
    }
}

/// The service [`Recorder`] wraps around kube's stack.
#[derive(Clone)]
pub struct Recorded<S> {
    inner: S,
    rec: Recorder,
}

/// A whole body of bytes (an injected error status).
struct Whole(Option<Bytes>);

impl http_body::Body for Whole {
    type Data = Bytes;
    type Error = BoxError;
    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(self.0.take().map(|b| Ok(Frame::data(b))))
    }
}

impl<S> Service<Request<Body>> for Recorded<S>
where
    S: Service<Request<Body>, Response = Response<Box<DynBody>>, Error = BoxError>,
    S::Future: Send + 'static,
{
    type Response = Response<Box<DynBody>>;
    type Error = BoxError;
    type Future = BoxFuture<'static, Result<Self::Response, BoxError>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<Body>) -> Self::Future {
        let call = Call {
            method: req.method().clone(),
            path: req.uri().path().to_string(),
            query: req.uri().query().unwrap_or("").to_string(),
            code: 0,
        };
        let (index, fault, held) = {
            let mut st = self.rec.state.lock().unwrap();
            st.log.push(call.clone());
            let index = st.cleared + st.log.len() - 1;
            let fault = st
                .faults
                .iter()
                .find(|(m, p, _)| *m == call.method && call.path.contains(p.as_str()))
                .map(|(_, _, code)| *code);
            let held = st
                .holds
                .iter()
                .any(|(m, p)| *m == call.method && call.path.contains(p.as_str()));
            (index, fault, held)
        };
        let state = self.rec.state.clone();
        let answered = move |code: u16| {
            let mut st = state.lock().unwrap();
            // Cleared since: nothing to mark.
            let Some(at) = index.checked_sub(st.cleared) else {
                return;
            };
            if let Some(c) = st.log.get_mut(at) {
                c.code = code;
            }
        };
        match fault {
            Some(code) => Box::pin(async move {
                answered(code);
                let body = serde_json::json!({
                    "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                    "message": "injected failure", "reason": "InternalError", "code": code});
                let bytes = Bytes::from(serde_json::to_vec(&body)?);
                let resp = Response::builder()
                    .status(StatusCode::from_u16(code)?)
                    .header("content-type", "application/json")
                    .body(Box::new(Whole(Some(bytes))) as Box<DynBody>)?;
                Ok(resp)
            }),
            None => {
                // Nothing is sent before the future is first polled.
                let fut = self.inner.call(req);
                let mut gate = self.rec.gate.subscribe();
                Box::pin(async move {
                    if held {
                        let _ = gate.changed().await;
                    }
                    let resp = fut.await?;
                    answered(resp.status().as_u16());
                    Ok(resp)
                })
            }
        }
    }
}
