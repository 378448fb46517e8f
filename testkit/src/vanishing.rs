//! A broker's host that vanishes: a TCP proxy in front of a real broker which, once its clients
//! have sent it a given number of bytes, stops as a host does when its power is cut. From then on
//! it reads nothing and writes nothing, on the connections it holds and on new ones, and closes
//! nothing: no FIN, no RST. A client that goes on sending fills its socket and waits there, the
//! way nodes waited for minutes in compose when the container of their broker was killed in the
//! middle of a burst.
//!
//! (`docker network disconnect` or killing a container does this for real, but only in the
//! container tests; the proxy lets the process tests put a client in the same state.)

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// The proxy's receive buffer per connection. Small, so that once it stops reading, a client's
/// own send buffer (up to 4 MiB by Linux's default) is what fills, after a few MB, instead of
/// the proxy's autotuned receive buffer (up to 32 MiB here).
const RECEIVE_BUFFER: u32 = 64 * 1024;

/// A running proxy; dropping it drops every connection it holds.
pub struct VanishingHost {
    port: u16,
    vanished: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for VanishingHost {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl VanishingHost {
    /// Listens on a free port of 127.0.0.1 and forwards each connection to the broker at
    /// `broker_port` there, until its clients have sent `after_bytes` in all.
    pub async fn start(broker_port: u16, after_bytes: u64) -> VanishingHost {
        let socket = TcpSocket::new_v4().expect("a TCP socket");
        // Accepted connections inherit it.
        socket
            .set_recv_buffer_size(RECEIVE_BUFFER)
            .expect("set the receive buffer");
        socket
            .bind("127.0.0.1:0".parse().expect("an address"))
            .expect("bind the proxy");
        let listener = socket.listen(64).expect("listen");
        let port = listener.local_addr().expect("the proxy's address").port();
        let (vanish, vanished) = watch::channel(false);
        let vanish = Arc::new(vanish);
        let sent = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn(async move {
            // Owned here: aborting the task drops them all.
            let mut connections = JoinSet::new();
            while let Ok((client, _)) = listener.accept().await {
                let (vanish, sent) = (vanish.clone(), sent.clone());
                connections.spawn(async move {
                    if *vanish.borrow() {
                        // Gone: the connection is held and nothing ever answers.
                        return hold(client).await;
                    }
                    let Ok(broker) = TcpStream::connect(("127.0.0.1", broker_port)).await else {
                        return;
                    };
                    let (client_read, client_write) = client.into_split();
                    let (broker_read, broker_write) = broker.into_split();
                    let up = copy(
                        client_read,
                        broker_write,
                        vanish.clone(),
                        Some((sent, after_bytes)),
                    );
                    let down = copy(broker_read, client_write, vanish, None);
                    tokio::join!(up, down);
                });
            }
        });
        VanishingHost {
            port,
            vanished,
            task,
        }
    }

    /// The URL a client connects to.
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Whether the host has vanished yet.
    pub fn has_vanished(&self) -> bool {
        *self.vanished.borrow()
    }
}

/// Holds a connection open forever, reading and writing nothing.
async fn hold<T>(connection: T) {
    std::future::pending::<()>().await;
    drop(connection);
}

/// Copies `from` to `to` until the host vanishes, then holds both ends. The client-to-broker
/// side counts the bytes in `sent` and makes the host vanish once they reach the limit.
async fn copy(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    vanish: Arc<watch::Sender<bool>>,
    counted: Option<(Arc<AtomicU64>, u64)>,
) {
    let mut gone = vanish.subscribe();
    let mut buffer = vec![0u8; 16 * 1024];
    loop {
        let read = tokio::select! {
            biased;
            _ = gone.wait_for(|gone| *gone) => break,
            read = from.read(&mut buffer) => read,
        };
        let n = match read {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if *vanish.borrow() || to.write_all(&buffer[..n]).await.is_err() {
            break;
        }
        if let Some((sent, limit)) = &counted {
            if sent.fetch_add(n as u64, Ordering::Relaxed) + n as u64 >= *limit {
                vanish.send_replace(true);
            }
        }
    }
    hold((from, to)).await
}
