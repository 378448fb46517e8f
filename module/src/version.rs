//! Which of two versions of a module is newer: what decides whether a rollout is an upgrade, a
//! downgrade (refused unless forced by a newer signed manifest) or the same version again.
//!
//! Versions are [Semantic Versioning 2.0](https://semver.org) and ordered by its precedence,
//! through the `semver` crate: `0.10.0` > `0.9.1`, and a pre-release ranks below its release
//! (`1.0.0-rc1` < `1.0.0`), so a release candidate can never hold a node back from the release.
//! Build metadata (`+build.5`) does not count: two builds of one version are the same version.
//! A version that is not semver cannot be ordered, and says so rather than guessing.

use std::cmp::Ordering;

/// A module version that is not Semantic Versioning, so cannot be ordered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("version {version:?} is not a semantic version (MAJOR.MINOR.PATCH[-PRE][+BUILD], e.g. 1.2.0): {reason}")]
pub struct VersionError {
    pub version: String,
    pub reason: String,
}

/// Parses a module version.
pub fn parse(version: &str) -> Result<semver::Version, VersionError> {
    semver::Version::parse(version).map_err(|e| VersionError {
        version: version.to_string(),
        reason: e.to_string(),
    })
}

/// Orders `a` against `b` by semver precedence; an error names the one that is not semver.
pub fn compare_versions(a: &str, b: &str) -> Result<Ordering, VersionError> {
    Ok(parse(a)?.cmp_precedence(&parse(b)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmp(a: &str, b: &str) -> Ordering {
        compare_versions(a, b).unwrap()
    }

    #[test]
    fn versions_compare_by_semver_precedence() {
        assert_eq!(cmp("0.10.0", "0.9.1"), Ordering::Greater);
        assert_eq!(cmp("1.2.0", "1.2.0"), Ordering::Equal);
        assert_eq!(cmp("2.0.0-rc1", "2.0.0-rc2"), Ordering::Less);
        assert_eq!(cmp("2.0.0-rc.2", "2.0.0-rc.10"), Ordering::Less);
    }

    #[test]
    fn a_release_candidate_ranks_below_its_release() {
        assert_eq!(cmp("1.0.0-rc1", "1.0.0"), Ordering::Less);
        assert_eq!(cmp("1.0.0", "1.0.0-rc1"), Ordering::Greater);
    }

    #[test]
    fn build_metadata_does_not_make_a_newer_version() {
        assert_eq!(cmp("1.0.0+build.2", "1.0.0+build.1"), Ordering::Equal);
    }

    #[test]
    fn a_version_that_is_not_semver_is_a_clear_error() {
        let err = compare_versions("1.2", "1.2.1").unwrap_err();
        assert_eq!(err.version, "1.2");
        assert!(err.to_string().contains("not a semantic version"), "{err}");
        assert!(compare_versions("1.0.0", "latest").is_err());
    }
}
