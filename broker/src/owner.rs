//! Which account owns an MQTT client id, so one account cannot pose as another's client.
//!
//! Why it matters: a client id names a session. Whoever connects with a node's id and
//! `clean_start = false` takes that node's session over (its queued jobs, its subscriptions),
//! and `pattern read isomesh/replies/%c` would let any account read any client's replies by
//! picking that client's id. So every client id has exactly one owning account:
//!
//! - `isomesh-node-X` is owned by `X` (the id every node connects with);
//! - otherwise the part before the first `:` is the owner (`camera:classify-42-1f` belongs to
//!   `camera`; usernames in a Mosquitto password file cannot contain `:`, so the split is
//!   unambiguous);
//! - an id without `:` is owned by the account of the same name.
//!
//! A logged-in client may use only ids its username owns; an anonymous client (when allowed)
//! may not use an id owned by an account of the password file. [`crate::access`] enforces it at
//! CONNECT; the `isomesh` CLI names its clients `{username}:{command}-{pid}-{nanos}` to fit.

/// The prefix of the client id of the node with id `X`: `isomesh-node-X`.
pub const NODE_PREFIX: &str = "isomesh-node-";

/// The account that owns `client_id`.
pub fn owner_of(client_id: &str) -> &str {
    if let Some(node) = client_id.strip_prefix(NODE_PREFIX) {
        return node;
    }
    match client_id.split_once(':') {
        Some((owner, _)) => owner,
        None => client_id,
    }
}

/// Why a client may not use a client id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotYours {
    pub client_id: String,
    pub owner: String,
}

impl std::fmt::Display for NotYours {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "client id {} belongs to account {}",
            self.client_id, self.owner
        )
    }
}

/// Whether a client logged in as `username` (`None`: anonymous) may use `client_id`;
/// `is_account` says whether a name is an account of the password file.
pub fn check(
    username: Option<&str>,
    client_id: &str,
    is_account: impl Fn(&str) -> bool,
) -> Result<(), NotYours> {
    let owner = owner_of(client_id);
    let allowed = match username {
        Some(user) => user == owner,
        None => !is_account(owner),
    };
    if allowed {
        Ok(())
    } else {
        Err(NotYours {
            client_id: client_id.to_string(),
            owner: owner.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_client_id_has_one_owner() {
        assert_eq!(owner_of("isomesh-node-d1"), "d1");
        assert_eq!(owner_of("camera:classify-1-ff"), "camera");
        assert_eq!(owner_of("camera:x:y"), "camera");
        assert_eq!(owner_of("operator"), "operator");
        assert_eq!(owner_of("isomesh-classify-1-ff"), "isomesh-classify-1-ff");
        // A node id may itself hold a `:`: the node prefix wins.
        assert_eq!(owner_of("isomesh-node-a:b"), "a:b");
    }

    #[test]
    fn a_login_may_use_only_its_own_ids() {
        let accounts = |name: &str| ["d1", "d2", "camera", "operator"].contains(&name);
        assert!(check(Some("d1"), "isomesh-node-d1", accounts).is_ok());
        assert!(check(Some("camera"), "camera:x", accounts).is_ok());
        let stolen = check(Some("d2"), "isomesh-node-d1", accounts).unwrap_err();
        assert_eq!(
            stolen.to_string(),
            "client id isomesh-node-d1 belongs to account d1"
        );
        assert!(check(Some("camera"), "operator:x", accounts).is_err());
        assert!(check(Some("camera"), "isomesh-classify-1", accounts).is_err());
        // Anonymous: anything no account owns.
        assert!(check(None, "anon-1", accounts).is_ok());
        assert!(check(None, "isomesh-node-d1", accounts).is_err());
        assert!(check(None, "camera:x", accounts).is_err());
    }
}
