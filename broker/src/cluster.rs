//! Several isomesh-brokers as one broker: rmqtt's broadcast cluster, so the mesh survives the
//! loss of a member.
//!
//! Each member is an ordinary isomesh-broker given `--cluster-id`, `--cluster-listen` (where
//! the other members reach it) and `--cluster-members` (every member as `ID@HOST:PORT`). The
//! members talk gRPC (rmqtt's own protocol) and, with rmqtt's `rmqtt-cluster-broadcast` plugin:
//!
//! - **route publishes**: a message published on one member reaches subscribers on every
//!   member, shared subscriptions (the tiers' job queues) included, each job to one subscriber
//!   of the whole cluster;
//! - **copy retained messages**: a retained message set on one member is sent to the others, and
//!   a member that starts (or restarts) copies the retained messages of the others, so module
//!   chunks, manifests and statuses are found on whichever member a node connects to;
//! - **move sessions**: a client that connects to a member while its persistent session lives on
//!   another takes the session over (subscriptions and queued messages), as on one broker.
//!
//! What a member's loss costs: the sessions that lived on it and their queued messages (a node
//! that moves to another member starts a new session and subscribes again; jobs queued for it
//! there are answered by no one, so cameras ask again for unanswered jobs: `isomesh camera
//! --ask-again-after-s`). Retained messages survive on the other members.
//!
//! Why broadcast and not rmqtt's raft cluster: raft in rmqtt 0.24 adds 53 crates, among them a
//! C++ build of protobuf (3 min here) and compression libraries, and its retained messages need
//! a redis the mesh would have to run beside it; broadcast needs neither. Its consistency is
//! eventual: a member cut off from the others keeps serving its own clients and catches up on
//! retained messages when it starts again.
//!
//! The gRPC port has no authentication of its own: whoever reaches it speaks for a member. Keep
//! it on a network only the members reach (compose's cluster network), never on the clients'.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

/// rmqtt's name for the plugin (and its config entry).
pub const PLUGIN: &str = "rmqtt-cluster-broadcast";

/// A member of the cluster: its id and the address the other members reach its gRPC port on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: u64,
    /// `HOST:PORT`; a host name is resolved when the member is first reached.
    pub addr: String,
}

/// Why a `--cluster-members` entry or the cluster settings are not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    #[error("cluster member {0:?}: expected ID@HOST:PORT, e.g. 2@broker2:5363 (ID a whole number from 1)")]
    Member(String),
    #[error(
        "--cluster-members names member {id} twice ({first} and {second}); give each member one id"
    )]
    Duplicate {
        id: u64,
        first: String,
        second: String,
    },
    #[error("--cluster-members does not name this member's id {id} (--cluster-id); list every member, this one included")]
    NotListed { id: u64 },
    #[error("--cluster-members lists only this member: give the others too (a cluster of one is a plain broker: leave out the --cluster-* flags)")]
    Alone,
}

impl FromStr for Member {
    type Err = ClusterError;

    fn from_str(s: &str) -> Result<Member, ClusterError> {
        let bad = || ClusterError::Member(s.to_string());
        let (id, addr) = s.trim().split_once('@').ok_or_else(bad)?;
        let id: u64 = id.parse().map_err(|_| bad())?;
        let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
        if id == 0 || host.is_empty() || port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(bad());
        }
        Ok(Member {
            id,
            addr: addr.to_string(),
        })
    }
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.id, self.addr)
    }
}

/// The cluster flags of a broker. With none given, the broker runs alone.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ClusterConfig {
    /// Run as member ID (1, 2, ...) of a cluster of isomesh-brokers; needs --cluster-listen and
    /// --cluster-members.
    #[arg(
        long,
        env = "ISOMESH_CLUSTER_ID",
        requires_all = ["cluster_listen", "cluster_members"]
    )]
    pub cluster_id: Option<u64>,

    /// Address to serve the cluster's own traffic (gRPC) on, e.g. `0.0.0.0:5363`. It has no
    /// authentication: only the members' network may reach it.
    #[arg(long, env = "ISOMESH_CLUSTER_LISTEN", requires = "cluster_id")]
    pub cluster_listen: Option<SocketAddr>,

    /// Every member of the cluster, this one included: `ID@HOST:PORT,ID@HOST:PORT,...`, each
    /// with the address the others reach its --cluster-listen on.
    #[arg(
        long,
        env = "ISOMESH_CLUSTER_MEMBERS",
        value_delimiter = ',',
        requires = "cluster_id"
    )]
    pub cluster_members: Vec<Member>,
}

/// A checked cluster setup: this member and all of them.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub id: u64,
    pub listen: SocketAddr,
    pub members: Vec<Member>,
}

impl ClusterConfig {
    /// The cluster this broker is a member of, or `None` for a broker on its own.
    pub fn cluster(&self) -> Result<Option<Cluster>, ClusterError> {
        let (Some(id), Some(listen)) = (self.cluster_id, self.cluster_listen) else {
            return Ok(None);
        };
        for (i, member) in self.cluster_members.iter().enumerate() {
            if let Some(other) = self.cluster_members[..i].iter().find(|m| m.id == member.id) {
                return Err(ClusterError::Duplicate {
                    id: member.id,
                    first: other.addr.clone(),
                    second: member.addr.clone(),
                });
            }
        }
        if !self.cluster_members.iter().any(|m| m.id == id) {
            return Err(ClusterError::NotListed { id });
        }
        if self.cluster_members.len() < 2 {
            return Err(ClusterError::Alone);
        }
        Ok(Some(Cluster {
            id,
            listen,
            members: self.cluster_members.clone(),
        }))
    }
}

impl Cluster {
    /// The plugin's configuration (TOML, as rmqtt reads it), with [`PEER_TIMEOUT`].
    pub fn plugin_config(&self) -> String {
        let members: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{:?}", m.to_string()))
            .collect();
        format!(
            "node_grpc_addrs = [{}]\nnode_grpc_client_timeout = \"{}ms\"\n",
            members.join(", "),
            PEER_TIMEOUT.as_millis()
        )
    }
}

/// How long a member waits for another to take a message.
///
/// Every publish is offered to every other member, and its PUBACK waits for their replies: with a
/// member gone, each publish on the others waited this long (rmqtt's default, 60 s) until the
/// [`circuit_breaker`] opened. Members on one LAN answer in milliseconds, so a few seconds is ample.
pub const PEER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(2);

/// When a member stops waiting for another that does not answer: when at least half of the
/// messages of the last [`BREAKER_WINDOW`] failed (two at least), for [`BREAKER_OPEN`]; then one
/// message tries it again. The window spans three [`PEER_TIMEOUT`]s, so a member whose clients
/// publish little (one node, its statuses and answers each waiting in turn) still sees enough
/// failures in it to stop waiting; with a shorter one it never did, and its node's publishes
/// waited 2 s each until the test's end (measured in compose).
///
/// A window of time, not of calls: rmqtt's count-based window (tower-resilience 0.10) counts
/// every call since the breaker last changed state, so after a healthy hour it took as many
/// failures as there had been successes to open, and meanwhile every publish on the survivors
/// waited [`PEER_TIMEOUT`] (measured in compose: clients' pings went unanswered for 15 s and more
/// after a member was killed). rmqtt's default (a 45 s window, ten calls, 30 s open) likewise
/// held publishers for the first ten failures.
pub fn circuit_breaker() -> rmqtt::context::CircuitBreakerConfig {
    rmqtt::context::CircuitBreakerConfig {
        failure_rate_threshold: 0.5,
        window: rmqtt::context::WindowConfig::TimeBased(rmqtt::context::TimeBasedWindowConfig {
            sliding_window_duration: BREAKER_WINDOW,
            ..Default::default()
        }),
        minimum_number_of_calls: 2,
        wait_duration_in_open: BREAKER_OPEN,
        ..Default::default()
    }
}

/// The span of recent messages the breaker judges a member by.
pub const BREAKER_WINDOW: std::time::Duration = std::time::Duration::from_secs(6);

/// How long a member that failed stays skipped before it is tried again.
pub const BREAKER_OPEN: std::time::Duration = std::time::Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;

    fn config(id: u64, members: &str) -> ClusterConfig {
        ClusterConfig {
            cluster_id: Some(id),
            cluster_listen: Some("0.0.0.0:5363".parse().expect("an address")),
            cluster_members: members
                .split(',')
                .map(|m| m.parse().expect("a member"))
                .collect(),
        }
    }

    #[test]
    fn members_are_id_at_host_and_port() {
        let member: Member = "2@broker2:5363".parse().expect("a member");
        assert_eq!(member.id, 2);
        assert_eq!(member.addr, "broker2:5363");
        assert_eq!(member.to_string(), "2@broker2:5363");
        for bad in [
            "broker2:5363",
            "0@broker2:5363",
            "x@broker2:5363",
            "2@broker2",
            "2@:5363",
            "2@broker2:0",
            "2@broker2:99999",
        ] {
            assert_eq!(
                bad.parse::<Member>(),
                Err(ClusterError::Member(bad.into())),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_cluster_lists_this_member_and_another_each_once() {
        let cluster = config(1, "1@a:5363,2@b:5363,3@c:5363")
            .cluster()
            .expect("valid")
            .expect("a cluster");
        assert_eq!(cluster.members.len(), 3);
        assert_eq!(
            config(4, "1@a:5363,2@b:5363").cluster().unwrap_err(),
            ClusterError::NotListed { id: 4 }
        );
        assert_eq!(
            config(1, "1@a:5363").cluster().unwrap_err(),
            ClusterError::Alone
        );
        assert!(matches!(
            config(1, "1@a:5363,1@b:5363").cluster(),
            Err(ClusterError::Duplicate { id: 1, .. })
        ));
        assert!(ClusterConfig::default().cluster().expect("alone").is_none());
    }

    #[test]
    fn the_plugin_config_names_every_member() {
        let cluster = config(2, "1@a:5363,2@b:5364")
            .cluster()
            .expect("valid")
            .expect("a cluster");
        assert_eq!(
            cluster.plugin_config(),
            "node_grpc_addrs = [\"1@a:5363\", \"2@b:5364\"]\nnode_grpc_client_timeout = \"2000ms\"\n"
        );
    }
}
