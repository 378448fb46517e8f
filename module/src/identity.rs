//! What a module file says it is, read without compiling or running it.
//!
//! A module reports its name and version when called (`isomesh_info`), and nodes refuse one
//! whose signed manifest says otherwise. Calling it means compiling it first (10-20 s for the
//! classifier), too slow for `isomesh sign`. So the guest also writes them into a custom section
//! named [`SECTION`], as text:
//!
//! ```text
//! name=mobilenet_v2
//! version=0.2.0
//! ```
//!
//! `isomesh sign` and `isomesh rollout` read it when `--name`/`--version` are not given. The
//! section is a convenience, not a proof: nodes still check what the running module reports.

/// The custom section's name.
pub const SECTION: &str = "isomesh-module";

/// A module's name and version, as its [`SECTION`] states them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub name: String,
    pub version: String,
}

/// Why a module's identity could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("not a readable WebAssembly module: {0}")]
    NotWasm(String),
    #[error(
        "it has no `{SECTION}` section (a module built without one): give --name and --version"
    )]
    Missing,
    #[error("its `{SECTION}` section is malformed ({0}): give --name and --version")]
    Malformed(&'static str),
}

/// Reads the [`SECTION`] of a module's bytes.
pub fn read(module: &[u8]) -> Result<Identity, IdentityError> {
    for payload in wasmparser::Parser::new(0).parse_all(module) {
        let payload = payload.map_err(|e| IdentityError::NotWasm(e.to_string()))?;
        if let wasmparser::Payload::CustomSection(section) = payload {
            if section.name() == SECTION {
                return parse(section.data());
            }
        }
    }
    Err(IdentityError::Missing)
}

/// Parses the section's text: `key=value` lines; `name` and `version` are required, other keys
/// are left for later versions.
fn parse(data: &[u8]) -> Result<Identity, IdentityError> {
    let text = std::str::from_utf8(data).map_err(|_| IdentityError::Malformed("not UTF-8"))?;
    let (mut name, mut version) = (None, None);
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match line.split_once('=') {
            Some(("name", value)) => name = Some(value.trim().to_string()),
            Some(("version", value)) => version = Some(value.trim().to_string()),
            Some(_) => {}
            None => return Err(IdentityError::Malformed("a line without `=`")),
        }
    }
    match (name, version) {
        (Some(name), Some(version)) if !name.is_empty() && !version.is_empty() => {
            Ok(Identity { name, version })
        }
        _ => Err(IdentityError::Malformed("no name or no version")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal module: the header and one custom section.
    fn module_with(name: &str, data: &[u8]) -> Vec<u8> {
        let mut body = vec![name.len() as u8];
        body.extend_from_slice(name.as_bytes());
        body.extend_from_slice(data);
        let mut module = b"\0asm\x01\0\0\0".to_vec();
        module.push(0); // custom section
        module.push(body.len() as u8);
        module.extend(body);
        module
    }

    #[test]
    fn the_section_names_the_module() {
        let module = module_with(SECTION, b"name=mobilenet_v2\nversion=0.2.0\n");
        assert_eq!(
            read(&module),
            Ok(Identity {
                name: "mobilenet_v2".into(),
                version: "0.2.0".into()
            })
        );
    }

    #[test]
    fn a_missing_or_broken_section_says_what_to_give_instead() {
        assert_eq!(read(b"\0asm\x01\0\0\0"), Err(IdentityError::Missing));
        let other = module_with("producers", b"name=x\nversion=1\n");
        assert_eq!(read(&other), Err(IdentityError::Missing));
        let broken = module_with(SECTION, b"name=x\n");
        assert!(matches!(read(&broken), Err(IdentityError::Malformed(_))));
        assert!(read(&broken)
            .unwrap_err()
            .to_string()
            .contains("give --name and --version"));
        assert!(matches!(read(b"MZ"), Err(IdentityError::NotWasm(_))));
    }
}
