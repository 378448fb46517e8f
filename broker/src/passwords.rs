//! Who may connect: a password file in Mosquitto's format, so one file serves both brokers.
//!
//! Each line is `username:hash`. The hash is what `mosquitto_passwd` writes:
//! `$7$ITERATIONS$SALT$HASH` (PBKDF2-HMAC-SHA512, base64 salt and 64-byte hash), or the older
//! `$6$SALT$HASH` (SHA-512 of password then salt). Plain-text passwords are refused: a leaked
//! config file must not hand out the mesh's accounts. `isomesh-broker passwd` adds users.

use base64::prelude::{Engine, BASE64_STANDARD};
use sha2::{Digest, Sha512};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use subtle::ConstantTimeEq;

/// PBKDF2 rounds of hashes this broker writes. Mosquitto's default is 101; more rounds cost a
/// few milliseconds per CONNECT and make a stolen file far slower to crack.
pub const DEFAULT_ITERATIONS: u32 = 10_000;
const SALT_LEN: usize = 12;

/// Why a password file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum PasswordFileError {
    #[error("cannot read the password file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}: {reason} (make entries with `isomesh-broker passwd {path} USER` or mosquitto_passwd)")]
    Line {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("cannot write the password file {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("usernames may not be empty or contain ':', '+', '#' or '/' ({0:?})")]
    BadUsername(String),
    #[error("cannot make a random salt: {0}")]
    Random(String),
}

/// A stored password hash.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Hash {
    Pbkdf2 {
        iterations: u32,
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
    Sha512 {
        salt: Vec<u8>,
        hash: Vec<u8>,
    },
}

impl Hash {
    fn parse(text: &str) -> Result<Hash, String> {
        let b64 = |s: &str| {
            BASE64_STANDARD
                .decode(s)
                .map_err(|e| format!("bad base64: {e}"))
        };
        let parts: Vec<&str> = text.split('$').collect();
        match parts.as_slice() {
            ["", "7", iterations, salt, hash] => Ok(Hash::Pbkdf2 {
                iterations: iterations
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| format!("bad iteration count {iterations:?}"))?,
                salt: b64(salt)?,
                hash: b64(hash)?,
            }),
            ["", "6", salt, hash] => Ok(Hash::Sha512 {
                salt: b64(salt)?,
                hash: b64(hash)?,
            }),
            _ => Err("not a $7$ (PBKDF2-SHA512) or $6$ (SHA-512) hash; plain-text passwords are not accepted".into()),
        }
    }

    fn matches(&self, password: &[u8]) -> bool {
        let (computed, stored) = match self {
            Hash::Pbkdf2 {
                iterations,
                salt,
                hash,
            } => (pbkdf2_sha512(password, salt, *iterations), hash),
            Hash::Sha512 { salt, hash } => {
                let mut digest = Sha512::new();
                digest.update(password);
                digest.update(salt);
                (digest.finalize().to_vec(), hash)
            }
        };
        computed.len() == stored.len() && bool::from(computed.ct_eq(stored))
    }
}

fn pbkdf2_sha512(password: &[u8], salt: &[u8], iterations: u32) -> Vec<u8> {
    let mut out = vec![0u8; 64];
    pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, iterations, &mut out);
    out
}

/// The `$7$` hash of `password` with a fresh random salt, as `mosquitto_passwd` writes it.
pub fn hash_password(password: &str, iterations: u32) -> Result<String, PasswordFileError> {
    let mut salt = [0u8; SALT_LEN];
    getrandom::getrandom(&mut salt).map_err(|e| PasswordFileError::Random(e.to_string()))?;
    let hash = pbkdf2_sha512(password.as_bytes(), &salt, iterations);
    Ok(format!(
        "$7${iterations}${}${}",
        BASE64_STANDARD.encode(salt),
        BASE64_STANDARD.encode(hash)
    ))
}

/// Checks that `name` can be a username (and a topic level in ACL patterns).
pub fn check_username(name: &str) -> Result<(), PasswordFileError> {
    if name.is_empty() || name.contains([':', '+', '#', '/']) {
        return Err(PasswordFileError::BadUsername(name.into()));
    }
    Ok(())
}

/// The accounts of a password file.
#[derive(Debug)]
pub struct Passwords {
    users: HashMap<String, Hash>,
    /// Checked against when the user is unknown, so that an unknown user costs as much PBKDF2
    /// work as a wrong password: timing does not tell which usernames exist.
    dummy: Hash,
}

impl Passwords {
    pub fn read(path: &Path) -> Result<Passwords, PasswordFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| PasswordFileError::Read {
            path: path.to_owned(),
            source,
        })?;
        Passwords::parse(path, &text)
    }

    fn parse(path: &Path, text: &str) -> Result<Passwords, PasswordFileError> {
        let mut users = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let error = |reason: String| PasswordFileError::Line {
                path: path.to_owned(),
                line: n + 1,
                reason,
            };
            let (user, hash) = line
                .split_once(':')
                .ok_or_else(|| error("expected `username:hash`".into()))?;
            check_username(user).map_err(|e| error(e.to_string()))?;
            users.insert(user.to_string(), Hash::parse(hash).map_err(error)?);
        }
        // As many rounds as the costliest real entry, so no entry is faster to reject.
        let iterations = users
            .values()
            .filter_map(|h| match h {
                Hash::Pbkdf2 { iterations, .. } => Some(*iterations),
                Hash::Sha512 { .. } => None,
            })
            .max()
            .unwrap_or(DEFAULT_ITERATIONS);
        let dummy = Hash::Pbkdf2 {
            iterations,
            salt: vec![0; SALT_LEN],
            hash: vec![0; 64],
        };
        Ok(Passwords { users, dummy })
    }

    /// Whether `user` is an account of the file.
    pub fn contains(&self, user: &str) -> bool {
        self.users.contains_key(user)
    }

    pub fn len(&self) -> usize {
        self.users.len()
    }

    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Whether `user` exists and `password` is theirs. Costs PBKDF2 work (milliseconds): call
    /// it off the async runtime (`spawn_blocking`).
    pub fn check(&self, user: &str, password: &[u8]) -> Login {
        match self.users.get(user) {
            None => {
                // The same work as for a real account, whose result does not matter.
                let _ = std::hint::black_box(self.dummy.matches(password));
                Login::UnknownUser
            }
            Some(hash) if hash.matches(password) => Login::Ok,
            Some(_) => Login::WrongPassword,
        }
    }
}

/// How a login attempt ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Login {
    Ok,
    UnknownUser,
    WrongPassword,
}

/// Adds `user` to the password file at `path` (made if missing), replacing an earlier entry.
pub fn set_password(
    path: &Path,
    user: &str,
    password: &str,
    iterations: u32,
) -> Result<(), PasswordFileError> {
    check_username(user)?;
    let old = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(source) => {
            return Err(PasswordFileError::Read {
                path: path.to_owned(),
                source,
            })
        }
    };
    let mut lines: Vec<String> = old
        .lines()
        .filter(|l| l.split_once(':').map(|(u, _)| u) != Some(user))
        .map(String::from)
        .collect();
    lines.push(format!("{user}:{}", hash_password(password, iterations)?));
    let write_error = |source| PasswordFileError::Write {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, lines.join("\n") + "\n").map_err(write_error)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .map_err(write_error)?;
    }
    std::fs::rename(&tmp, path).map_err(write_error)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_check_their_own_password_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("passwd");
        set_password(&path, "d1", "s3cret", 1000).unwrap();
        set_password(&path, "rollout", "other", 1000).unwrap();
        set_password(&path, "d1", "new", 1000).unwrap();
        let passwords = Passwords::read(&path).unwrap();
        assert_eq!(passwords.len(), 2);
        assert_eq!(passwords.check("d1", b"new"), Login::Ok);
        assert_eq!(passwords.check("d1", b"s3cret"), Login::WrongPassword);
        assert_eq!(passwords.check("rollout", b"new"), Login::WrongPassword);
        assert_eq!(passwords.check("nobody", b"new"), Login::UnknownUser);
    }

    #[test]
    fn the_sha512_format_of_older_mosquitto_files_is_read() {
        let salt = b"0123456789ab";
        let mut digest = Sha512::new();
        digest.update(b"pw");
        digest.update(salt);
        let line = format!(
            "old:$6${}${}",
            BASE64_STANDARD.encode(salt),
            BASE64_STANDARD.encode(digest.finalize())
        );
        let passwords = Passwords::parse(Path::new("p"), &line).unwrap();
        assert_eq!(passwords.check("old", b"pw"), Login::Ok);
        assert_eq!(passwords.check("old", b"pW"), Login::WrongPassword);
    }

    #[test]
    fn plain_text_and_junk_are_refused_with_the_line_number() {
        let err = Passwords::parse(Path::new("p"), "# users\nd1:hunter2\n").unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("p:2") && text.contains("plain-text"),
            "{text}"
        );
        assert!(Passwords::parse(Path::new("p"), "no colon here").is_err());
        assert!(Passwords::parse(Path::new("p"), "a/b:$6$AA==$AA==").is_err());
    }
}
