//! Broker settings, from flags or `ISOMESH_*` environment variables (flags win). `main` flattens
//! [`BrokerConfig`] into its clap parser; embedders (tests, other binaries) may build it directly.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Settings of one broker.
#[derive(Debug, Clone, clap::Args)]
pub struct BrokerConfig {
    /// Address to accept MQTT 3.1.1 and 5 clients on. Default `0.0.0.0:1883`.
    #[arg(long, env = "ISOMESH_LISTEN", default_value = "0.0.0.0:1883")]
    pub listen: SocketAddr,

    /// Largest MQTT packet (and retained payload) accepted, bytes. Default 16 MiB: photos and
    /// 256 KiB module chunks fit with room to spare.
    #[arg(long, env = "ISOMESH_MAX_PACKET_BYTES", default_value_t = 16 << 20)]
    pub max_packet_bytes: u32,

    /// Unacknowledged QoS 1/2 messages in flight per client. Default 128.
    #[arg(long, env = "ISOMESH_MAX_INFLIGHT", default_value_t = 128)]
    pub max_inflight: u16,

    /// Messages queued per client (offline persistent sessions included) before new ones are
    /// dropped. rmqtt counts messages, not bytes, so this bounds memory only with
    /// --max-packet-bytes: 1 000 photos of ~100 KB are ~100 MB per stalled client. Default 1 000.
    #[arg(long, env = "ISOMESH_MAX_QUEUE", default_value_t = 1_000)]
    pub max_queue: usize,

    /// Retained messages the broker keeps, all topics together; past it new retained messages
    /// are not stored. Default 10 000 (a rollout retains one manifest and ~60 chunks per
    /// module version; each node one status). 0: unlimited.
    #[arg(long, env = "ISOMESH_MAX_RETAINED", default_value_t = 10_000)]
    pub max_retained: usize,

    /// Largest retained payload kept, bytes (larger ones are delivered but not retained).
    /// Default 5 MiB: module chunks are 256 KiB, and `isomesh rollout --chunk-size` allows 4 MiB
    /// at most (plus the chunk's protobuf fields).
    #[arg(long, env = "ISOMESH_MAX_RETAINED_BYTES", default_value_t = 5 << 20)]
    pub max_retained_bytes: u32,

    /// How long an undelivered message waits in a persistent session, seconds. Default one day.
    /// Retained messages never expire, whatever this says.
    #[arg(long, env = "ISOMESH_MESSAGE_EXPIRY_S", default_value_t = 24 * 3600)]
    pub message_expiry_s: u64,

    /// Accounts: a password file in Mosquitto's format (`isomesh-broker passwd FILE USER`, or
    /// mosquitto_passwd). Clients must then log in with a username and password.
    #[arg(long, env = "ISOMESH_PASSWORD_FILE")]
    pub password_file: Option<PathBuf>,

    /// What each account may publish and subscribe to: an ACL file in Mosquitto's format (see
    /// deploy/acl.conf for the mesh's roles). Without one, every client may do everything.
    #[arg(long, env = "ISOMESH_ACL_FILE")]
    pub acl_file: Option<PathBuf>,

    /// Also serve MQTT over TLS on this address (MQTT 3.1.1 and 5, e.g. `0.0.0.0:8883`); needs
    /// --tls-cert and --tls-key.
    #[arg(long, env = "ISOMESH_TLS_LISTEN", requires_all = ["tls_cert", "tls_key"])]
    pub tls_listen: Option<SocketAddr>,

    /// The TLS listener's certificate chain (PEM).
    #[arg(long, env = "ISOMESH_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,

    /// The TLS listener's private key (PEM).
    #[arg(long, env = "ISOMESH_TLS_KEY")]
    pub tls_key: Option<PathBuf>,

    /// Require TLS clients to present a certificate signed by one of these CAs (PEM).
    #[arg(long, env = "ISOMESH_TLS_CLIENT_CA", requires = "tls_listen")]
    pub tls_client_ca: Option<PathBuf>,

    /// Serve only the TLS listener: no plain MQTT on --listen.
    #[arg(long, env = "ISOMESH_TLS_ONLY", requires = "tls_listen")]
    pub tls_only: bool,

    /// Serve Prometheus metrics on this address (`GET /metrics`; `GET /healthz` answers 200),
    /// e.g. `127.0.0.1:9101`: connections, messages received, delivered and dropped (by reason),
    /// queued and retained messages. Off by default. Its variable is not the node's
    /// `ISOMESH_METRICS_LISTEN`, so a broker and a node started from one shell do not both
    /// claim the same port.
    #[arg(long, env = "ISOMESH_BROKER_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// Let clients in without a username (they get the ACL's anonymous rules, if any). Off by
    /// default: only for a demo or a network nobody else can reach.
    #[arg(long, env = "ISOMESH_ALLOW_ANONYMOUS")]
    pub allow_anonymous: bool,

    /// Membership of a cluster of isomesh-brokers ([`crate::cluster`]); none by default.
    #[command(flatten)]
    pub cluster: crate::cluster::ClusterConfig,
}

impl BrokerConfig {
    /// [`BrokerConfig::message_expiry_s`] as a duration.
    pub fn message_expiry(&self) -> Duration {
        Duration::from_secs(self.message_expiry_s)
    }
}
