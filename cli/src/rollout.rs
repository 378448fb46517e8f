//! `isomesh keygen` and `isomesh rollout`: signing keys, and publishing a module to the mesh.
//!
//! A rollout compiles the module once here (checking that it is a classifier and that it calls
//! itself what `--name` and `--version` say), then publishes, all retained: the module's chunks,
//! the chunks of the compiled code for this machine's engine (nodes with the same engine load it
//! in milliseconds instead of compiling for seconds) and for each `--target` (code for another
//! ISA's baseline CPU, say `aarch64-unknown-linux-musl` for ARM device boards: see
//! `isomesh_sandbox::target`), and last the signed manifest, which is what nodes act on. With `--wait` it follows the nodes' status until each targeted node serves the
//! module or says why it refused it.
//!
//! With `--model` it is a model rollout: the ONNX classifier, its labels and input layout go
//! out as a model file served by the module's code. If the broker holds a manifest for that
//! code signed by this key, the code is neither compiled nor published again (see
//! `isomesh_module::package::Code`), so nodes that run it fetch the model alone.

use isomesh_mesh::topics::Topics;
use isomesh_module::package::Code;
use isomesh_module::package::{Package, PackageSpec, DEFAULT_CHUNK_SIZE};
use isomesh_module::signing::SecretKey;
use isomesh_protos::guest_input::Layout;
use isomesh_protos::{GuestInput, ModuleManifest, NodeStatus, Tier};
use isomesh_sandbox::{CrossCompiler, Sandbox, SandboxConfig};
use prost::Message;
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::Event;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Make a signing key pair.
#[derive(Debug, clap::Args)]
pub struct KeygenArgs {
    /// Path of the secret key; the public key goes beside it with `.pub` appended.
    #[arg(long, default_value = "isomesh.key")]
    pub out: PathBuf,
}

pub fn keygen(args: KeygenArgs) -> anyhow::Result<()> {
    let secret = SecretKey::generate()?;
    let mut public_path = args.out.clone().into_os_string();
    public_path.push(".pub");
    let public_path = PathBuf::from(public_path);
    if public_path.exists() {
        anyhow::bail!(
            "{} already exists; pick another --out or remove the old key pair",
            public_path.display()
        );
    }
    secret.write(&args.out)?;
    secret.public().write(&public_path)?;
    println!(
        "secret key: {} (keep it where you run `isomesh rollout`)\npublic key: {} (give it to every node: --trusted-key {})\nkey id:     {}",
        args.out.display(),
        public_path.display(),
        public_path.display(),
        secret.public().id()
    );
    Ok(())
}

/// Publish a module to the mesh.
#[derive(Debug, clap::Args)]
pub struct RolloutArgs {
    #[command(flatten)]
    pub signed: crate::common::SignedModule,
    /// Only nodes of this tier (repeatable).
    #[arg(long, value_parser = isomesh_mesh::topics::parse_tier)]
    pub tier: Vec<Tier>,
    /// Only this node (repeatable).
    #[arg(long)]
    pub node: Vec<String>,
    /// Allow nodes to install it even if they serve a newer version.
    #[arg(long)]
    pub force: bool,
    /// Chunk size in bytes (1 KiB to 4 MiB, what nodes accept); keep it under the broker's
    /// message limit.
    #[arg(long, default_value_t = DEFAULT_CHUNK_SIZE)]
    pub chunk_size: u32,
    /// Publish chunks uncompressed: about 3x the bytes on the wire, no inflating on the nodes.
    #[arg(long)]
    pub no_compress: bool,
    /// Do not publish code compiled here (nodes then compile the module themselves).
    #[arg(long, conflicts_with = "target")]
    pub no_precompile: bool,
    /// Also publish code for nodes of this target triple, compiled here for its baseline CPU
    /// (repeatable): `aarch64-unknown-linux-musl` for ARM boards. `isomesh status --json` shows
    /// each node's target; nodes of a target without code compile the module themselves.
    #[arg(long, value_parser = parse_target)]
    pub target: Vec<String>,
    /// Cache for precompiling: unchanged functions of a new version are not compiled again
    /// [default: $XDG_CACHE_HOME/isomesh or ~/.cache/isomesh].
    #[arg(long, env = "ISOMESH_COMPILE_CACHE")]
    pub compile_cache: Option<PathBuf>,
    /// Wait until every targeted node serves the module; exit 1 if one refuses or the time runs out.
    #[arg(long)]
    pub wait: bool,
    /// How long --wait waits, s.
    #[arg(long, default_value_t = 300)]
    pub timeout_s: u64,
    /// Roll out this ONNX image classifier, served by the module's code, instead of the model
    /// the module embeds: a model rollout. Nodes that have the module's code fetch only the
    /// model and compile nothing; if the broker holds the code from an earlier rollout signed
    /// by --key, it is not compiled or published again. Needs --labels and --version.
    #[arg(long, value_name = "MODEL.onnx", requires_all = ["labels", "version"])]
    pub model: Option<PathBuf>,
    /// The class names of --model, one a line, in the order of its outputs.
    #[arg(long, value_name = "LABELS.txt", requires = "model")]
    pub labels: Option<PathBuf>,
    /// How an image becomes --model's input: nchw-f32-imagenet (float32 channels first,
    /// normalised as torchvision does) or nhwc-u8 (raw pixels channels last).
    #[arg(long, default_value = "nchw-f32-imagenet", value_parser = isomesh_module::model::parse_layout, requires = "model")]
    pub input_layout: Layout,
    /// Side of --model's square input, pixels.
    #[arg(long, default_value_t = 224, requires = "model")]
    pub input_side: u32,
    /// Broker URL, or the members of a clustered broker: URL,URL,... (the first that answers).
    #[arg(long, env = "ISOMESH_BROKER", default_value = "mqtt://127.0.0.1:1883")]
    pub broker: String,
    /// Topic prefix of the mesh.
    #[arg(long, env = "ISOMESH_PREFIX", default_value = "isomesh")]
    pub prefix: String,
}

/// How often a long compile says it is still going.
const COMPILE_TICK: Duration = Duration::from_secs(5);

/// Awaits a compile, printing every [`COMPILE_TICK`] how long it has run: Cranelift reports no
/// progress of its own, and 10-45 s of silence reads as a hang. A compile served from the cache
/// ends before the first line.
async fn still_compiling<T>(compile: impl std::future::Future<Output = T>) -> T {
    let started = Instant::now();
    tokio::pin!(compile);
    let mut tick =
        tokio::time::interval_at(tokio::time::Instant::now() + COMPILE_TICK, COMPILE_TICK);
    loop {
        tokio::select! {
            done = &mut compile => return done,
            _ = tick.tick() => eprintln!(
                "  still compiling: {} s",
                started.elapsed().as_secs()
            ),
        }
    }
}

/// The largest chunk nodes accept: isomesh-node's `LARGEST_MODULE_CHUNK`.
const MAX_CHUNK_SIZE: u32 = 4 << 20;

/// Runs the rollout; `Ok(false)` when `--wait` saw a node refuse it or time run out.
pub async fn rollout(args: RolloutArgs) -> anyhow::Result<bool> {
    let started = Instant::now();
    let key = SecretKey::read(&args.signed.key)?;
    let module = crate::common::read_module(&args.signed.module)?;
    let (identity, code_version) = match &args.model {
        Some(_) => model_identity(&args.signed, &module)?,
        None => (args.signed.identity(&module)?, None),
    };
    // Nodes order versions by semver precedence and refuse to order anything else: say so here,
    // before anything is published.
    isomesh_module::version::parse(&identity.version)?;
    if args.chunk_size < 1024 {
        anyhow::bail!(
            "--chunk-size {} is too small (at least 1024 bytes)",
            args.chunk_size
        );
    }
    // Nodes size their MQTT packet limit for chunks of at most this (isomesh-node's
    // LARGEST_MODULE_CHUNK); the broker would drop bigger ones on the way to them.
    if args.chunk_size > MAX_CHUNK_SIZE {
        anyhow::bail!(
            "--chunk-size {} is too large (at most {MAX_CHUNK_SIZE} bytes, what nodes accept)",
            args.chunk_size
        );
    }
    // A model rollout on code the broker holds already, from a rollout signed by this key:
    // nothing to compile, nothing of the code to publish.
    let published_code = match &args.model {
        Some(_) => published_code(&args, &key, &identity.name, &module).await?,
        None => None,
    };
    let artifacts = if args.no_precompile || published_code.is_some() {
        Vec::new()
    } else {
        let compiling = Instant::now();
        eprintln!(
            "compiling {} for this machine's engine...",
            args.signed.module.display()
        );
        let bytes = module.clone();
        let cache_dir = args.compile_cache.clone().or_else(default_compile_cache);
        let (engine, info, code) = still_compiling(tokio::task::spawn_blocking(move || {
            let sandbox = Sandbox::new(SandboxConfig {
                cache_dir,
                ..SandboxConfig::default()
            })?;
            let (info, code) = sandbox.precompile(&bytes)?;
            anyhow::Ok((sandbox.engine_id(), info, code))
        }))
        .await??;
        let version = code_version.as_deref().unwrap_or(&identity.version);
        if info.name != identity.name || info.version != version {
            anyhow::bail!(
                "{} calls itself {}@{}, not {}@{version}: fix --name/--version (nodes would refuse it)",
                args.signed.module.display(),
                info.name,
                info.version,
                identity.name,
            );
        }
        eprintln!(
            "compiled in {:.1} s ({} MiB of machine code, engine {engine})",
            compiling.elapsed().as_secs_f64(),
            code.len() >> 20
        );
        let mut artifacts = vec![(engine, code)];
        for target in dedup(&args.target) {
            let compiling = Instant::now();
            eprintln!("compiling it for {target}...");
            let (bytes, cache_dir) = (
                module.clone(),
                args.compile_cache.clone().or_else(default_compile_cache),
            );
            let (engine, code) = still_compiling(tokio::task::spawn_blocking(move || {
                let compiler = CrossCompiler::new(&target, cache_dir.as_deref(), None)?;
                anyhow::Ok((compiler.engine_id(), compiler.precompile(&bytes)?))
            }))
            .await??;
            eprintln!(
                "compiled in {:.1} s ({} MiB of machine code, engine {engine})",
                compiling.elapsed().as_secs_f64(),
                code.len() >> 20
            );
            artifacts.push((engine, code));
        }
        artifacts
    };
    let mut spec = PackageSpec {
        name: &identity.name,
        version: &identity.version,
        chunk_size: args.chunk_size,
        target_tiers: args.tier.clone(),
        target_nodes: args.node.clone(),
        force: args.force,
        compress: !args.no_compress,
    };
    if let Some(old) = &published_code {
        // The code's chunks on the broker were cut and encoded as its manifest says, and one
        // manifest has one chunk size and encoding for all its blobs: the model's follow them.
        spec.chunk_size = old.chunk_size;
        spec.compress = old.encoding == isomesh_module::package::DEFLATE;
    }
    let mut package = match (&args.model, code_version) {
        (Some(onnx), Some(code_version)) => {
            let labels = args
                .labels
                .as_deref()
                .ok_or_else(|| anyhow::anyhow!("--model needs --labels"))?;
            let input = GuestInput {
                layout: args.input_layout as i32,
                side: args.input_side,
            };
            let model = isomesh_module::model::read(onnx, labels, input)?;
            eprintln!(
                "model {} ({} labels, {}) on the code of {} ({})",
                onnx.display(),
                model.labels.len(),
                isomesh_module::model::layout_name(args.input_layout),
                args.signed.module.display(),
                if published_code.is_some() {
                    "on the broker already: not published again"
                } else {
                    "published with it"
                }
            );
            let code = match published_code {
                Some(old) => Code::Published {
                    part: isomesh_module::package::code_of(&old),
                    artifacts: old.artifacts,
                },
                None => Code::New {
                    module: &module,
                    version: &code_version,
                    artifacts: &artifacts,
                },
            };
            let file = isomesh_protos::ModelFile {
                model: Some(model),
                code_sha256: isomesh_module::digest::sha256_hex(&module),
            };
            Package::model(&spec, &file.encode_to_vec(), code)
        }
        _ => Package::new(&spec, &module, &artifacts),
    };
    isomesh_module::package::check_manifest(&package.manifest)?;
    key.sign(&mut package.manifest);
    let manifest = package.manifest.clone();

    let topics = Topics::new(args.prefix.clone());
    let (client, mut eventloop) = isomesh_mqtt::connect::connect(
        &args.broker,
        &isomesh_mqtt::connect::client_id_at(&args.broker, "rollout"),
    )
    .await?;
    // One task owns the connection: it counts acknowledgements and forwards node statuses.
    let acked = Arc::new(AtomicU64::new(0));
    let acked_signal = Arc::new(tokio::sync::Notify::new());
    let (status_tx, mut statuses) = tokio::sync::mpsc::unbounded_channel::<NodeStatus>();
    let poller = {
        let (acked, acked_signal) = (acked.clone(), acked_signal.clone());
        tokio::spawn(async move {
            loop {
                match eventloop.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => {
                        acked.fetch_add(1, Ordering::Relaxed);
                        acked_signal.notify_one();
                    }
                    Ok(Event::Incoming(Packet::Publish(publish))) => {
                        if let Ok(status) = NodeStatus::decode(publish.payload.as_ref()) {
                            let _ = status_tx.send(status);
                        }
                    }
                    Ok(_) => {}
                    Err(e) => return e,
                }
            }
        })
    };
    if args.wait {
        client
            .subscribe(topics.all_status(), QoS::AtLeastOnce)
            .await?;
    }

    let total = package.chunks.len() as u64 + 1;
    let raw: u64 = manifest.size + manifest.artifacts.iter().map(|a| a.size).sum::<u64>();
    let bar = indicatif::ProgressBar::new(total).with_style(
        indicatif::ProgressStyle::with_template(
            "publishing {bar:40} {pos}/{len} chunks {bytes_per_sec} {elapsed}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let publishing = Instant::now();
    let mut bytes = 0u64;
    for chunk in &package.chunks {
        bytes += chunk.data.len() as u64;
        client
            .publish(
                topics.chunk(&chunk.sha256, chunk.index),
                QoS::AtLeastOnce,
                true,
                chunk.encode_to_vec(),
            )
            .await?;
        bar.set_position(acked.load(Ordering::Relaxed));
    }
    // The manifest last: a node acting on it finds every chunk already retained.
    wait_acked(&acked, &acked_signal, total - 1, &bar, &poller).await?;
    client
        .publish(
            topics.manifest(&manifest.name),
            QoS::AtLeastOnce,
            true,
            manifest.encode_to_vec(),
        )
        .await?;
    wait_acked(&acked, &acked_signal, total, &bar, &poller).await?;
    bar.finish_and_clear();
    eprintln!(
        "published {}@{} ({} MiB stored as {} MiB in {} chunks, {} precompiled artifact(s)) in {:.2} s, signed by key {}; targets: {}",
        manifest.name,
        manifest.version,
        raw >> 20,
        bytes >> 20,
        package.chunks.len(),
        manifest.artifacts.len(),
        publishing.elapsed().as_secs_f64(),
        manifest.key_id,
        isomesh_module::package::describe_targets(&manifest)
    );
    if !args.wait {
        let _ = client.disconnect().await;
        return Ok(true);
    }

    // Follow the nodes' statuses until each targeted node serves the module or refused it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(args.timeout_s);
    let mut follow = crate::follow::Follow::new(&manifest, &args.node);
    // Retained statuses arrive first; give them a moment so the set of targets is known.
    let settle = tokio::time::Instant::now() + Duration::from_millis(500);
    loop {
        if tokio::time::Instant::now() >= settle && follow.waiting().is_empty() {
            break;
        }
        let status = match tokio::time::timeout_at(deadline.max(settle), statuses.recv()).await {
            Ok(Some(status)) => status,
            Ok(None) => anyhow::bail!("lost the broker connection while waiting for the nodes"),
            Err(_) if tokio::time::Instant::now() < settle => continue,
            Err(_) => {
                follow.time_out(args.timeout_s);
                break;
            }
        };
        if let Some(line) = follow.heard(status, started.elapsed()) {
            eprintln!("{line}");
        }
    }
    let _ = client.disconnect().await;
    println!("{:<12} {:<8} RESULT", "NODE", "TIER");
    let outcome = follow.outcome();
    let mut all_ok = !outcome.is_empty();
    for (id, result) in outcome {
        let tier = follow.tier_name(id);
        match result {
            Ok(after) => println!(
                "{id:<12} {tier:<8} serving {}@{} {:.2} s after the rollout started",
                manifest.name,
                manifest.version,
                after.as_secs_f64()
            ),
            Err(reason) => {
                all_ok = false;
                println!("{id:<12} {tier:<8} FAILED: {reason}");
            }
        }
    }
    if outcome.is_empty() {
        println!(
            "no online node is targeted by this rollout ({})",
            isomesh_module::package::describe_targets(&manifest)
        );
    }
    Ok(all_ok)
}

/// The name and version a model rollout is signed as (the module's name, `--version`), and
/// the version the module's code calls itself.
fn model_identity(
    signed: &crate::common::SignedModule,
    module: &[u8],
) -> anyhow::Result<(isomesh_module::identity::Identity, Option<String>)> {
    let declared = isomesh_module::identity::read(module).map_err(|why| {
        anyhow::anyhow!(
            "cannot tell the name and version of {}: {why} (a model rollout needs a module that \
             names itself in its isomesh-module section)",
            signed.module.display()
        )
    })?;
    if let Some(name) = signed.name.as_ref().filter(|n| **n != declared.name) {
        anyhow::bail!(
            "{} calls itself {}, not --name {name}: nodes would refuse it",
            signed.module.display(),
            declared.name
        );
    }
    let Some(version) = signed.version.clone() else {
        anyhow::bail!("a model rollout needs --version: the version it is served as");
    };
    let identity = isomesh_module::identity::Identity {
        name: declared.name,
        version,
    };
    Ok((identity, Some(declared.version)))
}

/// The manifest the broker holds for `name`, if its code is `module`'s and `key` signed it: a
/// model rollout then describes that code again instead of publishing it. A manifest signed
/// by another key is not vouched for here, so its code is published anew.
async fn published_code(
    args: &RolloutArgs,
    key: &SecretKey,
    name: &str,
    module: &[u8],
) -> anyhow::Result<Option<ModuleManifest>> {
    let topics = Topics::new(args.prefix.clone());
    let Some(retained) = retained_manifest(&args.broker, &topics, name).await? else {
        return Ok(None);
    };
    let mut ours = isomesh_module::signing::TrustedKeys::default();
    ours.add(key.public());
    let code = isomesh_module::package::code_of(&retained);
    let same = code.sha256 == isomesh_module::digest::sha256_hex(module);
    if !same || ours.verify(&retained).is_err() {
        return Ok(None);
    }
    Ok(Some(retained))
}

/// How long to wait for a retained manifest after the broker acknowledged the subscription.
const RETAINED_PATIENCE: Duration = Duration::from_millis(700);

/// The manifest retained on `name`'s manifest topic, if the broker holds one.
async fn retained_manifest(
    broker: &str,
    topics: &Topics,
    name: &str,
) -> anyhow::Result<Option<ModuleManifest>> {
    let (client, mut eventloop) = isomesh_mqtt::connect::connect(
        broker,
        &isomesh_mqtt::connect::client_id_at(broker, "rollout"),
    )
    .await?;
    client
        .subscribe(topics.manifest(name), QoS::AtLeastOnce)
        .await?;
    let mut deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let found = loop {
        match tokio::time::timeout_at(deadline, eventloop.poll()).await {
            Err(_) => break None,
            Ok(Err(e)) => anyhow::bail!("lost the broker while reading the retained manifest: {e}"),
            Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => {
                deadline = tokio::time::Instant::now() + RETAINED_PATIENCE;
            }
            Ok(Ok(Event::Incoming(Packet::Publish(publish)))) => {
                match ModuleManifest::decode(publish.payload.as_ref()) {
                    Ok(manifest) => break Some(manifest),
                    Err(_) => break None,
                }
            }
            Ok(Ok(_)) => {}
        }
    };
    let _ = client.disconnect().await;
    // Let the DISCONNECT go out before the rollout's own connection takes the same client id.
    let _ = tokio::time::timeout(Duration::from_millis(200), eventloop.poll()).await;
    Ok(found)
}

/// `$XDG_CACHE_HOME/isomesh`, else `~/.cache/isomesh`.
pub fn default_compile_cache() -> Option<PathBuf> {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".cache")))
        .map(|dir| dir.join("isomesh"))
}

/// Waits until `want` publishes are acknowledged, moving the progress bar.
async fn wait_acked(
    acked: &AtomicU64,
    signal: &tokio::sync::Notify,
    want: u64,
    bar: &indicatif::ProgressBar,
    poller: &tokio::task::JoinHandle<rumqttc::v5::ConnectionError>,
) -> anyhow::Result<()> {
    loop {
        let now = acked.load(Ordering::Relaxed);
        bar.set_position(now);
        if now >= want {
            return Ok(());
        }
        if poller.is_finished() {
            anyhow::bail!("the broker connection closed while publishing (is a chunk over the broker's message limit? try a smaller --chunk-size)");
        }
        let _ = tokio::time::timeout(Duration::from_millis(200), signal.notified()).await;
    }
}

/// A `--target`: a triple this build compiles for.
pub fn parse_target(triple: &str) -> Result<String, String> {
    isomesh_sandbox::target::check(triple).map(|()| triple.to_owned())
}

/// The targets in the order given, each once.
fn dedup(targets: &[String]) -> Vec<String> {
    let mut seen = Vec::new();
    for target in targets {
        if !seen.contains(target) {
            seen.push(target.clone());
        }
    }
    seen
}
