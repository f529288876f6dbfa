//! What a running node tells `blossom-p2p status`: a small JSON file in its
//! data directory, replaced atomically (write, fsync, rename) whenever
//! something changes, so a reader never sees half of it.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub const STATUS_FILE: &str = "status.json";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub pid: u32,
    pub peer_id: String,
    pub run_id: String,
    pub connected_peers: Vec<String>,
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
    pub finished: bool,
    /// Seconds since the Unix epoch at the last update.
    pub updated: u64,
}

pub fn path(data_dir: &Path) -> PathBuf {
    data_dir.join(STATUS_FILE)
}

impl NodeStatus {
    pub fn write(&mut self, data_dir: &Path) -> std::io::Result<()> {
        self.updated = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
        let temp = data_dir.join(format!(".{STATUS_FILE}.tmp"));
        let mut file = std::fs::File::create(&temp)?;
        file.write_all(&serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?)?;
        file.sync_all()?;
        std::fs::rename(&temp, path(data_dir))
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
