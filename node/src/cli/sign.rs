//! `isomesh sign`: the signed manifest that lets nodes run a module file copied in by hand.
//!
//! Nodes run only modules signed by a key they trust (see `trust`). A rollout carries its
//! signature with it; a file put into a module directory another way (an image build, a copy
//! onto a device) needs the same signature beside it: `NAME.manifest` next to `NAME.wasm`.

use crate::signing::SecretKey;
use std::path::PathBuf;

/// Sign a module file for nodes that get it by copy rather than by rollout.
#[derive(Debug, clap::Args)]
pub struct SignArgs {
    /// The classifier module (.wasm); the signed manifest is written beside it (.manifest).
    pub module: PathBuf,
    /// Module name (as the module reports it; nodes refuse a module that says otherwise).
    #[arg(long)]
    pub name: String,
    /// Module version (as the module reports it).
    #[arg(long)]
    pub version: String,
    /// Secret key from `isomesh keygen`.
    #[arg(long)]
    pub key: PathBuf,
}

pub fn run(args: SignArgs) -> anyhow::Result<()> {
    let key = SecretKey::read(&args.key)?;
    let module = super::read_module(&args.module)?;
    let manifest =
        crate::trust::write_signed_manifest(&args.module, &module, &args.name, &args.version, &key)
            .map_err(anyhow::Error::msg)?;
    println!(
        "{}: {}@{} sha256 {} signed by key {}",
        crate::trust::sidecar_path(&args.module).display(),
        manifest.name,
        manifest.version,
        manifest.sha256,
        manifest.key_id
    );
    Ok(())
}
