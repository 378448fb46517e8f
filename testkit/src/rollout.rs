//! Rollouts for tests: a signing key pair on disk, the classifier at a second version, and
//! rollouts published by hand (so a test can tamper with any part of them).

use crate::mqtt::Client;
use isomesh_module::package::{Package, PackageSpec, DEFAULT_CHUNK_SIZE};
use isomesh_module::signing::SecretKey;
use isomesh_protos::Tier;
use prost::Message;
use std::path::PathBuf;

/// Name the classifier module reports.
pub const MODULE_NAME: &str = "mobilenet_v2";
/// Version of `target/wasm32-wasip1/release/isomesh_guest.wasm`.
pub const VERSION_1: &str = "0.1.0";
/// Version of [`guest_module_v2`].
pub const VERSION_2: &str = "0.2.0";

/// A key pair in a temporary directory.
pub struct Keys {
    _dir: tempfile::TempDir,
    pub secret_path: PathBuf,
    pub public_path: PathBuf,
    pub secret: SecretKey,
}

impl Keys {
    pub fn new() -> Keys {
        let dir = tempfile::tempdir().expect("tempdir");
        let secret = SecretKey::generate().expect("a key");
        let secret_path = dir.path().join("rollout.key");
        let public_path = dir.path().join("rollout.key.pub");
        secret.write(&secret_path).expect("write secret key");
        secret
            .public()
            .write(&public_path)
            .expect("write public key");
        Keys {
            _dir: dir,
            secret_path,
            public_path,
            secret,
        }
    }

    /// The node flags that make it trust this key.
    pub fn node_args(&self) -> Vec<String> {
        vec![
            "--trusted-key".into(),
            self.public_path.display().to_string(),
        ]
    }
}

impl Default for Keys {
    fn default() -> Self {
        Keys::new()
    }
}

/// The key every test node trusts and the harness signs the modules it places with.
pub fn test_key() -> &'static Keys {
    static KEY: std::sync::OnceLock<Keys> = std::sync::OnceLock::new();
    KEY.get_or_init(Keys::new)
}

/// Writes the signed manifest (by [`test_key`]) beside the module file `path` will hold, as
/// `isomesh sign` does. Written before the module, so the node finds it when the file appears.
pub fn sign_file(path: &std::path::Path, module: &[u8], name: &str, version: &str) {
    isomesh_module::trust::write_signed_manifest(path, module, name, version, &test_key().secret)
        .expect("sign the module");
}

/// The classifier built at version 0.2.0 (same model): `make module` puts it in `target/modules/`.
pub fn guest_module_v2() -> PathBuf {
    let path =
        crate::workspace_root().join(format!("target/modules/{MODULE_NAME}-{VERSION_2}.wasm"));
    assert!(
        path.is_file(),
        "{} is missing: run `make module` (or `make test`) first",
        path.display()
    );
    path
}

/// An unsigned rollout of `module` for `tiers` (empty: every tier), without precompiled code.
pub fn package(module: &[u8], name: &str, version: &str, tiers: &[Tier]) -> Package {
    Package::new(
        &PackageSpec {
            name,
            version,
            chunk_size: DEFAULT_CHUNK_SIZE,
            target_tiers: tiers.to_vec(),
            target_nodes: vec![],
            force: false,
            compress: true,
        },
        module,
        &[],
    )
}

/// Publishes `package` as `isomesh rollout` does: chunks, then the manifest, all retained.
pub async fn publish(client: &Client, package: &Package) {
    for chunk in &package.chunks {
        client
            .publish_retained(
                &format!("isomesh/modules/blobs/{}/{}", chunk.sha256, chunk.index),
                chunk.encode_to_vec(),
            )
            .await;
    }
    client
        .publish_retained(
            &format!("isomesh/modules/{}/manifest", package.manifest.name),
            package.manifest.encode_to_vec(),
        )
        .await;
}

/// The flags of `isomesh rollout MODULE --name mobilenet_v2 --version VERSION --key ... --broker
/// BROKER_URL --wait --timeout-s ...`: a rollout signed by `keys` that waits for every node.
pub fn rollout_args(
    broker_url: &str,
    keys: &Keys,
    module: &std::path::Path,
    version: &str,
    converge_within: std::time::Duration,
) -> Vec<String> {
    vec![
        "rollout".into(),
        module.display().to_string(),
        "--name".into(),
        MODULE_NAME.into(),
        "--version".into(),
        version.into(),
        "--key".into(),
        keys.secret_path.display().to_string(),
        "--broker".into(),
        broker_url.into(),
        "--wait".into(),
        "--timeout-s".into(),
        converge_within.as_secs().to_string(),
    ]
}

/// Photos sent to `topic` at a steady four a second while a rollout runs, each with the MQTT 5
/// response topic `reply_to` and its number as correlation data, until `done` is notified, then
/// eight more (for the new module). The task returns how many it sent.
pub fn stream_photos_during(
    client: &Client,
    topic: &str,
    reply_to: &str,
    done: std::sync::Arc<tokio::sync::Notify>,
) -> tokio::task::JoinHandle<usize> {
    let (client, topic, reply_to) = (
        client.client.clone(),
        topic.to_string(),
        reply_to.to_string(),
    );
    let photos = crate::photos();
    tokio::spawn(async move {
        let mut sent = 0usize;
        let mut after = None;
        while after.is_none_or(|left| left > 0) {
            let props = rumqttc::v5::mqttbytes::v5::PublishProperties {
                response_topic: Some(reply_to.clone()),
                correlation_data: Some(sent.to_string().into_bytes().into()),
                ..Default::default()
            };
            client
                .publish_with_properties(
                    topic.clone(),
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                    false,
                    photos[sent % photos.len()].bytes(),
                    props,
                )
                .await
                .expect("publish");
            sent += 1;
            after = after.map(|left: usize| left - 1);
            // A deliberate pace, so jobs keep arriving all through the rollout: no test
            // condition waits on this.
            tokio::select! {
                _ = done.notified(), if after.is_none() => after = Some(8),
                _ = tokio::time::sleep(std::time::Duration::from_millis(250)) => {}
            }
        }
        sent
    })
}
