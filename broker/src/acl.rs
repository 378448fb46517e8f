//! What each account may publish and subscribe to: an ACL file in Mosquitto's format, so one
//! file gives the same roles on `isomesh-broker` and on a production Mosquitto.
//!
//! The part of the format used here (Mosquitto's `acl_file`):
//!
//! ```text
//! # rules before any `user` line apply to clients without a username
//! topic read isomesh/status/+
//! # the rules below, up to the next `user` line, are rollout's
//! user rollout
//! topic write isomesh/modules/#
//! # read, write, readwrite (the default) or deny
//! topic readwrite isomesh/status/+
//! # for every user: %u is the username, %c the client id
//! pattern read isomesh/relay/%u
//! ```
//!
//! A publish needs a `write` rule whose topic filter matches the topic; a subscription needs
//! `read` rules whose filters cover every topic the subscription's filter could match (so a
//! wildcard subscription cannot reach past what was granted). A matching `deny` wins over
//! everything. Shared subscriptions are checked on their topic filter, without `$share/GROUP/`.

use std::path::{Path, PathBuf};

/// Why an ACL file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AclError {
    #[error("cannot read the ACL file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {reason}")]
    Line {
        path: PathBuf,
        line: usize,
        reason: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    Read,
    Write,
    ReadWrite,
    Deny,
}

impl Access {
    fn grants(self, wanted: Access) -> bool {
        self == wanted || (self == Access::ReadWrite && wanted != Access::Deny)
    }
}

#[derive(Debug, Clone)]
struct Rule {
    access: Access,
    filter: String,
}

/// The rules of one ACL file.
#[derive(Debug, Default)]
pub struct Acl {
    anonymous: Vec<Rule>,
    users: std::collections::HashMap<String, Vec<Rule>>,
    /// `pattern` rules, with `%u` and `%c` still in them.
    patterns: Vec<Rule>,
}

/// Who is asking: the authenticated username, if any, and the MQTT client id.
#[derive(Debug, Clone, Copy)]
pub struct Client<'a> {
    pub username: Option<&'a str>,
    pub client_id: &'a str,
}

impl Acl {
    pub fn read(path: &Path) -> Result<Acl, AclError> {
        let text = std::fs::read_to_string(path).map_err(|source| AclError::Read {
            path: path.to_owned(),
            source,
        })?;
        Acl::parse(path, &text)
    }

    pub fn parse(path: &Path, text: &str) -> Result<Acl, AclError> {
        let mut acl = Acl::default();
        let mut user: Option<String> = None;
        for (n, line) in text.lines().enumerate() {
            let error = |reason: String| AclError::Line {
                path: path.to_owned(),
                line: n + 1,
                reason,
            };
            // Comments are whole lines, as in Mosquitto (topic filters may end in `/#`).
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut words = line.split_whitespace();
            let keyword = words.next().unwrap_or_default();
            match keyword {
                "user" => {
                    let name: Vec<&str> = words.collect();
                    if name.is_empty() {
                        return Err(error("`user` needs a name".into()));
                    }
                    user = Some(name.join(" "));
                }
                "topic" | "pattern" => {
                    let rest: Vec<&str> = words.collect();
                    let (access, filter) = match rest.as_slice() {
                        [filter] => (Access::ReadWrite, *filter),
                        [access, filter] => (
                            match *access {
                                "read" => Access::Read,
                                "write" => Access::Write,
                                "readwrite" => Access::ReadWrite,
                                "deny" => Access::Deny,
                                other => {
                                    return Err(error(format!(
                                    "unknown access {other:?}: use read, write, readwrite or deny"
                                )))
                                }
                            },
                            *filter,
                        ),
                        _ => return Err(error(format!("expected `{keyword} [ACCESS] TOPIC`"))),
                    };
                    check_filter(filter).map_err(error)?;
                    let rule = Rule {
                        access,
                        filter: filter.to_string(),
                    };
                    match (keyword, &user) {
                        ("pattern", _) => acl.patterns.push(rule),
                        (_, Some(name)) => acl.users.entry(name.clone()).or_default().push(rule),
                        (_, None) => acl.anonymous.push(rule),
                    }
                }
                other => {
                    return Err(error(format!(
                        "unknown keyword {other:?}: use user, topic or pattern"
                    )))
                }
            }
        }
        Ok(acl)
    }

    /// The rules that apply to `client`, patterns filled in.
    fn rules_for(&self, client: Client<'_>) -> Vec<Rule> {
        let Some(username) = client.username else {
            return self.anonymous.clone();
        };
        let mut rules = self.users.get(username).cloned().unwrap_or_default();
        for pattern in &self.patterns {
            // Mosquitto skips a pattern whose substitution would inject wildcards or levels.
            let unsafe_value = |v: &str| v.contains(['+', '#', '/']);
            if (pattern.filter.contains("%u") && unsafe_value(username))
                || (pattern.filter.contains("%c") && unsafe_value(client.client_id))
            {
                continue;
            }
            rules.push(Rule {
                access: pattern.access,
                filter: pattern
                    .filter
                    .replace("%u", username)
                    .replace("%c", client.client_id),
            });
        }
        rules
    }

    /// Whether `client` may publish to `topic`.
    pub fn may_publish(&self, client: Client<'_>, topic: &str) -> bool {
        let rules = self.rules_for(client);
        let matching = |r: &&Rule| filter_matches(&r.filter, topic);
        !rules
            .iter()
            .filter(matching)
            .any(|r| r.access == Access::Deny)
            && rules
                .iter()
                .filter(matching)
                .any(|r| r.access.grants(Access::Write))
    }

    /// Whether `client` may subscribe to `filter` (without any `$share/GROUP/`).
    pub fn may_subscribe(&self, client: Client<'_>, filter: &str) -> bool {
        let rules = self.rules_for(client);
        !rules
            .iter()
            .any(|r| r.access == Access::Deny && filters_overlap(&r.filter, filter))
            && rules
                .iter()
                .any(|r| r.access.grants(Access::Read) && filter_covers(&r.filter, filter))
    }
}

fn check_filter(filter: &str) -> Result<(), String> {
    let levels: Vec<&str> = filter.split('/').collect();
    for (i, level) in levels.iter().enumerate() {
        let bad_hash = level.contains('#') && (*level != "#" || i + 1 != levels.len());
        let bad_plus = level.contains('+') && *level != "+";
        if bad_hash || bad_plus {
            return Err(format!("{filter:?} is not a valid MQTT topic filter"));
        }
    }
    Ok(())
}

/// Whether the topic name `topic` matches the filter `filter`.
pub fn filter_matches(filter: &str, topic: &str) -> bool {
    // A filter starting with a wildcard does not match `$`-topics (MQTT 4.7.2).
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut topic_levels = topic.split('/');
    for level in filter.split('/') {
        match level {
            "#" => return true,
            "+" => {
                if topic_levels.next().is_none() {
                    return false;
                }
            }
            literal => {
                if topic_levels.next() != Some(literal) {
                    return false;
                }
            }
        }
    }
    topic_levels.next().is_none()
}

/// Whether every topic that `filter` matches is also matched by `rule`.
pub fn filter_covers(rule: &str, filter: &str) -> bool {
    // As in `filter_matches`: a rule starting with a wildcard does not reach `$`-topics, so it
    // must not grant a subscription to them either (`#` would otherwise cover `$SYS/#`).
    if filter.starts_with('$') && (rule.starts_with('+') || rule.starts_with('#')) {
        return false;
    }
    let mut wanted = filter.split('/');
    for level in rule.split('/') {
        match (level, wanted.next()) {
            ("#", _) => return true,
            (_, None) => return false,
            (_, Some("#")) => return false,
            ("+", Some(_)) => {}
            (literal, Some(w)) => {
                if literal != w {
                    return false;
                }
            }
        }
    }
    wanted.next().is_none()
}

/// Whether some topic is matched by both filters.
fn filters_overlap(a: &str, b: &str) -> bool {
    let (mut a, mut b) = (a.split('/'), b.split('/'));
    loop {
        match (a.next(), b.next()) {
            (Some("#"), _) | (_, Some("#")) => return true,
            (None, None) => return true,
            (None, _) | (_, None) => return false,
            (Some("+"), Some(_)) | (Some(_), Some("+")) => {}
            (Some(x), Some(y)) => {
                if x != y {
                    return false;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROLES: &str = "\
# anonymous: status only
topic read isomesh/status/+

user d1
topic read isomesh/jobs/tier/+
topic write isomesh/jobs/#
# manifests and chunks
topic read isomesh/modules/#
user rollout
topic write isomesh/modules/#
topic deny isomesh/modules/secret
pattern write isomesh/status/%u
pattern read isomesh/replies/%c
";

    fn acl() -> Acl {
        Acl::parse(Path::new("acl"), ROLES).unwrap()
    }

    fn user<'a>(name: &'a str, client_id: &'a str) -> Client<'a> {
        Client {
            username: Some(name),
            client_id,
        }
    }

    #[test]
    fn publishing_needs_a_matching_write_rule_and_no_deny() {
        let acl = acl();
        let d1 = user("d1", "isomesh-node-d1");
        assert!(acl.may_publish(d1, "isomesh/jobs/tier/edge"));
        assert!(acl.may_publish(d1, "isomesh/status/d1"));
        assert!(!acl.may_publish(d1, "isomesh/status/d2"));
        assert!(!acl.may_publish(d1, "isomesh/modules/mobilenet_v2/manifest"));
        let rollout = user("rollout", "r");
        assert!(acl.may_publish(rollout, "isomesh/modules/blobs/ab/0"));
        assert!(!acl.may_publish(rollout, "isomesh/modules/secret"));
        let anonymous = Client {
            username: None,
            client_id: "x",
        };
        assert!(!acl.may_publish(anonymous, "isomesh/status/x"));
        assert!(!acl.may_publish(user("stranger", "s"), "isomesh/jobs/d1"));
    }

    #[test]
    fn a_subscription_must_stay_inside_what_was_granted() {
        let acl = acl();
        let d1 = user("d1", "isomesh-node-d1");
        assert!(acl.may_subscribe(d1, "isomesh/jobs/tier/device"));
        assert!(acl.may_subscribe(d1, "isomesh/modules/+/manifest"));
        assert!(!acl.may_subscribe(d1, "isomesh/#"));
        assert!(!acl.may_subscribe(d1, "#"));
        assert!(!acl.may_subscribe(d1, "isomesh/jobs/tier/#"));
        let cli = user("camera", "isomesh-classify-1");
        assert!(acl.may_subscribe(cli, "isomesh/replies/isomesh-classify-1"));
        assert!(!acl.may_subscribe(cli, "isomesh/replies/+"));
        assert!(!acl.may_subscribe(user("rollout", "r"), "isomesh/modules/#"));
        let anonymous = Client {
            username: None,
            client_id: "x",
        };
        assert!(acl.may_subscribe(anonymous, "isomesh/status/+"));
        assert!(!acl.may_subscribe(anonymous, "isomesh/results/+"));
    }

    #[test]
    fn filters_match_as_mqtt_says() {
        assert!(filter_matches("a/+/c", "a/b/c"));
        assert!(filter_matches("a/#", "a"));
        assert!(filter_matches("a/#", "a/b/c"));
        assert!(!filter_matches("a/+", "a/b/c"));
        assert!(!filter_matches("#", "$SYS/x"));
        assert!(filter_covers("a/+/c", "a/+/c"));
        assert!(!filter_covers("a/+/c", "a/#"));
        // `#` matches no `$` topic, so it grants no subscription to them either.
        assert!(!filter_covers("#", "$SYS/#"));
        assert!(!filter_covers("+/x", "$SYS/x"));
        assert!(filter_covers("$SYS/#", "$SYS/x"));
        assert!(filters_overlap("a/+/c", "a/b/#"));
        assert!(!filters_overlap("a/b", "a/c"));
    }

    #[test]
    fn mistakes_are_reported_with_their_line() {
        let err = Acl::parse(Path::new("acl"), "user x\ntopic sometimes a/b\n").unwrap_err();
        assert!(err.to_string().contains("acl:2"), "{err}");
        assert!(Acl::parse(Path::new("acl"), "topic read a/#/b").is_err());
        assert!(Acl::parse(Path::new("acl"), "allow all").is_err());
    }
}
