//! `isomesh-broker`: the embedded MQTT broker of an isomesh mesh, a thin layer over [rmqtt].
//!
//! What the mesh needs from a broker: MQTT 3.1.1 and 5 on one port (as Mosquitto does, so
//! `mosquitto_pub` works as is), retained messages of module chunks and manifests that never
//! expire, Last Will for node status, shared subscriptions for tier job queues, and packets large
//! enough for photos and 256 KiB module chunks.
//!
//! Why rmqtt and not rumqttd: rumqttd 0.20.0 was measured to fail this mesh. A v5 PUBLISH with
//! any property delivered to a 3.1.1 subscriber panics the connection and poisons a lock after
//! which no 3.1.1 client may connect; v4 and v5 need separate listeners; a QoS 1 wildcard
//! subscription received 100 of 150 retained messages; it refuses keepalive 0. rmqtt 0.24 passes
//! our broker tests once its retainer and shared-subscription plugins are registered (without
//! them `$share/...` and retained messages silently do nothing) and its 1 MB packet and retained
//! payload limits are raised: [`run`] does both.
//!
//! Parts: [`config`] holds the settings (flags and `ISOMESH_*` variables); [`run`] (in `server`)
//! builds the rmqtt context, registers the plugins, binds the one listener and serves until the
//! caller's shutdown future completes; [`health`] is the CONNECT + PING check a container's
//! HEALTHCHECK runs. Who may connect and what they may touch: [`passwords`] and [`acl`] read
//! Mosquitto's file formats (one set of files serves both brokers), [`owner`] says which account
//! owns a client id, [`publishing`] what a publish or a will may carry beyond the ACL (retained
//! places, status tiers), and [`access`] enforces all of them through rmqtt's hooks; SIGHUP
//! reloads the files. [`session_rules`] puts back two MQTT 5 rules rmqtt leaves out (topic
//! aliases from clients; no session expiry given by a DISCONNECT to a session that asked for
//! none). [`cluster`] makes the broker a member of a cluster of isomesh-brokers (rmqtt's
//! broadcast cluster), so the mesh survives the loss of one. [`metrics`] serves the broker's
//! Prometheus page on `--metrics-listen`. The binary in `main.rs` only parses flags and calls
//! these.

pub mod access;
pub mod acl;
pub mod cluster;
pub mod config;
pub mod health;
pub mod metrics;
pub mod owner;
pub mod passwords;
pub mod publishing;
mod server;
pub mod session_rules;

pub use config::BrokerConfig;
pub use server::run;

/// Why the broker could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot listen on {addr}: {reason} (is another broker already using the port?)")]
    Listen {
        addr: std::net::SocketAddr,
        reason: String,
    },
    #[error("cannot serve TLS on {addr}: {reason} (--tls-cert must be a PEM certificate chain, --tls-key its PEM private key)")]
    Tls {
        addr: std::net::SocketAddr,
        reason: String,
    },
    #[error("cannot register the {plugin} plugin: {reason}")]
    Plugin {
        plugin: &'static str,
        reason: String,
    },
    #[error("cannot serve metrics on {addr} (--metrics-listen): {reason}")]
    Metrics {
        addr: std::net::SocketAddr,
        reason: String,
    },
    #[error("the broker stopped: {0}")]
    Serve(String),
    #[error(transparent)]
    Passwords(#[from] passwords::PasswordFileError),
    #[error(transparent)]
    Acl(#[from] acl::AclError),
    #[error(transparent)]
    Cluster(#[from] cluster::ClusterError),
    #[error("nobody could connect: give accounts with --password-file FILE (make them with `isomesh-broker passwd FILE USER`), or let clients in without one with --allow-anonymous (a demo or a closed network only)")]
    NoAccess,
}
