//! The HTTP side of `/metrics` and the health probes, shared by `isomesh-node` and
//! `isomesh-broker`: accept a connection, read one request head, answer it, close.
//!
//! Prometheus and a container's health check need no more than that: one `GET` per connection,
//! a short text body. A web framework would be most of either binary's dependencies for a page or
//! three, so this is the whole of it. What each path answers is the caller's: [`serve`] takes an
//! async function from the request's path to a [`Page`] (async, because the broker's figures
//! are read from rmqtt's async state).
//!
//! ```no_run
//! # async fn example() -> std::io::Result<()> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! isomesh_http::serve(listener, "GET /metrics", |path: String| async move {
//!     (path == "/metrics").then(|| isomesh_http::Page::metrics("up 1\n".into()))
//! })
//! .await;
//! # Ok(())
//! # }
//! ```

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Largest request head read from a client; more is not a scrape.
const MAX_REQUEST: usize = 8 << 10;

/// How long a client may take to send its request.
const READ_WITHIN: Duration = Duration::from_secs(5);

/// Largest answer [`get`] reads: a probe's answer is a line.
const MAX_RESPONSE: u64 = 64 << 10;

/// Prometheus' text exposition format.
const METRICS_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";
const TEXT_TYPE: &str = "text/plain; charset=utf-8";

/// What one path answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    /// Status line's code and reason, e.g. `200 OK`.
    pub status: &'static str,
    pub content_type: &'static str,
    pub body: String,
}

impl Page {
    /// `200 OK` with a Prometheus text exposition.
    pub fn metrics(body: String) -> Page {
        Page {
            status: "200 OK",
            content_type: METRICS_TYPE,
            body,
        }
    }

    /// `200 OK` with a line of text.
    pub fn ok(body: String) -> Page {
        Page {
            status: "200 OK",
            content_type: TEXT_TYPE,
            body,
        }
    }

    /// `503 Service Unavailable` with the reason: a probe that says "not yet" or "no longer".
    pub fn unavailable(body: String) -> Page {
        Page {
            status: "503 Service Unavailable",
            content_type: TEXT_TYPE,
            body,
        }
    }

    fn plain(status: &'static str, body: String) -> Page {
        Page {
            status,
            content_type: TEXT_TYPE,
            body,
        }
    }
}

/// Serves `listener` until the task is dropped: every `GET` gets `route(path)` (the path without
/// its query), or a 404 naming `offered` (e.g. `GET /metrics, /healthz`) when `route` has no
/// page; any other method a 405.
pub async fn serve<F, Fut>(listener: TcpListener, offered: &'static str, route: F)
where
    F: Fn(String) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Option<Page>> + Send + 'static,
{
    let route = Arc::new(route);
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                let route = route.clone();
                tokio::spawn(async move { answer(stream, offered, &*route).await });
            }
            Err(e) => {
                // Out of file descriptors, say: wait rather than spin.
                tracing::warn!(error = %e, "cannot accept an HTTP connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One exchange: read the head, answer, close.
async fn answer<F, Fut>(mut stream: TcpStream, offered: &str, route: &F)
where
    F: Fn(String) -> Fut,
    Fut: Future<Output = Option<Page>>,
{
    let mut head = Vec::with_capacity(512);
    let read = tokio::time::timeout(READ_WITHIN, async {
        let mut buf = [0u8; 1024];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < MAX_REQUEST {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    if read.is_err() {
        return;
    }
    let page = match get_path(&head) {
        Some(path) => route(path.to_string())
            .await
            .unwrap_or_else(|| not_found(offered)),
        None => Page::plain("405 Method Not Allowed", format!("use {offered}\n")),
    };
    if let Err(e) = stream.write_all(&render(&page)).await {
        tracing::debug!(error = %e, "HTTP client went away");
    }
    let _ = stream.shutdown().await;
}

/// The path of a `GET` request head, without its query; `None` for any other method (or no
/// request line at all).
fn get_path(head: &[u8]) -> Option<String> {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    match (parts.next(), parts.next()) {
        (Some("GET"), Some(path)) => Some(path.split('?').next().unwrap_or("").to_string()),
        _ => None,
    }
}

fn not_found(offered: &str) -> Page {
    Page::plain("404 Not Found", format!("this serves {offered}\n"))
}

/// The `# HELP` and `# TYPE` lines that open a metric in Prometheus' text format: `kind` is
/// `counter`, `gauge` or `histogram`.
pub fn header(out: &mut String, name: &str, kind: &str, help: &str) -> std::fmt::Result {
    use std::fmt::Write as _;
    writeln!(out, "# HELP {name} {help}")?;
    writeln!(out, "# TYPE {name} {kind}")
}

/// The process's resident set, from `/proc/self/statm` (Linux); `None` elsewhere. Both pages
/// carry it as Prometheus' usual `process_resident_memory_bytes`.
pub fn resident_memory_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u64::try_from(page).ok().map(|page| pages * page)
}

/// `GET path` from `addr` (`HOST:PORT`), the client side of a probe: the whole answer, head and
/// body, as text (at most 64 KiB of it). A peer that does not answer within 5 s is a timeout
/// error.
pub async fn get(addr: &str, path: &str) -> std::io::Result<String> {
    let ask = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream
            .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
            .await?;
        let mut response = Vec::new();
        stream.take(MAX_RESPONSE).read_to_end(&mut response).await?;
        Ok(String::from_utf8_lossy(&response).into_owned())
    };
    tokio::time::timeout(READ_WITHIN, ask).await.map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer within {} s", READ_WITHIN.as_secs()),
        )
    })?
}

fn render(page: &Page) -> Vec<u8> {
    format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
        page.status,
        page.content_type,
        page.body.len(),
        page.body
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn route(path: String) -> Option<Page> {
        (path == "/metrics").then(|| Page::metrics("up 1\n".into()))
    }

    #[test]
    fn a_get_names_its_path_without_the_query() {
        assert_eq!(
            get_path(b"GET /metrics?x=1 HTTP/1.1\r\nHost: a\r\n\r\n").as_deref(),
            Some("/metrics")
        );
    }

    #[test]
    fn other_methods_and_garbage_are_not_gets() {
        assert_eq!(get_path(b"POST /metrics HTTP/1.1\r\n\r\n"), None);
        assert_eq!(get_path(b"GET\r\n\r\n"), None);
        assert_eq!(get_path(b"\xff\xfe\r\n\r\n"), None);
        assert_eq!(get_path(b""), None);
    }

    #[test]
    fn the_response_carries_its_length_and_closes() {
        let text = String::from_utf8(render(&Page::ok("ok\n".into()))).unwrap_or_default();
        assert!(text.starts_with("HTTP/1.1 200 OK\r\n"), "{text}");
        assert!(text.contains("Content-Length: 3\r\n"), "{text}");
        assert!(text.contains("Connection: close\r\n"), "{text}");
        assert!(text.ends_with("\r\n\r\nok\n"), "{text}");
    }

    /// Sends `request` to a server of [`route`] over a real socket; the whole response.
    async fn exchange(request: &[u8]) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let server = tokio::spawn(serve(listener, "GET /metrics", route));
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        stream.write_all(request).await.expect("write");
        let mut text = String::new();
        stream.read_to_string(&mut text).await.expect("read");
        server.abort();
        text
    }

    #[tokio::test]
    async fn a_socket_gets_the_page_a_404_or_a_405() {
        let page = exchange(b"GET /metrics HTTP/1.1\r\n\r\n").await;
        assert!(page.starts_with("HTTP/1.1 200 OK\r\n"), "{page}");
        assert!(page.ends_with("\r\n\r\nup 1\n"), "{page}");
        let missing = exchange(b"GET /nope HTTP/1.1\r\n\r\n").await;
        assert!(
            missing.starts_with("HTTP/1.1 404 Not Found\r\n"),
            "{missing}"
        );
        assert!(missing.ends_with("this serves GET /metrics\n"), "{missing}");
        let posted = exchange(b"POST /metrics HTTP/1.1\r\n\r\n").await;
        assert!(
            posted.starts_with("HTTP/1.1 405 Method Not Allowed\r\n"),
            "{posted}"
        );
    }

    #[tokio::test]
    async fn get_reads_what_a_server_answers() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr").to_string();
        let server = tokio::spawn(serve(listener, "GET /metrics", route));
        let answer = get(&addr, "/metrics").await.expect("get");
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(answer.ends_with("\r\n\r\nup 1\n"), "{answer}");
        server.abort();
    }
}
