//! What several `isomesh` subcommands share.

use std::path::PathBuf;

/// A module file, what it is called, and the key that vouches for it: what `isomesh sign` and
/// `isomesh rollout` both take.
#[derive(Debug, clap::Args)]
pub struct SignedModule {
    /// The classifier module (.wasm).
    pub module: PathBuf,
    /// Module name, as the module reports it (nodes refuse a module that says otherwise);
    /// read from the module's `isomesh-module` section when not given.
    #[arg(long)]
    pub name: Option<String>,
    /// Module version, as the module reports it; nodes refuse versions older than theirs. Read
    /// from the module's `isomesh-module` section when not given.
    #[arg(long)]
    pub version: Option<String>,
    /// Secret key from `isomesh keygen`.
    #[arg(long)]
    pub key: PathBuf,
}

impl SignedModule {
    /// The name and version to sign `module` as: the flags, else what the module's own
    /// `isomesh-module` section says. A flag that contradicts the section is refused here, since
    /// nodes would refuse the module once they ran it.
    pub fn identity(&self, module: &[u8]) -> anyhow::Result<isomesh_module::identity::Identity> {
        let declared = isomesh_module::identity::read(module);
        let (name, version) = match (&self.name, &self.version, declared) {
            (Some(name), Some(version), Err(_)) => (name.clone(), version.clone()),
            (name, version, Ok(declared)) => {
                for (flag, given, stated) in [
                    ("--name", name, &declared.name),
                    ("--version", version, &declared.version),
                ] {
                    if let Some(given) = given.as_ref().filter(|g| *g != stated) {
                        anyhow::bail!(
                            "{} says it is {}@{}, not {flag} {given}: nodes would refuse it (leave \
                             {flag} out to use the module's own)",
                            self.module.display(),
                            declared.name,
                            declared.version
                        );
                    }
                }
                (declared.name, declared.version)
            }
            (_, _, Err(why)) => anyhow::bail!(
                "cannot tell the name and version of {}: {why}",
                self.module.display()
            ),
        };
        Ok(isomesh_module::identity::Identity { name, version })
    }
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
