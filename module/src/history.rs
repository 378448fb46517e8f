//! What a node accepted before: the defence against rollbacks and replays.
//!
//! Every manifest is signed, but a signature does not expire: anyone who can publish on the
//! module topics (or who recorded an old retained message) could otherwise hand a node an old,
//! signed manifest forever, `force` flag and all. So a node remembers, per module name, the last
//! signed manifest it accepted (served), and applies two rules to every new one:
//!
//! 1. **Newer instruction.** Its `published_at_ms` (set by the publisher, covered by the
//!    signature) must be later than that of every manifest the node accepted before, of any
//!    name: the node has a single slot, so another name's older manifest is as much a replay as
//!    its own. Refused as [`Rejection::Replay`].
//! 2. **Newest version wins.** Of the same name, a lower version ([`crate::version`], semver
//!    precedence) is a [`Rejection::Downgrade`] and another build of the same version a
//!    [`Rejection::SameVersion`], unless the manifest is forced; a forced one still has to pass
//!    rule 1, so a downgrade needs a *newer* signed instruction, never a replayed one.
//!
//! Only the publisher's clock is compared, with itself: the node's clock does not matter, but a
//! publisher whose clock runs behind the one that signed the served module is refused until it
//! catches up. The history lives in the module directory (`.history`, one line per name, written
//! whole with [`crate::store::write_atomically`]), so it survives restarts; whoever can write
//! that directory can also delete it, and then the node accepts any signed manifest newer than
//! the module it serves, as an empty node accepts any signed manifest at all.

use crate::digest::short;
use crate::rejection::Rejection;
use crate::version::compare_versions;
use isomesh_protos::ModuleManifest;
use std::cmp::Ordering;
use std::collections::BTreeMap;
use std::path::Path;

/// The history's file in the module directory.
pub const HISTORY_FILE: &str = ".history";

/// The last manifest of one name a node accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub name: String,
    pub version: String,
    pub sha256: String,
    pub published_at_ms: u64,
}

impl Accepted {
    fn of(manifest: &ModuleManifest) -> Accepted {
        Accepted {
            name: manifest.name.clone(),
            version: manifest.version.clone(),
            sha256: manifest.sha256.clone(),
            published_at_ms: manifest.published_at_ms,
        }
    }
}

/// The manifests a node accepted, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History {
    by_name: BTreeMap<String, Accepted>,
}

impl History {
    /// The history holding one served manifest: what a node knows when it has no file.
    pub fn serving(manifest: &ModuleManifest) -> History {
        let mut history = History::default();
        history.accept(manifest);
        history
    }

    /// The manifest accepted last, of any name: the one published last, as each accepted
    /// manifest had to be published after all the others.
    pub fn last(&self) -> Option<&Accepted> {
        self.by_name.values().max_by_key(|a| a.published_at_ms)
    }

    /// The last accepted manifest named `name`.
    pub fn of(&self, name: &str) -> Option<&Accepted> {
        self.by_name.get(name)
    }

    /// Records that `manifest` (signature checked by the caller) is served. Returns whether the
    /// history changed; an older manifest of the same name never overwrites a newer one.
    pub fn accept(&mut self, manifest: &ModuleManifest) -> bool {
        if self
            .by_name
            .get(&manifest.name)
            .is_some_and(|a| a.published_at_ms >= manifest.published_at_ms)
        {
            return false;
        }
        self.by_name
            .insert(manifest.name.clone(), Accepted::of(manifest));
        true
    }

    /// Whether `offered` (signed, well formed, not the module served) may replace what this
    /// node accepted before: the two rules of the module's documentation.
    pub fn check(&self, offered: &ModuleManifest) -> Result<(), Rejection> {
        if let Some(last) = self.last() {
            if offered.published_at_ms <= last.published_at_ms {
                return Err(Rejection::Replay {
                    offered: format!("{}@{}", offered.name, offered.version),
                    published_at_ms: offered.published_at_ms,
                    accepted: format!("{}@{}", last.name, last.version),
                    accepted_at_ms: last.published_at_ms,
                });
            }
        }
        let Some(previous) = self.of(&offered.name) else {
            return Ok(());
        };
        match compare_versions(&offered.version, &previous.version) {
            Ok(Ordering::Less) if !offered.force => Err(Rejection::Downgrade {
                offered: offered.version.clone(),
                served: previous.version.clone(),
            }),
            Ok(Ordering::Equal) if !offered.force && offered.sha256 != previous.sha256 => {
                Err(Rejection::SameVersion {
                    version: offered.version.clone(),
                    served: short(&previous.sha256).to_string(),
                })
            }
            Ok(_) => Ok(()),
            // The new version cannot be ordered against the old one: refuse it, named.
            Err(e) if e.version == offered.version => Err(e.into()),
            // Only the accepted version is not semver (a module from before the rule): the
            // newer signed instruction (rule 1, passed above) decides.
            Err(e) => {
                tracing::warn!(error = %e, "the accepted version cannot be ordered; the newer manifest wins");
                Ok(())
            }
        }
    }

    /// One line per name: `name version sha256 published_at_ms`, separated by spaces (names and
    /// versions have none: see `check_manifest`).
    pub fn encode(&self) -> String {
        self.by_name
            .values()
            .map(|a| {
                format!(
                    "{} {} {} {}\n",
                    a.name, a.version, a.sha256, a.published_at_ms
                )
            })
            .collect()
    }

    /// Reads [`History::encode`]'s text; lines that do not parse are skipped and logged.
    pub fn decode(text: &str) -> History {
        let mut history = History::default();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let parts: Vec<&str> = line.split(' ').collect();
            let parsed = match parts.as_slice() {
                [name, version, sha256, at] => at.parse::<u64>().ok().map(|at| Accepted {
                    name: name.to_string(),
                    version: version.to_string(),
                    sha256: sha256.to_string(),
                    published_at_ms: at,
                }),
                _ => None,
            };
            match parsed {
                Some(accepted) => {
                    history.by_name.insert(accepted.name.clone(), accepted);
                }
                None => tracing::warn!(%line, "unreadable line of the rollout history skipped"),
            }
        }
        history
    }

    /// The history kept in the module directory `dir` (empty if there is none yet).
    pub fn load(dir: &Path) -> History {
        match std::fs::read_to_string(dir.join(HISTORY_FILE)) {
            Ok(text) => History::decode(&text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => History::default(),
            Err(e) => {
                tracing::warn!(dir = %dir.display(), error = %e, "cannot read the rollout history; starting from the served module");
                History::default()
            }
        }
    }

    /// Writes the history into the module directory `dir`, whole.
    pub fn save(&self, dir: &Path) -> std::io::Result<()> {
        crate::store::write_atomically(&dir.join(HISTORY_FILE), self.encode().as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(name: &str, version: &str, at: u64, force: bool) -> ModuleManifest {
        ModuleManifest {
            name: name.into(),
            version: version.into(),
            sha256: crate::digest::sha256_hex(format!("{name}{version}{at}").as_bytes()),
            published_at_ms: at,
            force,
            ..Default::default()
        }
    }

    fn code(history: &History, offered: &ModuleManifest) -> Option<&'static str> {
        history.check(offered).err().map(|r| r.code())
    }

    #[test]
    fn a_manifest_not_published_after_the_accepted_one_is_a_replay() {
        let history = History::serving(&manifest("m", "0.2.0", 200, false));
        // Even forced, even a higher version: an old instruction stays old.
        assert_eq!(
            code(&history, &manifest("m", "0.1.0", 100, true)),
            Some("replay")
        );
        assert_eq!(
            code(&history, &manifest("m", "0.3.0", 200, false)),
            Some("replay")
        );
        assert_eq!(code(&history, &manifest("m", "0.3.0", 201, false)), None);
    }

    #[test]
    fn another_names_older_manifest_is_a_replay_too() {
        let history = History::serving(&manifest("m", "0.2.0", 200, false));
        assert_eq!(
            code(&history, &manifest("other", "9.0.0", 150, false)),
            Some("replay")
        );
        assert_eq!(
            code(&history, &manifest("other", "1.0.0", 250, false)),
            None
        );
    }

    #[test]
    fn a_downgrade_needs_force_and_a_newer_signed_instruction() {
        let history = History::serving(&manifest("m", "0.2.0", 200, false));
        assert_eq!(
            code(&history, &manifest("m", "0.1.0", 300, false)),
            Some("downgrade")
        );
        assert_eq!(code(&history, &manifest("m", "0.1.0", 300, true)), None);
        // A release candidate is older than its release.
        assert_eq!(
            code(&history, &manifest("m", "0.2.0-rc1", 300, false)),
            Some("downgrade")
        );
        assert_eq!(
            code(&history, &manifest("m", "0.2.0", 300, false)),
            Some("same-version")
        );
    }

    #[test]
    fn the_newest_version_of_a_name_wins_after_another_name_served() {
        let mut history = History::serving(&manifest("m", "2.0.0", 100, false));
        history.accept(&manifest("other", "1.0.0", 200, false));
        assert_eq!(
            code(&history, &manifest("m", "1.0.0", 300, false)),
            Some("downgrade")
        );
    }

    #[test]
    fn a_version_that_is_not_semver_is_refused_when_it_must_be_ordered() {
        let history = History::serving(&manifest("m", "0.2.0", 200, false));
        let err = history
            .check(&manifest("m", "latest", 300, false))
            .unwrap_err();
        assert_eq!(err.code(), "version");
        assert!(err.to_string().contains("\"latest\""), "{err}");
        // A new name needs no ordering.
        assert_eq!(code(&history, &manifest("n", "t1", 300, false)), None);
    }

    #[test]
    fn the_history_survives_a_restart_and_never_goes_back() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(History::load(dir.path()), History::default());
        let mut history = History::default();
        assert!(history.accept(&manifest("m", "0.2.0", 200, false)));
        assert!(history.accept(&manifest("n", "1.0.0", 300, false)));
        assert!(!history.accept(&manifest("m", "0.1.0", 100, true)));
        history.save(dir.path()).unwrap();
        let again = History::load(dir.path());
        assert_eq!(again, history);
        assert_eq!(again.last().unwrap().name, "n");
        std::fs::write(dir.path().join(HISTORY_FILE), "garbage\nm 1.0.0 ab 5\n").unwrap();
        assert_eq!(
            History::load(dir.path()).of("m").unwrap().published_at_ms,
            5
        );
    }
}
