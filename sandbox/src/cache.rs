//! Compiled machine code on disk, so a module is compiled once per host and engine.
//!
//! Compiling the ~31 MB classifier with Cranelift takes ~10-20 s and ~600 MB; loading compiled
//! code back takes milliseconds. Entries are named `{module sha256}-{engine id}.cwasm`, so code is
//! never used across wasmtime versions, settings or CPU features (wasmtime checks that header
//! again on load); they are written atomically, and a lock file per entry makes a second node
//! of the host wait for the first one's compilation instead of compiling the same module again.
//! Cranelift's per-function incremental cache lives in `incremental/`: a new version that changes
//! only weights or a little code reuses the machine code of every unchanged function.
//!
//! # Machine code is code: every entry carries a MAC
//!
//! Loading a `.cwasm` runs whatever machine code is in it: wasmtime checks its header, not its
//! instructions. The signature on a module covers the `.wasm`, so without more, whoever can write
//! the cache directory (or the module directory it defaults to) would run native code outside
//! the sandbox. So every entry the sandbox writes carries an HMAC-SHA256 made with a
//! [`CacheKey`], a secret of this host that lives *outside* the module and cache directories
//! (`isomesh-node --cache-key`, by default beside the cache directory, created `0600`):
//!
//! * `{stem}.cwasm` sits beside `{stem}.mac`, the MAC over the entry's name and bytes, so the
//!   code of one module cannot be passed off as another's;
//! * each incremental-cache file starts with the MAC over its key and value.
//!
//! An entry whose MAC does not check out (a flipped byte, a file from elsewhere, a key that
//! changed) is logged, deleted and compiled again. The bytes are read and checked once and the
//! module is deserialized from those very bytes, so the file cannot be swapped in between.
//! Precompiled artifacts from a rollout enter the cache only after their digest was checked
//! against the signed manifest ([`Sandbox::store_precompiled`]); from then on they are MAC-ed
//! like code compiled here.

use crate::{LoadError, Sandbox};
use hmac::{Hmac, Mac};
use isomesh_module::digest::sha256_hex;
use isomesh_module::store::write_atomically;
use sha2::Sha256;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use wasmtime::Module;

/// Bytes of a cache key and of a MAC.
const KEY_LEN: usize = 32;
const MAC_LEN: usize = 32;
/// Domain separation: a MAC made for one kind of entry is no good for the other.
const CWASM_DOMAIN: &[u8] = b"isomesh compiled module v1\0";
const FUNCTION_DOMAIN: &[u8] = b"isomesh incremental function v1\0";

/// The node-local secret that MACs the compiled-code cache. Not `Debug`: it is a secret.
#[derive(Clone)]
pub struct CacheKey([u8; KEY_LEN]);

/// Why the cache key could not be had. The node stops: a cache it cannot check would either be
/// trusted blindly or never used.
#[derive(Debug, thiserror::Error)]
pub enum CacheKeyError {
    #[error("cannot read the compiled-code cache key {path} (--cache-key): {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot create the compiled-code cache key {path} (--cache-key): {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the compiled-code cache key {path} (--cache-key) holds {len} bytes, not {KEY_LEN}: delete it to have a new one made")]
    Length { path: PathBuf, len: usize },
    #[error("no randomness for a new compiled-code cache key: {0}")]
    Random(String),
    #[error("cannot place a cache key beside {0}: give its path explicitly")]
    NoPlace(PathBuf),
}

impl CacheKey {
    /// A new random key, kept in memory only.
    pub fn random() -> Result<CacheKey, CacheKeyError> {
        let mut key = [0u8; KEY_LEN];
        getrandom::fill(&mut key).map_err(|e| CacheKeyError::Random(e.to_string()))?;
        Ok(CacheKey(key))
    }

    /// Reads the key at `path`, or creates it there (32 random bytes, mode 0600) if there is
    /// none. Safe against several nodes of a host starting at once: the key is written to a
    /// file of its own and linked into place, so a reader never sees half a key and the first
    /// writer wins.
    pub fn load_or_create(path: &Path) -> Result<CacheKey, CacheKeyError> {
        match std::fs::read(path) {
            Ok(bytes) => return Self::parse(path, &bytes),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(CacheKeyError::Read {
                    path: path.to_owned(),
                    source,
                })
            }
        }
        let key = Self::random()?;
        let create = |source| CacheKeyError::Create {
            path: path.to_owned(),
            source,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(create)?;
        }
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".tmp-{}", std::process::id()));
        let tmp = PathBuf::from(tmp);
        let linked = write_private(&tmp, &key.0).and_then(|_| std::fs::hard_link(&tmp, path));
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => {
                tracing::info!(path = %path.display(), "created a new compiled-code cache key");
                Ok(key)
            }
            // Another node of the host made it first: use theirs.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                let bytes = std::fs::read(path).map_err(|source| CacheKeyError::Read {
                    path: path.to_owned(),
                    source,
                })?;
                Self::parse(path, &bytes)
            }
            Err(source) => Err(create(source)),
        }
    }

    fn parse(path: &Path, bytes: &[u8]) -> Result<CacheKey, CacheKeyError> {
        let key: [u8; KEY_LEN] = bytes.try_into().map_err(|_| CacheKeyError::Length {
            path: path.to_owned(),
            len: bytes.len(),
        })?;
        Ok(CacheKey(key))
    }

    /// Where a key goes by default for the directory `dir`: beside it, `{dir}.cache-key`, so
    /// that whoever may write `dir` cannot swap the key along with the entries.
    pub fn beside(dir: &Path) -> Result<PathBuf, CacheKeyError> {
        // "modules/" or "." must not yield a path inside the directory.
        let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_owned());
        let name = dir
            .file_name()
            .ok_or_else(|| CacheKeyError::NoPlace(dir.clone()))?;
        let mut file = name.to_owned();
        file.push(".cache-key");
        Ok(dir.with_file_name(file))
    }

    fn hmac(&self, parts: &[&[u8]]) -> Hmac<Sha256> {
        // A key of any length is accepted by HMAC; this cannot fail.
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.0)
            .unwrap_or_else(|_| unreachable!("HMAC takes keys of any length"));
        for part in parts {
            // Length-prefixed, so the split between parts is part of what is MAC-ed.
            mac.update(&(part.len() as u64).to_le_bytes());
            mac.update(part);
        }
        mac
    }

    /// The MAC over `parts`.
    pub(crate) fn mac(&self, parts: &[&[u8]]) -> [u8; MAC_LEN] {
        self.hmac(parts).finalize().into_bytes().into()
    }

    /// Whether `tag` is the MAC over `parts` (compared in constant time).
    pub(crate) fn verify(&self, parts: &[&[u8]], tag: &[u8]) -> bool {
        self.hmac(parts).verify_slice(tag).is_ok()
    }
}

/// Writes `bytes` to a new file only its owner may read.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.sync_all()
}

/// Why a cache entry was refused.
#[derive(Debug, thiserror::Error)]
enum EntryRefused {
    #[error("cannot read it: {0}")]
    Read(std::io::Error),
    #[error(
        "it has no MAC file ({0}); only code this node wrote or a signed manifest named is loaded"
    )]
    NoMac(String),
    #[error("its MAC does not match its bytes: it was changed or not written by this node")]
    BadMac,
}

impl Sandbox {
    /// Stores a precompiled artifact for the module with digest `module_sha256` where
    /// [`Sandbox::load_file`] looks for compiled code, MAC-ed as if compiled here. Only for
    /// artifacts whose digest was checked against a signed manifest: loading one runs its
    /// machine code.
    pub fn store_precompiled(&self, module_sha256: &str, code: &[u8]) -> std::io::Result<()> {
        let (Some(dir), Some(key)) = (&self.config.cache_dir, &self.cache_key) else {
            return Ok(());
        };
        std::fs::create_dir_all(dir)?;
        let stem = format!("{module_sha256}-{}", self.engine_id());
        let _lock = lock(dir, &stem);
        write_entry(dir, &stem, key, code)
    }

    /// Where the compiled code of the module with digest `module_sha256` is cached, if caching:
    /// the entry of the first of [`Sandbox::engine_ids`] that has one, else where this engine's
    /// would be.
    pub fn cached_code_path(&self, module_sha256: &str) -> Option<PathBuf> {
        let dir = self.config.cache_dir.as_ref()?;
        let entry = |id: &String| dir.join(format!("{module_sha256}-{id}.cwasm"));
        let ids = self.engine_ids();
        ids.iter()
            .map(entry)
            .find(|path| path.is_file())
            .or_else(|| ids.first().map(entry))
    }

    pub(crate) fn compile_cached(
        &self,
        path: &Path,
        bytes: &[u8],
        sha256: &str,
    ) -> Result<(Module, bool), LoadError> {
        let compile = || {
            Module::new(&self.engine, bytes).map_err(|e| LoadError::Compile {
                path: path.to_owned(),
                reason: format!("{e:#}"),
            })
        };
        let (Some(dir), Some(key)) = (&self.config.cache_dir, &self.cache_key) else {
            return Ok((compile()?, false));
        };
        let stem = format!("{sha256}-{}", self.engine_id());
        // The lock makes a second node on this host wait for the first one's compilation
        // instead of compiling the same module again.
        let _lock = std::fs::create_dir_all(dir)
            .ok()
            .and_then(|_| lock(dir, &stem));
        // Code compiled here (or a rollout's artifact, stored under this engine's id) first,
        // then portable code for this target (`isomesh compile --target` on another machine).
        for id in self.engine_ids() {
            let stem = format!("{sha256}-{id}");
            if let Some(module) = self.cached_entry(dir, &stem, key) {
                return Ok((module, true));
            }
        }
        let module = compile()?;
        match module.serialize() {
            Ok(code) => {
                if let Err(e) = write_entry(dir, &stem, key, &code) {
                    tracing::warn!(dir = %dir.display(), error = %e, "cannot write the compiled-module cache");
                }
            }
            Err(e) => tracing::warn!(error = %e, "cannot serialize compiled module"),
        }
        Ok((module, false))
    }
}

impl Sandbox {
    /// The module in the cache entry `stem`, if there is one, its MAC checks out and this engine
    /// loads it. An entry with a bad MAC is deleted; one this engine refuses is left alone.
    fn cached_entry(&self, dir: &Path, stem: &str, key: &CacheKey) -> Option<Module> {
        let cached = dir.join(format!("{stem}.cwasm"));
        if !cached.is_file() {
            return None;
        }
        match read_entry(dir, stem, key) {
            Ok(code) => {
                // SAFETY: `code` carries this node's MAC over the entry's name and bytes: it
                // was serialized by this node's engine (or is a precompiled artifact whose
                // digest a signed manifest named, or code compiled for this target with this
                // cache's key), and it is the very buffer that was checked. wasmtime checks the
                // engine header and the CPU features the code needs again.
                match unsafe { Module::deserialize(&self.engine, &code) } {
                    Ok(module) => {
                        tracing::info!(file = %cached.display(), "compiled code reused from the cache (MAC checked)");
                        Some(module)
                    }
                    Err(e) => {
                        tracing::warn!(file = %cached.display(), error = %format!("{e:#}"), "cache entry unusable; compiling the module");
                        None
                    }
                }
            }
            Err(reason) => {
                tracing::warn!(file = %cached.display(), %reason, "compiled-code cache entry refused; deleting it and compiling the module");
                let _ = std::fs::remove_file(&cached);
                let _ = std::fs::remove_file(mac_path(dir, stem));
                None
            }
        }
    }
}

/// Locks the entry `stem` against other nodes of the host until the file is dropped.
fn lock(dir: &Path, stem: &str) -> Option<std::fs::File> {
    std::fs::File::create(dir.join(format!("{stem}.lock")))
        .and_then(|file| file.lock().map(|_| file))
        .ok()
}

fn mac_path(dir: &Path, stem: &str) -> PathBuf {
    dir.join(format!("{stem}.mac"))
}

/// Writes the code, then its MAC: a reader between the two finds no (or an old) MAC and
/// compiles, which is slow but never wrong.
pub(crate) fn write_entry(
    dir: &Path,
    stem: &str,
    key: &CacheKey,
    code: &[u8],
) -> std::io::Result<()> {
    let mac = key.mac(&[CWASM_DOMAIN, stem.as_bytes(), code]);
    write_atomically(&dir.join(format!("{stem}.cwasm")), code)?;
    write_atomically(&mac_path(dir, stem), &mac)
}

/// The bytes of the entry `stem`, if its MAC checks out.
fn read_entry(dir: &Path, stem: &str, key: &CacheKey) -> Result<Vec<u8>, EntryRefused> {
    let mac = match std::fs::read(mac_path(dir, stem)) {
        Ok(mac) => mac,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(EntryRefused::NoMac(format!("{stem}.mac")))
        }
        Err(e) => return Err(EntryRefused::Read(e)),
    };
    let code = std::fs::read(dir.join(format!("{stem}.cwasm"))).map_err(EntryRefused::Read)?;
    if !key.verify(&[CWASM_DOMAIN, stem.as_bytes(), &code], &mac) {
        return Err(EntryRefused::BadMac);
    }
    Ok(code)
}

/// Cranelift's incremental compilation cache on disk: one file per compiled function, named by
/// the digest of its key (the function's body and the compiler's settings), holding the MAC over
/// key and value, then the value.
#[derive(Debug)]
pub(crate) struct FunctionCache {
    pub(crate) dir: PathBuf,
    pub(crate) key: Arc<CacheKey>,
    /// Whether a refused entry was logged already: after a key change every entry fails, and
    /// one warning says as much as thousands.
    pub(crate) warned: AtomicBool,
}

impl std::fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CacheKey(..)")
    }
}

impl FunctionCache {
    pub(crate) fn new(dir: PathBuf, key: Arc<CacheKey>) -> FunctionCache {
        FunctionCache {
            dir,
            key,
            warned: AtomicBool::new(false),
        }
    }

    fn path(&self, key: &[u8]) -> PathBuf {
        let digest = sha256_hex(key);
        self.dir.join(&digest[..2]).join(&digest[2..])
    }
}

impl wasmtime::CacheStore for FunctionCache {
    fn get(&self, key: &[u8]) -> Option<std::borrow::Cow<'_, [u8]>> {
        let path = self.path(key);
        let mut entry = std::fs::read(&path).ok()?;
        let good = entry.len() >= MAC_LEN && {
            let (mac, value) = entry.split_at(MAC_LEN);
            self.key.verify(&[FUNCTION_DOMAIN, key, value], mac)
        };
        if !good {
            if !self.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(dir = %self.dir.display(), "incremental compilation cache entries fail their MAC; deleting them and compiling those functions");
            }
            tracing::debug!(file = %path.display(), "refused incremental cache entry");
            let _ = std::fs::remove_file(&path);
            return None;
        }
        entry.drain(..MAC_LEN);
        Some(entry.into())
    }

    fn insert(&self, key: &[u8], value: Vec<u8>) -> bool {
        let path = self.path(key);
        let Some(dir) = path.parent() else {
            return false;
        };
        let mut entry = self.key.mac(&[FUNCTION_DOMAIN, key, &value]).to_vec();
        entry.extend_from_slice(&value);
        std::fs::create_dir_all(dir)
            .and_then(|_| write_atomically(&path, &entry))
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SandboxConfig;

    fn sandbox(dir: &Path) -> Sandbox {
        Sandbox::new(SandboxConfig {
            cache_dir: Some(dir.join("cache")),
            cache_key_file: Some(dir.join("cache.key")),
            ..SandboxConfig::default()
        })
        .expect("sandbox")
    }

    fn module(answer: i32) -> (Vec<u8>, String) {
        let wasm = wat::parse_str(format!(
            r#"(module (func (export "answer") (result i32) i32.const {answer}))"#
        ))
        .expect("wat");
        let sha = sha256_hex(&wasm);
        (wasm, sha)
    }

    fn answer(sandbox: &Sandbox, module: &Module) -> i32 {
        let mut store = wasmtime::Store::new(&sandbox.engine, ());
        store.set_epoch_deadline(u64::MAX / 2);
        let instance = wasmtime::Instance::new(&mut store, module, &[]).expect("instance");
        instance
            .get_typed_func::<(), i32>(&mut store, "answer")
            .expect("answer")
            .call(&mut store, ())
            .expect("call")
    }

    #[test]
    fn the_key_is_made_once_private_and_kept() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("keys/node.cache-key");
        let made = CacheKey::load_or_create(&path).expect("made");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).expect("meta").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let read = CacheKey::load_or_create(&path).expect("read");
        assert_eq!(made.0, read.0);
        std::fs::write(&path, b"short").expect("write");
        let error = CacheKey::load_or_create(&path).expect_err("refused");
        assert!(error.to_string().contains("holds 5 bytes"), "{error}");
    }

    #[test]
    fn the_default_key_sits_beside_the_directory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let modules = dir.path().join("modules");
        std::fs::create_dir_all(&modules).expect("mkdir");
        let beside = CacheKey::beside(&modules.join(".")).expect("beside");
        assert_eq!(beside.parent(), modules.canonicalize().expect("c").parent());
        assert!(!beside.starts_with(modules.canonicalize().expect("c")));
    }

    #[test]
    fn code_written_here_is_reused_and_tampered_code_is_not() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (one, one_sha) = module(1);
        let (two, two_sha) = module(2);
        let path = Path::new("<test>");
        let sandbox = sandbox(dir.path());
        let (_, cached) = sandbox.compile_cached(path, &one, &one_sha).expect("one");
        assert!(!cached, "first load compiles");
        let (loaded, cached) = sandbox.compile_cached(path, &one, &one_sha).expect("one");
        assert!(cached, "the node-written entry is reused");
        assert_eq!(answer(&sandbox, &loaded), 1);
        sandbox.compile_cached(path, &two, &two_sha).expect("two");

        // Module two's machine code (with its MAC) filed under module one: refused.
        let entry = |sha: &str| sandbox.cached_code_path(sha).expect("cache");
        let mac = |sha: &str| entry(sha).with_extension("mac");
        std::fs::copy(entry(&two_sha), entry(&one_sha)).expect("copy");
        std::fs::copy(mac(&two_sha), mac(&one_sha)).expect("copy");
        let (loaded, cached) = sandbox.compile_cached(path, &one, &one_sha).expect("one");
        assert!(!cached, "another module's code is not loaded");
        assert_eq!(answer(&sandbox, &loaded), 1);

        // A flipped byte: refused, recompiled, and the rewritten entry is good again.
        let mut code = std::fs::read(entry(&one_sha)).expect("read");
        let last = code.len() - 1;
        code[last] ^= 1;
        std::fs::write(entry(&one_sha), &code).expect("write");
        let (_, cached) = sandbox.compile_cached(path, &one, &one_sha).expect("one");
        assert!(!cached, "changed code is not loaded");
        assert!(sandbox.compile_cached(path, &one, &one_sha).expect("one").1);

        // No MAC (say, code dropped in by hand): refused.
        std::fs::remove_file(mac(&one_sha)).expect("rm");
        assert!(!sandbox.compile_cached(path, &one, &one_sha).expect("one").1);

        // Another node key: nothing it finds is trusted.
        let other = Sandbox::new(SandboxConfig {
            cache_dir: Some(dir.path().join("cache")),
            cache_key_file: Some(dir.path().join("other.key")),
            ..SandboxConfig::default()
        })
        .expect("sandbox");
        assert!(!other.compile_cached(path, &one, &one_sha).expect("one").1);
    }

    #[test]
    fn incremental_entries_with_a_bad_mac_are_dropped() {
        use wasmtime::CacheStore;
        let dir = tempfile::tempdir().expect("tempdir");
        let key = Arc::new(CacheKey::random().expect("key"));
        let cache = FunctionCache::new(dir.path().to_owned(), key);
        assert!(cache.insert(b"function", b"machine code".to_vec()));
        assert_eq!(
            cache.get(b"function").as_deref(),
            Some(&b"machine code"[..])
        );
        let path = cache.path(b"function");
        let mut entry = std::fs::read(&path).expect("read");
        let last = entry.len() - 1;
        entry[last] ^= 1;
        std::fs::write(&path, &entry).expect("write");
        assert!(cache.get(b"function").is_none());
        assert!(!path.exists(), "the bad entry is deleted");
    }
}
