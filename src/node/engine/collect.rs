//! Step 3 of a round: collecting the members' updates until every one is
//! in, or the deadline (docs/PROTOCOL.md, "A round"). A deadline waits
//! longer for members one round behind; half-way, what gossip has not
//! brought is asked of peers; after the quorum, a grace period takes late
//! updates.

use std::collections::BTreeMap;

use libp2p::PeerId;

use super::events::{EngineError, EngineEvent};
use super::trainer::RoundTrainer;
use super::{Engine, Update};

/// How many more deadlines a round waits for members one round behind.
const MAX_DEADLINE_EXTENSIONS: u32 = 2;

/// A round's updates as collection left them.
pub(super) struct Collected {
    /// By author: the inputs of the round's average.
    pub(super) updates: BTreeMap<PeerId, Update>,
    /// True if the deadline, not the quorum, ended the collection.
    pub(super) timed_out: bool,
}

impl<T: RoundTrainer> Engine<T> {
    /// Collects `round`'s updates of `members` (this node's own only if it
    /// is a `member`). A member quarantined meanwhile is not waited for.
    pub(super) async fn collect(&mut self, round: u64, members: &[PeerId], member: bool) -> Result<Collected, EngineError> {
        let me = self.me();
        let quorum = |engine: &Self| {
            let waited = |m: &&PeerId| **m != me || member;
            let excluded = |m: &PeerId| engine.verdicts.excluded.contains_key(m);
            engine.heard.buffered.get(&round).is_some_and(|got| members.iter().filter(waited).all(|m| got.contains_key(m) || excluded(m)))
        };
        self.report(EngineEvent::Collecting { round, deadline: self.settings.clock.wall_deadline(round) });
        let mut deadline = self.settings.clock.clone().owned_deadline(round);
        let mut extensions = 0;
        let mut halfway_clock = self.settings.clock.clone();
        let halfway = halfway_clock.halfway(round);
        tokio::pin!(halfway);
        let mut asked = false;
        let mut timed_out = false;
        // Bounded by the deadline.
        while !quorum(self) {
            tokio::select! {
                _ = &mut deadline => {
                    // Most members alive one round behind (their reduce
                    // ran longer, or they caught up): averaging without
                    // them would leave this node a round ahead, averaging
                    // alone every round after (the churn scenario did so
                    // in 3 runs of 16).
                    if extensions < MAX_DEADLINE_EXTENSIONS && self.ahead_of_members(round, members) {
                        extensions += 1;
                        tracing::info!(round, extensions, "most members are one round behind: waiting one deadline more");
                        deadline = self.settings.clock.clone().owned_deadline(round);
                        continue;
                    }
                    timed_out = true;
                    break;
                }
                // Updates gossip has not brought by half the deadline are
                // asked of peers: churn can leave the gossip mesh in two
                // parts that stay connected yet pass nothing across (the
                // churn soak ended split in two groups, 1 run in 8).
                () = &mut halfway, if !asked => {
                    asked = true;
                    self.ask_round(round, []).await?;
                }
                event = self.events.recv() => match event {
                    Some(event) => self.on_network_event(event, Some(round)),
                    None => return Err(EngineError::Network("the network task stopped".into())),
                },
            }
        }
        if !timed_out {
            let mut grace_clock = self.settings.clock.clone();
            let grace = grace_clock.wait(self.settings.grace);
            let grace_or_deadline = async {
                tokio::select! {
                    _ = &mut deadline => {}
                    _ = grace => {}
                }
            };
            self.while_listening(grace_or_deadline, Some(round)).await?;
        }
        // Inputs sorted by author. Round 0's members are settled (the same
        // list on every node): an update from anyone else would only split
        // the averages.
        let mut updates = self.heard.buffered.remove(&round).unwrap_or_default();
        if round == 0 {
            updates.retain(|author, _| members.contains(author));
        }
        if timed_out {
            // Only peers this node never had an update from: a peer that has
            // published is waited for as before, because under loss or load
            // an honest node's update can miss one deadline here and not at
            // its other peers, and leaving it out on some nodes only would
            // split the next round's averages (the churn soak showed it).
            let never_published = |m: &&PeerId| !updates.contains_key(*m) && !self.heard.recent_authors.contains_key(*m);
            for missing in members.iter().filter(never_published) {
                tracing::info!(peer = %missing, round, "no update ever, and none by the deadline: not waited for again until it publishes");
                self.heard.silent.insert(*missing);
            }
        }
        Ok(Collected { updates, timed_out })
    }
}
