//! What a publish (or a Last Will, which is a publish made later on the client's behalf) may
//! carry, beyond the ACL's topic rules. Applies only with an ACL on.
//!
//! - **Retained messages** live in the broker's memory until cleared, so they are a way for any
//!   account to fill it. The mesh retains in two places only: module manifests and chunks
//!   (`isomesh/modules/#`) and node statuses (`isomesh/status/#`). A retained publish anywhere
//!   else is refused.
//! - **Statuses** carry the node's tier, and peers route jobs by it: a device account claiming
//!   to be a cloud node would draw the cloud's offloaded jobs. A status is accepted only if its
//!   account may take the claimed tier's jobs, that is subscribe to
//!   `isomesh/jobs/tier/{tier}` (its role in deploy/acl.conf). An empty payload (clearing a
//!   retained status) carries no claim and stays allowed.
//!
//! [`check`] returns why a publish is refused, for the log and the MQTT 5 reason string.

use crate::acl::{filter_matches, Acl, Client};
use isomesh_protos::{NodeStatus, Tier};

/// Where the mesh keeps retained messages.
pub const RETAINED_PLACES: [&str; 2] = ["isomesh/modules/#", "isomesh/status/#"];

/// Statuses: `isomesh/status/{node}`.
const STATUS_TOPICS: &str = "isomesh/status/+";

/// What is being published: a PUBLISH packet or a CONNECT's will.
#[derive(Debug, Clone, Copy)]
pub struct Message<'a> {
    pub topic: &'a str,
    pub retain: bool,
    pub payload: &'a [u8],
}

/// Why `client` may not publish `message` under `acl`; `None` when it may.
pub fn check(acl: &Acl, client: Client<'_>, message: Message<'_>) -> Option<String> {
    let topic = message.topic;
    if !acl.may_publish(client, topic) {
        return Some(format!("not authorized to publish to {topic}"));
    }
    if message.retain && !RETAINED_PLACES.iter().any(|f| filter_matches(f, topic)) {
        return Some(format!(
            "not authorized to retain a message on {topic}: only {} may be retained",
            RETAINED_PLACES.join(" and ")
        ));
    }
    if filter_matches(STATUS_TOPICS, topic) && !message.payload.is_empty() {
        return status_refusal(acl, client, message.payload);
    }
    None
}

/// Why the status `payload` may not come from `client`.
fn status_refusal(acl: &Acl, client: Client<'_>, payload: &[u8]) -> Option<String> {
    let status: NodeStatus = match prost::Message::decode(payload) {
        Ok(status) => status,
        Err(e) => return Some(format!("a status that is not a NodeStatus: {e}")),
    };
    let tier = Tier::try_from(status.tier).unwrap_or(Tier::Unspecified);
    if tier == Tier::Unspecified {
        return Some("a status without a tier".into());
    }
    let queue = format!("isomesh/jobs/tier/{}", tier.name());
    if acl.may_subscribe(client, &queue) {
        None
    } else {
        Some(format!(
            "a status claiming tier {} from an account that may not take {queue}",
            tier.name()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    const ROLES: &str = "\
user d1
topic read isomesh/jobs/tier/device
topic write isomesh/status/d1
topic write isomesh/results/#
user camera
topic write isomesh/images/#
user rollout
topic write isomesh/modules/#
";

    fn status(tier: Tier) -> Vec<u8> {
        prost::Message::encode_to_vec(&NodeStatus {
            node_id: "d1".into(),
            tier: tier as i32,
            online: true,
            ..Default::default()
        })
    }

    fn client(user: &str) -> Client<'_> {
        Client {
            username: Some(user),
            client_id: "x",
        }
    }

    #[test]
    fn retained_messages_only_where_the_mesh_keeps_them() {
        let acl = Acl::parse(Path::new("acl"), ROLES).unwrap();
        let photo = |retain| Message {
            topic: "isomesh/images/d1",
            retain,
            payload: b"jpeg",
        };
        assert_eq!(check(&acl, client("camera"), photo(false)), None);
        let refused = check(&acl, client("camera"), photo(true)).unwrap();
        assert!(refused.contains("retain"), "{refused}");
        let manifest = Message {
            topic: "isomesh/modules/m/manifest",
            retain: true,
            payload: b"m",
        };
        assert_eq!(check(&acl, client("rollout"), manifest), None);
        let result = Message {
            topic: "isomesh/results/r",
            retain: true,
            payload: b"",
        };
        assert!(check(&acl, client("d1"), result).is_some());
    }

    #[test]
    fn a_status_may_claim_only_the_accounts_tier() {
        let acl = Acl::parse(Path::new("acl"), ROLES).unwrap();
        let claim = |payload: &[u8]| {
            check(
                &acl,
                client("d1"),
                Message {
                    topic: "isomesh/status/d1",
                    retain: true,
                    payload,
                },
            )
        };
        assert_eq!(claim(&status(Tier::Device)), None);
        let cloud = claim(&status(Tier::Cloud)).unwrap();
        assert!(cloud.contains("tier cloud"), "{cloud}");
        assert!(claim(&status(Tier::Unspecified)).is_some());
        assert!(claim(b"\xff\xff not protobuf").is_some());
        // Clearing a retained status claims nothing.
        assert_eq!(claim(b""), None);
    }
}
