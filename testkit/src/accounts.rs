//! Accounts and roles for tests of the brokers' access control: a password file made with the
//! real tools (`isomesh-broker passwd`, and Mosquitto's `mosquitto_passwd` for some accounts, so
//! both brokers are shown to read both tools' hashes) and a copy of `deploy/acl.conf`.

use crate::broker::Access;
use crate::mqtt::Client;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
use std::path::Path;

/// Every test account's password.
pub const PASSWORD: &str = "correct horse";

/// A password file and the mesh's roles, in a directory of their own.
pub struct Accounts {
    pub dir: tempfile::TempDir,
    pub access: Access,
}

impl Accounts {
    /// Accounts `users`, made with `isomesh-broker passwd`, and `mosquitto_users`, made with
    /// `mosquitto_passwd`; all with [`PASSWORD`].
    pub fn new(users: &[&str], mosquitto_users: &[&str]) -> Accounts {
        let dir = tempfile::tempdir().expect("tempdir");
        let password_file = dir.path().join("passwd");
        for user in users {
            let out = std::process::Command::new(crate::bin_path("isomesh-broker"))
                .arg("passwd")
                .arg(&password_file)
                .arg(user)
                .args(["--iterations", "1000"])
                .env("ISOMESH_NEW_PASSWORD", PASSWORD)
                .output()
                .expect("isomesh-broker passwd");
            assert!(out.status.success(), "{out:?}");
        }
        for user in mosquitto_users {
            let out = std::process::Command::new("mosquitto_passwd")
                .arg("-b")
                .arg(&password_file)
                .args([user, PASSWORD])
                .output()
                .expect("mosquitto_passwd (apt-get install mosquitto)");
            assert!(out.status.success(), "{out:?}");
        }
        let acl_file = dir.path().join("acl.conf");
        std::fs::copy(crate::workspace_root().join("deploy/acl.conf"), &acl_file)
            .expect("deploy/acl.conf");
        readable_by_all(dir.path());
        Accounts {
            dir,
            access: Access {
                password_file,
                acl_file,
            },
        }
    }
}

/// Lets Mosquitto read a directory of test files: it may drop to its own user first.
pub fn readable_by_all(dir: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let chmod = |path: &Path, mode| {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod")
    };
    chmod(dir, 0o755);
    for entry in std::fs::read_dir(dir).expect("read dir") {
        chmod(&entry.expect("dir entry").path(), 0o644);
    }
}

/// Logs in as `user` with the client id `{user}:{id}`, one that `user` owns (isomesh-broker
/// refuses a client id another account owns).
pub async fn login(port: u16, id: &str, user: &str) -> Client {
    Client::connect_as(port, &format!("{user}:{id}"), user, PASSWORD).await
}

/// The reason of a PUBACK; panics on anything else.
pub fn puback_reason(ack: Option<Packet>) -> PubAckReason {
    match ack {
        Some(Packet::PubAck(ack)) => ack.reason,
        other => panic!("expected a PUBACK, got {other:?}"),
    }
}
