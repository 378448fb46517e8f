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

    /// The other members, those this one sends to.
    pub fn peers(&self) -> impl Iterator<Item = &Member> {
        self.members.iter().filter(move |m| m.id != self.id)
    }

    /// Waits until every other member's cluster port accepts a connection, or `within` passes,
    /// and returns the members that never did.
    ///
    /// Why a member waits before it joins: rmqtt opens its link to each peer once, when the
    /// cluster starts, and a link that finds no one listening tries again only 3 s later.
    /// Meanwhile every message for that peer waits [`PEER_TIMEOUT`] and fails, two such failures
    /// open the [`circuit_breaker`], and for [`BREAKER_OPEN`] after that the peer gets nothing:
    /// answers published on the member that started first do not reach clients on the last one
    /// (the likely cause of a CI failure: members started one after another, and the jobs
    /// answered by the node on the first member, half of a tier's, went unanswered). Members that start together (compose) each wait until the others listen;
    /// one that starts while another is down waits `within` and joins without it.
    pub async fn wait_for_peers(&self, within: std::time::Duration) -> Vec<Member> {
        let deadline = tokio::time::Instant::now() + within;
        let mut waiting: Vec<Member> = self.peers().cloned().collect();
        loop {
            let mut still = Vec::new();
            for member in waiting {
                let probe = tokio::net::TcpStream::connect(member.addr.as_str());
                let listening = tokio::time::timeout(PROBE_TIMEOUT, probe)
                    .await
                    .is_ok_and(|connected| connected.is_ok());
                if !listening {
                    still.push(member);
                }
            }
            waiting = still;
            if waiting.is_empty() || tokio::time::Instant::now() >= deadline {
                return waiting;
            }
            tokio::time::sleep(PROBE_INTERVAL).await;
        }
    }
}

/// How long a starting member waits for the others' cluster ports before it joins without
/// them ([`Cluster::wait_for_peers`]): members started together listen within a second or
/// two of each other; a member missing after this is taken to be down.
pub const JOIN_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long one probe of a member's port may take (a host that drops packets never refuses).
const PROBE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(1);

/// How often a starting member probes the ports of members not listening yet.
const PROBE_INTERVAL: std::time::Duration = std::time::Duration::from_millis(100);

/// How long a member waits for another to take a message.
///
/// Every publish is offered to every other member, and its PUBACK waits for their replies: with a
/// member gone, each publish on the others waited this long (rmqtt's default, 60 s) until the
/// [`circuit_breaker`] opened. Members on one LAN answer in milliseconds, so a few seconds is ample.
///
/// Not longer: a node that moves to a survivor waits this long on its first publishes there
/// (each is offered to the dead member too, until the breaker opens), and with 4 s its check for
/// the module's retained manifest (3-5 s after connecting) came up empty, so it published its
/// 29 MB of chunks again while jobs waited (measured in compose: back in 5.8 s instead of
/// 1.2 s, jobs lost). Not shorter: the same timeout bounds the copy of every retained message
/// a restarted member asks its peers for, tens of MB in one reply.
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
    use std::time::Duration;

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

    /// Members on real sockets: one listening, one that starts listening a moment later, and
    /// one that never does.
    #[tokio::test]
    async fn a_starting_member_waits_for_peers_that_listen_and_names_those_that_do_not() {
        let listening = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a port");
        let late = std::net::TcpListener::bind("127.0.0.1:0").expect("a port");
        let late_addr = late.local_addr().expect("an address");
        // Bound and closed again: nothing listens there.
        let absent_addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("an address");
        drop(late);
        // Member 1 (this one, never probed) with member 2 listening and member 3 at `third`.
        let listening_addr = listening.local_addr().expect("an address");
        let cluster_with = |third: std::net::SocketAddr| {
            config(1, &format!("1@127.0.0.1:1,2@{listening_addr},3@{third}"))
                .cluster()
                .expect("valid")
                .expect("a cluster")
        };
        let cluster = cluster_with(late_addr);
        let waited =
            tokio::spawn(async move { cluster.wait_for_peers(Duration::from_secs(30)).await });
        // Member 3 starts while member 1 is already waiting for it (several probes in).
        tokio::time::sleep(PROBE_INTERVAL * 3).await;
        let _late_listener = tokio::net::TcpListener::bind(late_addr)
            .await
            .expect("the late member's port again");
        assert_eq!(waited.await.expect("the wait"), Vec::<Member>::new());

        let missing = cluster_with(absent_addr)
            .wait_for_peers(Duration::from_millis(300))
            .await;
        assert_eq!(
            missing,
            vec![Member {
                id: 3,
                addr: absent_addr.to_string()
            }]
        );
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
