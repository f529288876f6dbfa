//! Scenario files (`netsim/scenarios/*.toml`): the links, and what happens
//! to whom at which round.
//!
//! ```toml
//! name = "churn"
//! seed = 7
//! [link]
//! latency_ms = 20
//! bandwidth_mbps = 100
//! loss = 0.01
//! [[event]]
//! at_round = 2
//! action = "crash"      # leave, crash, join, restart, partition, heal
//! nodes = [3]
//! ```
//!
//! Events are keyed to rounds, not seconds: on two shared cores a round's
//! wall time depends on how many nodes train, and an event meant for "the
//! middle of round 3" should stay there.

use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::LinkParams;

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Seeds loss and peer choices.
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub link: LinkSpec,
    /// Overrides federation.round_timeout_secs for the simulated nodes.
    #[serde(default)]
    pub round_timeout_secs: Option<f64>,
    #[serde(default, rename = "event")]
    pub events: Vec<Event>,
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LinkSpec {
    pub latency_ms: f64,
    /// Megabits per second; absent is unlimited.
    pub bandwidth_mbps: Option<f64>,
    /// Probability that a 1460-byte segment is lost and retransmitted.
    pub loss: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// The node stops after telling its peers (it unsubscribes).
    Leave,
    /// The node stops at once; its links are cut mid-stream.
    Crash,
    /// A node that was not running starts (a late joiner).
    Join,
    /// A node that left or crashed starts again with its identity and store.
    Restart,
    /// The network splits into `groups`.
    Partition,
    Heal,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// Fires when the first node starts this round.
    pub at_round: u32,
    pub action: Action,
    #[serde(default)]
    pub nodes: Vec<u32>,
    #[serde(default)]
    pub groups: Vec<Vec<u32>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("scenario {path}: {message}")]
    Read { path: String, message: String },
    #[error("scenario {name}: {message}")]
    Invalid { name: String, message: String },
}

impl Scenario {
    /// The ideal network: no delay, no loss, nothing happens.
    pub fn ideal() -> Self {
        Self {
            name: "ideal".into(),
            description: String::new(),
            seed: 0,
            link: LinkSpec::default(),
            round_timeout_secs: None,
            events: Vec::new(),
        }
    }

    pub fn load(path: &Path) -> Result<Self, ScenarioError> {
        let read = |message: String| ScenarioError::Read {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| read(e.to_string()))?;
        let scenario: Scenario = toml::from_str(&text).map_err(|e| read(e.to_string()))?;
        scenario.check_link()?;
        Ok(scenario)
    }

    fn invalid(&self, message: String) -> ScenarioError {
        ScenarioError::Invalid {
            name: self.name.clone(),
            message,
        }
    }

    fn check_link(&self) -> Result<(), ScenarioError> {
        let link = &self.link;
        if !(link.latency_ms.is_finite() && link.latency_ms >= 0.0) {
            return Err(self.invalid(format!("link.latency_ms = {} must be ≥ 0", link.latency_ms)));
        }
        if !(0.0..1.0).contains(&link.loss) {
            return Err(self.invalid(format!("link.loss = {} must be in [0, 1)", link.loss)));
        }
        if let Some(mbps) = link.bandwidth_mbps
            && !(mbps.is_finite() && mbps > 0.0)
        {
            return Err(self.invalid(format!("link.bandwidth_mbps = {mbps} must be > 0")));
        }
        if let Some(t) = self.round_timeout_secs
            && !(t.is_finite() && t > 0.0)
        {
            return Err(self.invalid(format!("round_timeout_secs = {t} must be > 0")));
        }
        Ok(())
    }

    /// Checks the events against a network of `nodes` nodes and `rounds` rounds.
    pub fn check(&self, nodes: u32, rounds: u32) -> Result<(), ScenarioError> {
        for (i, event) in self.events.iter().enumerate() {
            let what = format!("event {} ({:?} at round {})", i + 1, event.action, event.at_round);
            if event.at_round >= rounds {
                return Err(self.invalid(format!("{what}: the run has only rounds 0..{}", rounds.saturating_sub(1))));
            }
            let named: Vec<u32> = event.nodes.iter().chain(event.groups.iter().flatten()).copied().collect();
            if let Some(bad) = named.iter().find(|n| **n >= nodes) {
                return Err(self.invalid(format!("{what}: node {bad} does not exist (nodes are 0..{})", nodes - 1)));
            }
            let needs_nodes = !matches!(event.action, Action::Partition | Action::Heal);
            if needs_nodes && event.nodes.is_empty() {
                return Err(self.invalid(format!("{what}: name the nodes, e.g. nodes = [1]")));
            }
            if event.action == Action::Partition && event.groups.len() < 2 {
                return Err(self.invalid(format!("{what}: give at least two groups, e.g. groups = [[0, 1], [2, 3]]")));
            }
        }
        Ok(())
    }

    pub fn link_params(&self) -> LinkParams {
        LinkParams {
            latency: Duration::from_secs_f64(self.link.latency_ms / 1000.0),
            bandwidth: self.link.bandwidth_mbps.map(|mbps| mbps * 1e6 / 8.0),
            loss: self.link.loss,
        }
    }

    /// Nodes that are not running at round 0: their first event is a join.
    pub fn late_joiners(&self) -> Vec<u32> {
        let mut first: std::collections::BTreeMap<u32, Action> = Default::default();
        let mut events: Vec<&Event> = self.events.iter().collect();
        events.sort_by_key(|e| e.at_round);
        for event in events {
            for node in &event.nodes {
                first.entry(*node).or_insert(event.action);
            }
        }
        first.into_iter().filter(|(_, a)| *a == Action::Join).map(|(n, _)| n).collect()
    }

    /// The events that fire at `round`, in file order.
    pub fn events_at(&self, round: u32) -> impl Iterator<Item = &Event> {
        self.events.iter().filter(move |e| e.at_round == round)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shipped_scenario_parses_and_checks() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut count = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let scenario = Scenario::load(&path).unwrap_or_else(|e| panic!("{e}"));
            scenario.check(10, 20).unwrap_or_else(|e| panic!("{e}"));
            count += 1;
        }
        assert!(count >= 5, "ideal, lossy WAN, churn, partition-and-heal, late joiners");
    }

    #[test]
    fn bad_scenarios_are_named() {
        let bad: Scenario = toml::from_str("name = \"x\"\n[[event]]\nat_round = 1\naction = \"crash\"\nnodes = [9]").unwrap();
        assert!(bad.check(4, 5).unwrap_err().to_string().contains("node 9 does not exist"));
        let no_groups: Scenario = toml::from_str("name = \"x\"\n[[event]]\nat_round = 1\naction = \"partition\"").unwrap();
        assert!(no_groups.check(4, 5).is_err());
        assert!(toml::from_str::<Scenario>("name = \"x\"\n[link]\nlatency = 3").is_err(), "unknown key");
        let lossy: Scenario = toml::from_str("name = \"x\"\n[link]\nloss = 1.5").unwrap();
        assert!(lossy.check_link().is_err());
    }

    #[test]
    fn late_joiners_are_nodes_whose_first_event_is_a_join() {
        let s: Scenario = toml::from_str(
            "name = \"x\"\n[[event]]\nat_round = 2\naction = \"join\"\nnodes = [3]\n[[event]]\nat_round = 1\naction = \"crash\"\nnodes = [1]\n[[event]]\nat_round = 3\naction = \"restart\"\nnodes = [1]",
        )
        .unwrap();
        assert_eq!(s.late_joiners(), vec![3]);
    }
}
