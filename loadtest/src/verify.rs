//! "No data lost": after a write run, count each invocation's rows on a
//! direct connection and compare with what the invocations reported.
//!
//! * `lost`: reported success, but 0 rows — the one outcome a proxy must
//!   never produce.
//! * `duplicated`: more than 1 row — typically a retried INSERT whose first
//!   COMMIT succeeded but whose answer was lost on the way back.
//! * `unacknowledged`: rows for invocations that did *not* report success
//!   (committed, then timed out or lost the answer). Not an error: the
//!   function could not know; reported for insight.
//!
//! Also holds test hooks that damage a run's rows on purpose, so the
//! detection itself can be tested.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use tokio_postgres::types::Type;

use crate::db::connect_admin;
use crate::db::redact_url;
use crate::report::{Report, Verification};
use crate::retry::full_message;
use crate::workload::{invocation_id, WRITES_TABLE};
use crate::LoadtestError;

const ADMIN_TIMEOUT: Duration = Duration::from_secs(15);
/// How many example ids to list for lost/duplicated writes.
const EXAMPLES: usize = 10;

/// Verify the writes of `report`'s run through `verify_url` (a direct URL).
pub async fn verify(verify_url: &str, report: &Report) -> Result<Verification, LoadtestError> {
    verify_writes(verify_url, &report.run_id, &report.acked_writes).await
}

/// Verify run `run_id` given the sequence numbers of acknowledged writes.
pub async fn verify_writes(
    verify_url: &str,
    run_id: &str,
    acked: &[u64],
) -> Result<Verification, LoadtestError> {
    let err = |e: tokio_postgres::Error| LoadtestError::Verify {
        target: redact_url(verify_url),
        reason: full_message(&e),
    };
    let client = connect_admin(verify_url, ADMIN_TIMEOUT).await?;
    let rows = client
        .query_typed(
            &format!("SELECT seq, count(*) FROM {WRITES_TABLE} WHERE run_id = $1 GROUP BY seq"),
            &[(&run_id, Type::TEXT)],
        )
        .await
        .map_err(err)?;
    let mut found: HashMap<u64, i64> = HashMap::with_capacity(rows.len());
    for row in &rows {
        let seq: i64 = row.try_get(0).map_err(err)?;
        let n: i64 = row.try_get(1).map_err(err)?;
        found.insert(seq as u64, n);
    }
    Ok(compare(run_id, acked, &found))
}

/// Pure comparison of acknowledged writes against row counts per seq.
pub fn compare(run_id: &str, acked: &[u64], found: &HashMap<u64, i64>) -> Verification {
    let mut v = Verification {
        checked: acked.len() as u64,
        rows: found.values().map(|&n| n.max(0) as u64).sum(),
        ..Verification::default()
    };
    let acked_set: HashSet<u64> = acked.iter().copied().collect();
    let mut lost: Vec<u64> = acked_set
        .iter()
        .copied()
        .filter(|s| found.get(s).copied().unwrap_or(0) == 0)
        .collect();
    lost.sort_unstable();
    v.lost = lost.len() as u64;
    v.lost_ids = lost
        .iter()
        .take(EXAMPLES)
        .map(|&s| invocation_id(run_id, s))
        .collect();
    let mut dup: Vec<u64> = found
        .iter()
        .filter(|(_, &n)| n > 1)
        .map(|(&s, _)| s)
        .collect();
    dup.sort_unstable();
    v.duplicated = dup.len() as u64;
    v.duplicated_ids = dup
        .iter()
        .take(EXAMPLES)
        .map(|&s| invocation_id(run_id, s))
        .collect();
    v.unacknowledged = found
        .iter()
        .filter(|(s, &n)| n > 0 && !acked_set.contains(s))
        .count() as u64;
    v
}

/// Test hook: delete the rows of up to `n` acknowledged writes of this run,
/// as if the proxy had lost them. Returns the seqs deleted.
pub async fn plant_lost_writes(
    verify_url: &str,
    report: &Report,
    n: usize,
) -> Result<Vec<u64>, LoadtestError> {
    let victims: Vec<i64> = report
        .acked_writes
        .iter()
        .take(n)
        .map(|&s| s as i64)
        .collect();
    let client = connect_admin(verify_url, ADMIN_TIMEOUT).await?;
    client
        .execute_typed(
            &format!("DELETE FROM {WRITES_TABLE} WHERE run_id = $1 AND seq = ANY($2)"),
            &[(&report.run_id, Type::TEXT), (&victims, Type::INT8_ARRAY)],
        )
        .await
        .map_err(|e| LoadtestError::Verify {
            target: redact_url(verify_url),
            reason: full_message(&e),
        })?;
    Ok(victims.into_iter().map(|s| s as u64).collect())
}

/// Test hook: insert a second copy of up to `n` acknowledged writes, as if a
/// retry had re-run a committed INSERT. Returns the seqs duplicated.
pub async fn plant_duplicate_writes(
    verify_url: &str,
    report: &Report,
    n: usize,
) -> Result<Vec<u64>, LoadtestError> {
    let victims: Vec<i64> = report
        .acked_writes
        .iter()
        .rev()
        .take(n)
        .map(|&s| s as i64)
        .collect();
    let client = connect_admin(verify_url, ADMIN_TIMEOUT).await?;
    client
        .execute_typed(
            &format!(
                "INSERT INTO {WRITES_TABLE} (run_id, seq, invocation_id, attempt) \
                 SELECT run_id, seq, invocation_id, attempt + 100 FROM {WRITES_TABLE} \
                 WHERE run_id = $1 AND seq = ANY($2)"
            ),
            &[(&report.run_id, Type::TEXT), (&victims, Type::INT8_ARRAY)],
        )
        .await
        .map_err(|e| LoadtestError::Verify {
            target: redact_url(verify_url),
            reason: full_message(&e),
        })?;
    Ok(victims.into_iter().map(|s| s as u64).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_lost_duplicated_and_unacknowledged() {
        let acked = [1, 2, 3, 4];
        let found: HashMap<u64, i64> = [(1, 1), (2, 2), (4, 1), (5, 1), (6, 3)].into();
        let v = compare("r", &acked, &found);
        assert_eq!(v.checked, 4);
        assert_eq!(v.lost, 1);
        assert_eq!(v.lost_ids, vec!["r-3"]);
        assert_eq!(v.duplicated, 2);
        assert_eq!(v.duplicated_ids, vec!["r-2", "r-6"]);
        assert_eq!(v.unacknowledged, 2);
        assert_eq!(v.rows, 8);
        let clean = compare("r", &[1, 2], &[(1, 1), (2, 1)].into());
        assert_eq!((clean.lost, clean.duplicated), (0, 0));
    }
}
