//! A fault-injecting HTTP proxy in front of the S3 server: the real protocol, with the
//! faults of real networks, chosen deterministically (the Nth request of a kind fails in a
//! given way) or at a seeded rate, and outages (every connection dropped for a while).
//! Point a store at [`FaultProxy::endpoint`].

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::{Request, Response};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::TcpListener;

/// What kind of S3 request a request is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    GetObject,
    HeadObject,
    PutObject,
    CreateMultipartUpload,
    UploadPart,
    CompleteMultipartUpload,
    AbortMultipartUpload,
    List,
    Delete,
    Other,
}

fn classify(method: &str, query: &str) -> Kind {
    let has = |q: &str| {
        query
            .split('&')
            .any(|p| p == q || p.starts_with(&format!("{q}=")))
    };
    match method {
        "GET" if has("list-type") || has("uploads") => Kind::List,
        "GET" => Kind::GetObject,
        "HEAD" => Kind::HeadObject,
        "PUT" if has("partNumber") => Kind::UploadPart,
        "PUT" => Kind::PutObject,
        "POST" if has("uploads") => Kind::CreateMultipartUpload,
        "POST" if has("uploadId") => Kind::CompleteMultipartUpload,
        "POST" if has("delete") => Kind::Delete,
        "DELETE" if has("uploadId") => Kind::AbortMultipartUpload,
        "DELETE" => Kind::Delete,
        _ => Kind::Other,
    }
}

/// A fault to inject.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status and S3 error code, without forwarding.
    Status(u16, &'static str),
    /// Forward; send the response head and half the body, then reset the connection.
    ResetMidBody,
    /// Forward (the store applies the request), then drop the connection unanswered:
    /// a lost acknowledgement.
    DropResponse,
    /// Drop the connection without forwarding.
    Refuse,
    /// Forward only the first half of the request body, without its checksum header, and
    /// answer the store's 200: a store that kept less than was sent.
    TruncateRequest,
    /// Wait this long, then forward.
    Delay(Duration),
}

/// When a rule fires.
#[derive(Debug, Clone)]
pub enum When {
    /// On these occurrences (1-based) of matching requests.
    Nth(Vec<usize>),
    /// On every matching request from this occurrence on.
    From(usize),
    /// On each matching request with this probability (seeded, so repeatable).
    Rate(f64),
}

/// One fault rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Which request kinds it applies to (empty: all).
    pub kinds: Vec<Kind>,
    /// Only requests whose path contains this.
    pub path_contains: Option<String>,
    pub when: When,
    /// The faults, used in turn (the first for the first firing, ...), cycling.
    pub faults: Vec<Fault>,
}

impl Rule {
    pub fn nth(kind: Kind, nth: &[usize], fault: Fault) -> Self {
        Self {
            kinds: vec![kind],
            path_contains: None,
            when: When::Nth(nth.to_vec()),
            faults: vec![fault],
        }
    }

    pub fn rate(kinds: &[Kind], rate: f64, faults: &[Fault]) -> Self {
        Self {
            kinds: kinds.to_vec(),
            path_contains: None,
            when: When::Rate(rate),
            faults: faults.to_vec(),
        }
    }

    pub fn on_path(mut self, part: &str) -> Self {
        self.path_contains = Some(part.to_owned());
        self
    }
}

#[derive(Debug, Default)]
struct State {
    rules: Vec<(Rule, usize, usize)>, // rule, matching requests seen, firings
    outage_until: Option<Instant>,
    rng: Option<fastrand::Rng>,
    injected: Vec<(Kind, String, Fault)>,
    requests: usize,
}

/// The proxy; dropping it stops it.
#[derive(Debug)]
pub struct FaultProxy {
    pub endpoint: String,
    state: Arc<Mutex<State>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

type ProxyBody = BoxBody<Bytes, std::io::Error>;

impl FaultProxy {
    /// Starts a proxy to `upstream` (`http://host:port`), with the random faults seeded
    /// by `seed`.
    pub async fn start(upstream: &str, seed: u64) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
        let state = Arc::new(Mutex::new(State {
            rng: Some(fastrand::Rng::with_seed(seed)),
            ..State::default()
        }));
        let upstream = upstream.trim_end_matches('/').to_owned();
        let client: Client<HttpConnector, Full<Bytes>> =
            Client::builder(TokioExecutor::new()).build_http();
        let shared = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let down = shared
                    .lock()
                    .map(|s| s.outage_until.is_some_and(|t| Instant::now() < t))
                    .unwrap_or(false);
                if down {
                    drop(stream);
                    continue;
                }
                let (state, client, upstream) = (shared.clone(), client.clone(), upstream.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        handle(req, state.clone(), client.clone(), upstream.clone())
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Self {
            endpoint,
            state,
            task,
        }
    }

    /// Adds a rule.
    pub fn add(&self, rule: Rule) {
        if let Ok(mut s) = self.state.lock() {
            s.rules.push((rule, 0, 0));
        }
    }

    /// Removes every rule.
    pub fn clear(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.rules.clear();
        }
    }

    /// Drops every connection and request for `length` from now.
    pub fn outage(&self, length: Duration) {
        if let Ok(mut s) = self.state.lock() {
            s.outage_until = Some(Instant::now() + length);
        }
    }

    /// The faults injected so far: (kind, path, fault).
    pub fn injected(&self) -> Vec<(Kind, String, Fault)> {
        self.state
            .lock()
            .map(|s| s.injected.clone())
            .unwrap_or_default()
    }

    /// Requests seen so far.
    pub fn requests(&self) -> usize {
        self.state.lock().map(|s| s.requests).unwrap_or(0)
    }
}

fn decide(state: &Mutex<State>, kind: Kind, path: &str) -> Option<Fault> {
    let mut s = state.lock().ok()?;
    s.requests += 1;
    if s.outage_until.is_some_and(|t| Instant::now() < t) {
        s.injected.push((kind, path.to_owned(), Fault::Refuse));
        return Some(Fault::Refuse);
    }
    let mut chosen = None;
    let State { rules, rng, .. } = &mut *s;
    for (rule, seen, fired) in rules.iter_mut() {
        if !rule.kinds.is_empty() && !rule.kinds.contains(&kind) {
            continue;
        }
        if rule
            .path_contains
            .as_deref()
            .is_some_and(|p| !path.contains(p))
        {
            continue;
        }
        *seen += 1;
        let fire = match &rule.when {
            When::Nth(list) => list.contains(seen),
            When::From(n) => *seen >= *n,
            When::Rate(p) => rng.as_mut().is_some_and(|r| r.f64() < *p),
        };
        if fire && chosen.is_none() && !rule.faults.is_empty() {
            chosen = Some(rule.faults[*fired % rule.faults.len()]);
            *fired += 1;
        }
    }
    if let Some(fault) = chosen {
        s.injected.push((kind, path.to_owned(), fault));
    }
    chosen
}

fn io_error(message: &str) -> std::io::Error {
    std::io::Error::other(message.to_owned())
}

async fn collect(body: Incoming) -> Result<Bytes, std::io::Error> {
    Ok(body
        .collect()
        .await
        .map_err(|e| io_error(&e.to_string()))?
        .to_bytes())
}

fn full(bytes: Bytes) -> ProxyBody {
    Full::new(bytes)
        .map_err(|never: Infallible| match never {})
        .boxed()
}

async fn handle(
    req: Request<Incoming>,
    state: Arc<Mutex<State>>,
    client: Client<HttpConnector, Full<Bytes>>,
    upstream: String,
) -> Result<Response<ProxyBody>, std::io::Error> {
    let path = req.uri().path().to_owned();
    let query = req.uri().query().unwrap_or("").to_owned();
    let kind = classify(req.method().as_str(), &query);
    let fault = decide(&state, kind, &path);
    let (parts, body) = req.into_parts();
    let body = collect(body).await?;
    match fault {
        Some(Fault::Status(status, code)) => {
            let xml = format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Error><Code>{code}</Code><Message>injected by the test proxy</Message></Error>"
            );
            return Response::builder()
                .status(status)
                .header("content-type", "application/xml")
                .body(full(Bytes::from(xml)))
                .map_err(|e| io_error(&e.to_string()));
        }
        Some(Fault::Refuse) => return Err(io_error("connection refused by the test proxy")),
        Some(Fault::Delay(d)) => tokio::time::sleep(d).await,
        _ => {}
    }
    let uri = format!(
        "{upstream}{}",
        parts.uri.path_and_query().map_or("/", |p| p.as_str())
    );
    let mut forward = Request::builder().method(parts.method.clone()).uri(uri);
    let truncate = fault == Some(Fault::TruncateRequest);
    let body = if truncate {
        body.slice(..body.len() / 2)
    } else {
        body
    };
    for (name, value) in &parts.headers {
        let n = name.as_str();
        if truncate
            && (n == "content-length" || n.starts_with("x-amz-checksum") || n == "content-md5")
        {
            continue;
        }
        forward = forward.header(name, value);
    }
    if truncate {
        forward = forward.header("content-length", body.len());
    }
    let request = forward
        .body(Full::new(body))
        .map_err(|e| io_error(&e.to_string()))?;
    let response = client
        .request(request)
        .await
        .map_err(|e| io_error(&e.to_string()))?;
    let (head, body) = response.into_parts();
    let body = collect(body).await?;
    match fault {
        Some(Fault::DropResponse) => Err(io_error("response dropped by the test proxy")),
        Some(Fault::ResetMidBody) if body.len() > 1 => {
            let half = body.slice(..body.len() / 2);
            let frames = futures_util::stream::iter(vec![
                Ok(Frame::data(half)),
                Err(io_error("connection reset by the test proxy")),
            ]);
            Ok(Response::from_parts(head, StreamBody::new(frames).boxed()))
        }
        _ => Ok(Response::from_parts(head, full(body))),
    }
}
