//! The broker's configuration files (`isomesh-broker`'s `acl.rs` and `passwords.rs`, included
//! from its source so this build needs no rmqtt): an ACL file and a password file of arbitrary
//! text are parsed, and the ACL's topic matching is checked against a reference matcher written
//! from the MQTT specification (section 4.7), as a differential:
//! - `filter_matches(filter, topic)` agrees with the reference for every valid filter and topic;
//! - when `filter_covers(rule, filter)`, every topic `filter` matches is matched by `rule`
//!   (otherwise a wildcard subscription would reach past what was granted);
//! - a client granted nothing may neither publish nor subscribe.
//!
//! Input: a first byte choosing the part, then text.
#![no_main]

#[allow(dead_code)]
#[path = "../../broker/src/acl.rs"]
mod acl;
#[allow(dead_code)]
#[path = "../../broker/src/passwords.rs"]
mod passwords;

use libfuzzer_sys::fuzz_target;
use std::path::Path;

/// MQTT 4.7: `+` matches one level, `#` (last) matches the parent and every level below, and a
/// filter starting with a wildcard matches no topic starting with `$`.
fn reference_matches(filter: &[&str], topic: &[&str], first: bool) -> bool {
    if first
        && topic.first().is_some_and(|t| t.starts_with('$'))
        && filter.first().is_some_and(|f| *f == "+" || *f == "#")
    {
        return false;
    }
    match (filter.split_first(), topic.split_first()) {
        (Some((&"#", _)), _) => true,
        (None, None) => true,
        (Some((&"+", f)), Some((_, t))) => reference_matches(f, t, false),
        (Some((level, f)), Some((t0, t))) => level == t0 && reference_matches(f, t, false),
        _ => false,
    }
}

fn valid_filter(filter: &str) -> bool {
    let levels: Vec<&str> = filter.split('/').collect();
    !filter.is_empty()
        && levels.iter().enumerate().all(|(i, level)| {
            (!level.contains('#') || (*level == "#" && i + 1 == levels.len()))
                && (!level.contains('+') || *level == "+")
        })
}

fn valid_topic(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#'])
}

fuzz_target!(|data: &[u8]| {
    let Some((&part, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    match part % 3 {
        0 => {
            if let Ok(acl) = acl::Acl::parse(Path::new("fuzz.acl"), &text) {
                let client = acl::Client {
                    username: Some("nobody-in-the-file"),
                    client_id: "c",
                };
                let _ = acl.may_publish(client, "isomesh/status/d1");
                let _ = acl.may_subscribe(client, "#");
            }
            let empty = acl::Acl::default();
            let client = acl::Client {
                username: None,
                client_id: "c",
            };
            assert!(!empty.may_publish(client, &text));
            assert!(!empty.may_subscribe(client, &text));
        }
        1 => {
            // A password file: parsed only (checking a password runs its PBKDF2 rounds, which
            // the file sets).
            let dir = std::env::temp_dir().join(format!("isomesh-fuzz-{}", std::process::id()));
            let _ = std::fs::create_dir_all(&dir);
            let path = dir.join("passwd");
            if std::fs::write(&path, text.as_bytes()).is_ok() {
                let _ = passwords::Passwords::read(&path);
            }
        }
        _ => {
            // Three lines: a rule, a filter, a topic.
            let lines: Vec<&str> = text.splitn(3, '\n').collect();
            let [rule, filter, topic] = [0, 1, 2].map(|i| lines.get(i).copied().unwrap_or(""));
            if valid_filter(filter) && valid_topic(topic) {
                let f: Vec<&str> = filter.split('/').collect();
                let t: Vec<&str> = topic.split('/').collect();
                assert_eq!(
                    acl::filter_matches(filter, topic),
                    reference_matches(&f, &t, true),
                    "filter {filter:?} topic {topic:?}"
                );
            }
            // `$`-topics included: a rule starting with a wildcard covers no `$` filter, as it
            // matches no `$` topic (MQTT 4.7.2).
            if valid_filter(rule)
                && valid_filter(filter)
                && valid_topic(topic)
                && acl::filter_covers(rule, filter)
                && acl::filter_matches(filter, topic)
            {
                assert!(
                    acl::filter_matches(rule, topic),
                    "{rule:?} covers {filter:?}, which matches {topic:?}, but the rule does not"
                );
            }
        }
    }
});
