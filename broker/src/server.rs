//! Builds and runs the rmqtt server with the plugins and limits the mesh needs.
//!
//! One rmqtt TCP listener serves both protocol versions: rmqtt reads the CONNECT's protocol
//! level and hands the connection to its v3 (3.1/3.1.1) or v5 session code, so 3.1.1 and 5
//! clients share the port and each other's messages, as with Mosquitto.

use crate::{BrokerConfig, BrokerError};
use rmqtt::context::ServerContext;
use rmqtt::net::Builder;
use rmqtt::server::MqttServer;
use std::future::Future;
use std::num::NonZeroU16;

const RETAINER: &str = "rmqtt-retainer";
const SHARED_SUBSCRIPTION: &str = "rmqtt-shared-subscription";
/// Tier job queues: hand each job to the next member in turn (rmqtt's default, said aloud so
/// the plugin does not warn about a missing config).
const SHARED_SUBSCRIPTION_CONFIG: &str = "strategy = \"round_robin\"\n";

/// Reads the password and ACL files, refusing a setup nobody could connect to.
fn access_control(config: &BrokerConfig) -> Result<crate::access::AccessControl, BrokerError> {
    let passwords = match &config.password_file {
        Some(path) => Some(std::sync::Arc::new(crate::passwords::Passwords::read(
            path,
        )?)),
        None => None,
    };
    let acl = match &config.acl_file {
        Some(path) => Some(crate::acl::Acl::read(path)?),
        None => None,
    };
    if passwords.is_none() && !config.allow_anonymous {
        return Err(BrokerError::NoAccess);
    }
    Ok(crate::access::AccessControl {
        passwords,
        acl,
        allow_anonymous: config.allow_anonymous,
    })
}

/// Reads the password and ACL files again on every SIGHUP and puts them in force. A file that
/// cannot be used is logged (with its line) and the rules in force stay as they were: a typo
/// must not lock every node out, nor let everyone in.
#[cfg(unix)]
fn reload_on_sighup(config: BrokerConfig, shared: crate::access::Shared) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangups = match signal(SignalKind::hangup()) {
        Ok(hangups) => hangups,
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGHUP: the password and ACL files will not be reloaded");
            return;
        }
    };
    tokio::spawn(async move {
        while hangups.recv().await.is_some() {
            match access_control(&config) {
                Ok(access) => {
                    let accounts = access.passwords.as_ref().map(|p| p.len());
                    crate::access::replace(&shared, access);
                    tracing::info!(
                        password_file = %config.password_file.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "-".into()),
                        acl_file = %config.acl_file.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "-".into()),
                        accounts = accounts.unwrap_or_default(),
                        "reloaded the password and ACL files"
                    );
                }
                Err(e) => {
                    tracing::error!(error = %e, "SIGHUP: cannot reload, keeping the password and ACL files in force")
                }
            }
        }
    });
}

/// Serves MQTT on `config.listen` until `shutdown` completes.
pub async fn run(
    config: BrokerConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), BrokerError> {
    // Polled while a cluster member waits for its peers and then while serving.
    let mut shutdown = std::pin::pin!(shutdown);
    // Retained module chunks and manifests must outlive any TTL: they are the rollout's state.
    // rmqtt's retainer bounds their count and each one's size, not their total bytes: the
    // worst case is the product of the two.
    let retainer_config = format!(
        "max_retained_messages = {}\nmax_payload_size = \"{}B\"\nretained_message_ttl = \"0s\"\n",
        config.max_retained,
        config.max_retained_bytes.min(config.max_packet_bytes)
    );
    let access = access_control(&config)?;
    // Bound before anything else, so a wrong address stops the start instead of a later scrape.
    let metrics_listener =
        match config.metrics_listen {
            Some(addr) => Some(tokio::net::TcpListener::bind(addr).await.map_err(|e| {
                BrokerError::Metrics {
                    addr,
                    reason: e.to_string(),
                }
            })?),
            None => None,
        };
    let listen_error = |addr, reason: String| BrokerError::Listen { addr, reason };
    let cluster = config.cluster.cluster()?;
    let mut scx = ServerContext::new()
        .plugins_config_map_add(RETAINER, retainer_config)
        .plugins_config_map_add(SHARED_SUBSCRIPTION, SHARED_SUBSCRIPTION_CONFIG);
    if let Some(cluster) = &cluster {
        scx = scx
            .node_id(cluster.id)
            .circuit_breaker_config(crate::cluster::circuit_breaker())
            .plugins_config_map_add(crate::cluster::PLUGIN, cluster.plugin_config());
    }
    let scx = scx.build().await;
    *scx.extends.fitter_mgr_mut().await = Box::new(crate::session_rules::StandardFitterManager);
    rmqtt_plugins::retainer::register(&scx, true, false)
        .await
        .map_err(|e| BrokerError::Plugin {
            plugin: RETAINER,
            reason: e.to_string(),
        })?;
    rmqtt_plugins::shared_subscription::register(&scx, true, false)
        .await
        .map_err(|e| BrokerError::Plugin {
            plugin: SHARED_SUBSCRIPTION,
            reason: e.to_string(),
        })?;
    if let Some(cluster) = &cluster {
        // rmqtt serves the members' port from a task that only logs a failure to bind: bind it
        // once here first, so a port in use stops the start with an error that says so.
        let grpc = std::net::TcpListener::bind(cluster.listen)
            .map_err(|e| listen_error(cluster.listen, e.to_string()))?;
        drop(grpc);
        scx.node
            .start_grpc_server(scx.clone(), cluster.listen, true, false);
        // Join once the others listen, so rmqtt's links to them connect at the first try
        // (Cluster::wait_for_peers says why); clients are served only after that.
        let waiting: Vec<String> = cluster.peers().map(ToString::to_string).collect();
        tracing::info!(members = %waiting.join(","), "waiting for the other cluster members to listen");
        let missing = tokio::select! {
            missing = cluster.wait_for_peers(crate::cluster::JOIN_WAIT) => missing,
            _ = &mut shutdown => {
                tracing::info!("isomesh-broker stopping on request, before it joined the cluster");
                return Ok(());
            }
        };
        if missing.is_empty() {
            tracing::info!("every other cluster member listens: joining");
        } else {
            let missing: Vec<String> = missing.iter().map(ToString::to_string).collect();
            tracing::warn!(
                missing = %missing.join(","),
                "cluster members not listening after {:?}: joining without them; until one starts and the link to it connects (every 3 s), messages for its clients are dropped",
                crate::cluster::JOIN_WAIT
            );
        }
        rmqtt_cluster_broadcast::register(&scx, true, false)
            .await
            .map_err(|e| BrokerError::Plugin {
                plugin: crate::cluster::PLUGIN,
                reason: e.to_string(),
            })?;
    }
    let secured = access.passwords.is_some() || access.acl.is_some();
    if access.passwords.is_none() && access.acl.is_some() && config.allow_anonymous {
        tracing::warn!("--acl-file with --allow-anonymous and no --password-file: usernames are whatever clients claim, so anyone who reaches this port can take any role of the ACL (rollout included); add --password-file");
    }
    if secured {
        let shared: crate::access::Shared =
            std::sync::Arc::new(std::sync::RwLock::new(std::sync::Arc::new(access)));
        #[cfg(unix)]
        reload_on_sighup(config.clone(), shared.clone());
        crate::access::register(&scx, shared).await;
    }
    // Port 0 picks a free port: the log says which.
    let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());
    if let Some(listener) = metrics_listener {
        let counters = std::sync::Arc::new(crate::metrics::Counters::default());
        crate::metrics::register(&scx, counters.clone()).await;
        // The task ends with the runtime, when the broker stops.
        tokio::spawn(crate::metrics::serve(listener, scx.clone(), counters));
    }
    let mut server = MqttServer::new(scx);
    if !config.tls_only {
        let listener = limits(
            &config,
            secured,
            Builder::new().name("mqtt/tcp").laddr(config.listen),
        )
        .bind()
        .map_err(|e| listen_error(config.listen, e.to_string()))?
        .tcp()
        .map_err(|e| listen_error(config.listen, e.to_string()))?;
        server = server.listener(listener);
    }
    if let Some(addr) = config.tls_listen {
        let builder = limits(
            &config,
            secured,
            Builder::new().name("mqtt/tls").laddr(addr),
        )
        .tls_cert(config.tls_cert.as_ref().map(|p| p.display().to_string()))
        .tls_key(config.tls_key.as_ref().map(|p| p.display().to_string()))
        .tls_cross_certificate(config.tls_client_ca.is_some())
        .tls_client_ca_certs(
            config
                .tls_client_ca
                .as_ref()
                .map(|p| p.display().to_string()),
        );
        let listener = builder
            .bind()
            .map_err(|e| listen_error(addr, e.to_string()))?
            .tls()
            .map_err(|e| BrokerError::Tls {
                addr,
                reason: format!("{e:#}"),
            })?;
        server = server.listener(listener);
    }
    tracing::info!(
        listen = %if config.tls_only { "-".to_string() } else { config.listen.to_string() },
        tls_listen = %config.tls_listen.map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
        client_certificates = config.tls_client_ca.is_some(),
        max_packet_bytes = config.max_packet_bytes,
        max_queue = config.max_queue,
        max_retained = config.max_retained,
        max_retained_bytes = config.max_retained_bytes,
        metrics_listen = %metrics_addr.map(|a| a.to_string()).unwrap_or_else(|| "-".into()),
        password_file = %config.password_file.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "-".into()),
        acl_file = %config.acl_file.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "-".into()),
        allow_anonymous = config.allow_anonymous,
        cluster_id = cluster.as_ref().map_or(0, |c| c.id),
        cluster_listen = %cluster.as_ref().map(|c| c.listen.to_string()).unwrap_or_else(|| "-".into()),
        cluster_members = %cluster.as_ref().map(|c| c.members.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")).unwrap_or_else(|| "-".into()),
        "isomesh-broker serving MQTT 3.1.1 and 5"
    );
    if config.allow_anonymous && !secured {
        tracing::warn!("anonymous access with no ACL: anyone who reaches this port may publish modules and jobs; use --password-file and --acl-file outside a demo");
    }
    let server = server.build();
    tokio::select! {
        served = server.run() => served.map_err(|e| BrokerError::Serve(e.to_string())),
        _ = &mut shutdown => {
            // Dropping the server closes the listener; sessions end when the runtime stops.
            tracing::info!("isomesh-broker stopping on request");
            Ok(())
        }
    }
}

/// The limits and socket options every listener shares. With access control on (`secured`)
/// the listener lets no one in by itself: rmqtt would skip the authentication hook for clients
/// without a username, and [`crate::access`] must see their client id and will too.
fn limits(config: &BrokerConfig, secured: bool, builder: Builder) -> Builder {
    builder
        .max_packet_size(config.max_packet_bytes)
        .max_inflight(NonZeroU16::new(config.max_inflight.max(1)).unwrap_or(NonZeroU16::MIN))
        .max_mqueue_len(config.max_queue)
        .message_expiry_interval(config.message_expiry())
        .max_topic_aliases(crate::session_rules::TOPIC_ALIASES)
        .allow_zero_keepalive(true)
        .allow_anonymous(config.allow_anonymous && !secured)
        // Replies and job hand-offs are small packets: do not let Nagle hold them back.
        .nodelay(true)
        // A restarted broker must get its port back while the old connections sit in TIME_WAIT.
        .reuseaddr(Some(true))
}
