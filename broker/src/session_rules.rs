//! Two MQTT 5 rules of sessions and topic aliases that rmqtt 0.24 leaves out by default, put back
//! so isomesh-broker answers a client as Mosquitto does.
//!
//! - **Topic aliases, client to broker.** rmqtt accepts none unless its listener is told how
//!   many (its default is 0, so its CONNACK offers none), and a PUBLISH that names its topic by
//!   an alias alone was then dropped: the publisher got no error it could see and the subscribers
//!   nothing. The listener now offers [`TOPIC_ALIASES`], Mosquitto's default (`server::limits`).
//! - **A session that was to end at disconnect.** "If the Session Expiry Interval in the CONNECT
//!   packet was zero, then it is a Protocol Error to set a non-zero Session Expiry Interval in
//!   the DISCONNECT packet" (MQTT 5.0, 3.14.2.2.2), and the server must not treat it as a valid
//!   DISCONNECT. rmqtt took the DISCONNECT's interval as given and kept the session (and queued
//!   QoS 1 messages for it) though the client had asked for none when it connected. Here such a
//!   session ends at the disconnect, as with Mosquitto: [`session_expiry`] decides, and
//!   [`StandardFitterManager`] applies it through rmqtt's pluggable "fitter", the per-connection
//!   negotiator of these settings, otherwise left to rmqtt's own.

use rmqtt::fitter::{DefaultFitter, Fitter, FitterManager};
use rmqtt::types::{ConnectInfo, Disconnect, FitterType, Id, ListenerConfig};
use std::num::{NonZeroU16, NonZeroU32};
use std::sync::Arc;
use std::time::Duration;

/// Topic aliases a client may set per connection: Mosquitto's default (`max_topic_alias`).
pub const TOPIC_ALIASES: u16 = 10;

/// The session expiry interval to apply when a client disconnects, given the one of its CONNECT
/// (0 when absent) and the one of its DISCONNECT, if any; `None` keeps the CONNECT's (rmqtt's
/// rule then applies). A DISCONNECT may shorten or lengthen a non-zero interval, never give one
/// to a session its CONNECT said ends at disconnect.
pub fn session_expiry(connect_secs: u32, disconnect_secs: Option<u32>) -> Option<u32> {
    match disconnect_secs {
        Some(secs) if connect_secs == 0 && secs > 0 => {
            tracing::warn!(
                asked_s = secs,
                "a client set a session expiry in its DISCONNECT after asking for none in its CONNECT (a protocol error): its session ends now"
            );
            Some(0)
        }
        other => other,
    }
}

/// Makes a [`StandardFitter`] per connection.
pub struct StandardFitterManager;

impl FitterManager for StandardFitterManager {
    fn create(&self, conn_info: Arc<ConnectInfo>, id: Id, cfg: ListenerConfig) -> FitterType {
        let connect_expiry_secs = match conn_info.as_ref() {
            ConnectInfo::V5(_, connect) => Some(connect.session_expiry_interval_secs),
            ConnectInfo::V3(..) => None,
        };
        Arc::new(StandardFitter {
            rmqtt: DefaultFitter::new(conn_info, id, cfg),
            connect_expiry_secs,
        })
    }
}

/// rmqtt's negotiator, but for the session expiry of a DISCONNECT ([`session_expiry`]).
struct StandardFitter {
    rmqtt: DefaultFitter,
    /// The CONNECT's session expiry interval (MQTT 5 clients only).
    connect_expiry_secs: Option<u32>,
}

impl Fitter for StandardFitter {
    fn keep_alive(&self, keep_alive: &mut u16) -> rmqtt::Result<u16> {
        self.rmqtt.keep_alive(keep_alive)
    }

    fn max_mqueue_len(&self) -> usize {
        self.rmqtt.max_mqueue_len()
    }

    fn mqueue_rate_limit(&self) -> (NonZeroU32, Duration) {
        self.rmqtt.mqueue_rate_limit()
    }

    fn max_inflight(&self) -> NonZeroU16 {
        self.rmqtt.max_inflight()
    }

    fn session_expiry_interval(&self, d: Option<&Disconnect>) -> Duration {
        if let (Some(connect_secs), Some(Disconnect::V5(disconnect))) =
            (self.connect_expiry_secs, d)
        {
            if session_expiry(connect_secs, disconnect.session_expiry_interval_secs) == Some(0) {
                return Duration::ZERO;
            }
        }
        self.rmqtt.session_expiry_interval(d)
    }

    fn message_expiry_interval(&self, publish: &rmqtt::codec::types::Publish) -> Duration {
        self.rmqtt.message_expiry_interval(publish)
    }

    fn max_client_topic_aliases(&self) -> u16 {
        self.rmqtt.max_client_topic_aliases()
    }

    fn max_server_topic_aliases(&self) -> u16 {
        self.rmqtt.max_server_topic_aliases()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_disconnect_never_gives_an_expiry_to_a_session_that_asked_for_none() {
        assert_eq!(session_expiry(0, Some(30)), Some(0));
        assert_eq!(session_expiry(0, Some(0)), Some(0));
        assert_eq!(session_expiry(0, None), None);
    }

    #[test]
    fn a_disconnect_may_shorten_or_lengthen_a_session_that_had_one() {
        assert_eq!(session_expiry(60, Some(2)), Some(2));
        assert_eq!(session_expiry(60, Some(0)), Some(0));
        assert_eq!(session_expiry(60, Some(600)), Some(600));
        assert_eq!(session_expiry(60, None), None);
    }
}
