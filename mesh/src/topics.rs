//! The MQTT topic layout of the public contract (DESIGN.md), in one place.
//!
//! Every topic starts with a configurable prefix (`isomesh` by default) so several meshes can
//! share one broker.

use isomesh_protos::Tier;

/// Builds the topics of one mesh.
#[derive(Debug, Clone)]
pub struct Topics {
    prefix: String,
}

impl Topics {
    pub fn new(prefix: impl Into<String>) -> Topics {
        Topics {
            prefix: prefix.into(),
        }
    }

    /// Raw JPEG/PNG bytes for one node; JSON result.
    pub fn images(&self, node: &str) -> String {
        format!("{}/images/{node}", self.prefix)
    }

    /// Protobuf `Job` for one node; protobuf `JobResult` to `reply_to`.
    pub fn jobs(&self, node: &str) -> String {
        format!("{}/jobs/{node}", self.prefix)
    }

    /// Protobuf `Job` for any node of a tier.
    pub fn tier_jobs(&self, tier: Tier) -> String {
        format!("{}/jobs/tier/{}", self.prefix, tier.name())
    }

    /// The shared subscription through which the nodes of a tier split its jobs.
    pub fn shared_tier_jobs(&self, tier: Tier) -> String {
        format!("$share/{}/{}", tier.name(), self.tier_jobs(tier))
    }

    /// Where results go when the request named no reply topic.
    pub fn results(&self, node: &str) -> String {
        format!("{}/results/{node}", self.prefix)
    }

    /// Retained `NodeStatus` of one node.
    pub fn status(&self, node: &str) -> String {
        format!("{}/status/{node}", self.prefix)
    }

    /// Every node's status.
    pub fn all_status(&self) -> String {
        format!("{}/status/+", self.prefix)
    }

    /// The node whose status `topic` carries, if it is a status topic.
    pub fn status_of<'t>(&self, topic: &'t str) -> Option<&'t str> {
        topic
            .strip_prefix(&self.prefix)?
            .strip_prefix("/status/")
            .filter(|node| !node.is_empty() && !node.contains('/'))
    }

    /// Where the tier above sends the results of jobs this node forwarded.
    pub fn relay(&self, node: &str) -> String {
        format!("{}/relay/{node}", self.prefix)
    }

    /// Whether `topic` is some node's relay topic.
    pub fn is_relay_topic(&self, topic: &str) -> bool {
        topic
            .strip_prefix(&self.prefix)
            .is_some_and(|rest| rest.starts_with("/relay/"))
    }

    /// Retained, signed `ModuleManifest` of the module called `name`.
    pub fn manifest(&self, name: &str) -> String {
        format!("{}/modules/{name}/manifest", self.prefix)
    }

    /// Every module's manifest.
    pub fn all_manifests(&self) -> String {
        format!("{}/modules/+/manifest", self.prefix)
    }

    /// Retained `ModuleChunk` number `index` of the blob with digest `sha256`.
    pub fn chunk(&self, sha256: &str, index: u32) -> String {
        format!("{}/modules/blobs/{sha256}/{index}", self.prefix)
    }

    /// Whether `topic` is one of the module topics (manifests and chunks).
    pub fn is_module_topic(&self, topic: &str) -> bool {
        topic
            .strip_prefix(&self.prefix)
            .is_some_and(|rest| rest.starts_with("/modules/"))
    }

    /// A private topic for the replies of one client (the CLI).
    pub fn replies(&self, client: &str) -> String {
        format!("{}/replies/{client}", self.prefix)
    }
}

/// Parses a tier name (`--tier`), naming the valid ones on error.
pub fn parse_tier(name: &str) -> Result<Tier, String> {
    Tier::from_name(name).ok_or_else(|| format!("unknown tier {name:?}: use device, edge or cloud"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_follow_the_contract() {
        let t = Topics::new("isomesh");
        assert_eq!(t.images("d1"), "isomesh/images/d1");
        assert_eq!(
            t.shared_tier_jobs(Tier::Edge),
            "$share/edge/isomesh/jobs/tier/edge"
        );
        assert_eq!(t.status("c1"), "isomesh/status/c1");
        assert_eq!(t.status_of("isomesh/status/c1"), Some("c1"));
        assert_eq!(t.status_of("isomesh/status/c1/x"), None);
        assert_eq!(t.status_of("other/status/c1"), None);
        assert_eq!(t.relay("d1"), "isomesh/relay/d1");
    }
}
