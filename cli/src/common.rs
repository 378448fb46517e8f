//! What several `isomesh` subcommands share.

use std::path::PathBuf;

/// A module file, what it is called, and the key that vouches for it: what `isomesh sign` and
/// `isomesh rollout` both take.
#[derive(Debug, clap::Args)]
pub struct SignedModule {
    /// The classifier module (.wasm).
    pub module: PathBuf,
    /// Module name, as the module reports it (nodes refuse a module that says otherwise).
    #[arg(long)]
    pub name: String,
    /// Module version, as the module reports it; nodes refuse versions older than theirs.
    #[arg(long)]
    pub version: String,
    /// Secret key from `isomesh keygen`.
    #[arg(long)]
    pub key: PathBuf,
}

/// Reads a module file that is about to be signed, refusing one that is not WebAssembly.
pub fn read_module(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    use anyhow::Context;
    let module = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    if !isomesh_module::digest::is_wasm(&module) {
        anyhow::bail!(
            "{} is not a WebAssembly module (it does not start with \\0asm)",
            path.display()
        );
    }
    Ok(module)
}
