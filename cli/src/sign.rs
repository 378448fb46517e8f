//! `isomesh sign`: the signed manifest that lets nodes run a module file copied in by hand.
//!
//! Nodes run only modules signed by a key they trust (see `trust`). A rollout carries its
//! signature with it; a file put into a module directory another way (an image build, a copy
//! onto a device) needs the same signature beside it: `NAME.manifest` next to `NAME.wasm`.

use isomesh_module::signing::SecretKey;

/// Sign a module file for nodes that get it by copy rather than by rollout.
#[derive(Debug, clap::Args)]
pub struct SignArgs {
    /// The signed manifest is written beside the module (.manifest).
    #[command(flatten)]
    pub signed: crate::common::SignedModule,
}

pub fn run(args: SignArgs) -> anyhow::Result<()> {
    let key = SecretKey::read(&args.signed.key)?;
    let module = crate::common::read_module(&args.signed.module)?;
    let identity = args.signed.identity(&module)?;
    isomesh_module::version::parse(&identity.version)?;
    let manifest = isomesh_module::trust::write_signed_manifest(
        &args.signed.module,
        &module,
        &identity.name,
        &identity.version,
        &key,
    )?;
    println!(
        "{}: {}@{} sha256 {} signed by key {}",
        isomesh_module::store::sidecar_path(&args.signed.module).display(),
        manifest.name,
        manifest.version,
        manifest.sha256,
        manifest.key_id
    );
    Ok(())
}
