//! What a running node tells `blossom-p2p status`: a small JSON file in its
//! data directory, replaced atomically (write, fsync, rename) whenever
//! something changes, so a reader never sees half of it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const STATUS_FILE: &str = "status.json";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub pid: u32,
    pub peer_id: String,
    pub run_id: String,
    pub connected_peers: Vec<String>,
    /// How each connected peer is reached: `direct`, or `relayed via <relay>`.
    #[serde(default)]
    pub peer_paths: BTreeMap<String, String>,
    /// The round being trained or collected.
    pub round: u64,
    pub rounds: u64,
    pub last_average: Option<String>,
    /// Of the last round's updates, the share that trained from this node's
    /// previous average.
    pub agreement: Option<f64>,
    pub last_eval_loss: Option<f32>,
    /// Payload bytes of gossip and requests (not counting protocol framing).
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub rejected: u64,
    /// Rejections by kind ([`rejection_kind`]).
    #[serde(default)]
    pub rejected_by_reason: BTreeMap<String, u64>,
    /// The newest of this node's averages that two thirds of its round's
    /// contributors attested: what late joiners get from it.
    #[serde(default)]
    pub certified: Option<CertifiedRound>,
    /// Peers proven to misbehave and left out of the run, with the proof in words.
    #[serde(default)]
    pub quarantined: BTreeMap<String, String>,
    pub finished: bool,
    /// Seconds since the Unix epoch at the last update.
    pub updated: u64,
}

/// A certified average, as `status` and the dashboard show it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CertifiedRound {
    pub round: u64,
    pub average: String,
    pub signers: usize,
    pub contributors: usize,
}

impl std::fmt::Display for CertifiedRound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "round {} ({} of {} contributors signed)", self.round, self.signers, self.contributors)
    }
}

/// The kind of a rejection, from its message (metrics label): what the
/// check that failed was about.
pub fn rejection_kind(reason: &str) -> &'static str {
    const KINDS: [(&[&str], &str); 14] = [
        (&["lying-reducer"], "lying-reducer"),
        (&["quarantined"], "quarantined"),
        (&["certificate", "attests"], "certificate"),
        (&["of the run"], "future-round"),
        (&["signature", "signing key"], "signature"),
        (&["allowlist"], "not-allowed"),
        (&["on the topic of run", "did not join", "wrong run"], "wrong-run"),
        (&["outside the round window"], "stale-round"),
        (&["second, different update", "two different claims", "equivocation"], "equivocation"),
        (&["wrong weight"], "wrong-weight"),
        (&["NaN or infinite", "non-finite"], "non-finite"),
        (&["has shape", "unexpected tensor", "tensors, missing"], "wrong-shape"),
        (&["travel as float32"], "wrong-dtype"),
        (&["hashes to", "does not match", "not chunk"], "hash-mismatch"),
    ];
    KINDS
        .iter()
        .find(|(needles, _)| needles.iter().any(|n| reason.contains(n)))
        .map_or("malformed", |(_, kind)| kind)
}

/// `" (3 stale-round, 1 signature)"`, or nothing when there are none: the
/// counts by kind after a total, as `status` and `simulate` print them.
pub fn rejection_detail(counts: &BTreeMap<String, u64>) -> String {
    if counts.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = counts.iter().map(|(kind, n)| format!("{n} {kind}")).collect();
    format!(" ({})", parts.join(", "))
}

pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(STATUS_FILE)
}

impl NodeStatus {
    pub fn write(&mut self, data_dir: &Path) -> std::io::Result<()> {
        self.updated = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let bytes = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        crate::durable::write_atomically(&data_dir.join(format!(".{STATUS_FILE}.tmp")), &path(data_dir), &bytes, "status-write")
    }

    pub fn read(data_dir: &Path) -> Result<Self, String> {
        let file = path(data_dir);
        let text = std::fs::read_to_string(&file).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                format!("no node has run in {} (no {STATUS_FILE}); start one with `blossom-p2p start --data-dir {}`", data_dir.display(), data_dir.display())
            } else {
                format!("{}: {e}", file.display())
            }
        })?;
        serde_json::from_str(&text).map_err(|e| format!("{} is not a node status file: {e}", file.display()))
    }

    /// Counts a rejection under its kind.
    pub fn count_rejection(&mut self, reason: &str) {
        self.rejected += 1;
        *self.rejected_by_reason.entry(rejection_kind(reason).to_owned()).or_default() += 1;
    }

    /// Whether the process that wrote this is still running.
    pub fn alive(&self) -> bool {
        #[cfg(unix)]
        {
            // Signal 0 checks for existence without touching the process.
            let pid = libc::pid_t::try_from(self.pid).unwrap_or(0);
            pid > 0 && unsafe { libc::kill(pid, 0) } == 0
        }
        #[cfg(not(unix))]
        {
            true
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejections_are_counted_by_kind() {
        let mut status = NodeStatus::default();
        for reason in [
            "the signature does not match the author's key",
            "a.lora_a has shape [2, 3], expected [4, 4]",
            "a.lora_b has NaN or infinite values",
            "round 1 outside the round window 3..=5",
            "chunk 0 of adapter x does not match its manifest",
            "not a valid adapter encoding: eof",
        ] {
            status.count_rejection(reason);
        }
        assert_eq!(status.rejected, 6);
        let kinds: Vec<&str> = status.rejected_by_reason.keys().map(String::as_str).collect();
        assert_eq!(kinds, ["hash-mismatch", "malformed", "non-finite", "signature", "stale-round", "wrong-shape"]);
    }
}
