//! The cache's size budget: `RUNNER_CACHE_BUDGET` (e.g. `20GiB`) bounds the cached files under
//! `$RUNNER_HOME/cache`; a runner that starts and finds them over it removes the least recently written ones that
//! no unfinished change uses until they fit. Unset, nothing is removed automatically (`runner cache prune` is).

use std::path::Path;

use super::prune::{entries, remove, InUse, PruneError, Pruned};

/// The variable holding the budget.
pub const VARIABLE: &str = "RUNNER_CACHE_BUDGET";

/// The budget in bytes from `value` (the variable's), `None` when unset; a value that is not a size is an error
/// naming what to write.
pub fn parse(value: Option<&str>) -> Result<Option<u64>, String> {
    value
        .map(|text| {
            crate::policy::resources::parse_size(text)
                .map_err(|e| format!("{VARIABLE}={text:?}: {e} (e.g. 20GiB)"))
        })
        .transpose()
}

/// Removes unused cached files, least recently written first, until what stays fits in `budget` bytes (or only
/// what is in use or being built is left). Returns what went.
pub fn prune_to_budget(home: &Path, used: &InUse, budget: u64) -> Result<Vec<Pruned>, PruneError> {
    let mut all = entries(home, used)?;
    let mut total: u64 = all.iter().map(|e| e.bytes).sum();
    let mut pruned = vec![];
    all.retain(|e| !e.in_use);
    all.sort_by_key(|e| e.modified);
    for entry in all {
        if total <= budget {
            break;
        }
        if let Some(gone) = remove(&entry, false)? {
            total = total.saturating_sub(gone.bytes);
            pruned.push(gone);
        }
    }
    Ok(pruned)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    fn cached(home: &Path, sha: &str, bytes: usize, age_s: u64) {
        let dir = crate::cache::repo_tars(home);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(format!("{sha}.tar"));
        std::fs::write(&path, vec![0u8; bytes]).unwrap();
        std::fs::File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(SystemTime::now() - Duration::from_secs(age_s))
            .unwrap();
    }

    #[test]
    fn the_oldest_unused_files_go_until_the_rest_fits() {
        let home = tempfile::tempdir().unwrap();
        cached(home.path(), "old-in-use", 1000, 400);
        cached(home.path(), "oldest", 1000, 300);
        cached(home.path(), "older", 1000, 200);
        cached(home.path(), "newest", 1000, 100);
        let used = InUse {
            shas: ["old-in-use".to_owned()].into(),
            ..InUse::default()
        };
        let pruned = prune_to_budget(home.path(), &used, 2500).unwrap();
        let gone: Vec<_> = pruned
            .iter()
            .map(|p| p.what.rsplit('/').next().unwrap())
            .collect();
        assert_eq!(gone, ["oldest.tar", "older.tar"]);
        let left = |sha: &str| {
            crate::cache::repo_tars(home.path())
                .join(format!("{sha}.tar"))
                .exists()
        };
        assert!(left("old-in-use") && left("newest"));
        assert!(!left("oldest") && !left("older"));
        assert!(
            prune_to_budget(home.path(), &used, 2500)
                .unwrap()
                .is_empty(),
            "it fits now"
        );
    }

    #[test]
    fn what_is_in_use_stays_even_over_budget() {
        let home = tempfile::tempdir().unwrap();
        cached(home.path(), "running", 5000, 10);
        let used = InUse {
            shas: ["running".to_owned()].into(),
            ..InUse::default()
        };
        assert!(prune_to_budget(home.path(), &used, 1).unwrap().is_empty());
    }

    #[test]
    fn a_budget_that_is_not_a_size_is_refused_by_name() {
        assert_eq!(parse(None), Ok(None));
        assert_eq!(parse(Some("2KiB")), Ok(Some(2048)));
        let err = parse(Some("lots")).unwrap_err();
        assert!(
            err.contains("RUNNER_CACHE_BUDGET=\"lots\"") && err.contains("20GiB"),
            "{err}"
        );
    }
}
