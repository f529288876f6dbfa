//! Which missing chunks a node asks for now, and whom it asks, in order.
//! Pure: the event loop (`network.rs`, `fetch_missing`) passes what it is
//! waiting for and acts on the answer.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use libp2p::PeerId;

use crate::wire::codec::Digest;
use crate::wire::manifest::ManifestKind;

/// A verified manifest whose chunks are not all here yet.
pub struct Awaited<'a> {
    pub kind: ManifestKind,
    pub author: PeerId,
    pub chunk_ids: &'a [Digest],
    /// The author, then whoever forwarded the manifest.
    pub sources: &'a [PeerId],
    /// Since the manifest arrived.
    pub waited: Duration,
}

/// The chunks to ask for and the peers to ask, in turn, skipping those
/// `skip` says are here or asked for already. A manifest's chunks wait
/// `grace` (an update's may still come by gossip), except a slice result
/// that `agreeing` or more claims name (`ManifestKind::Slice`; two where
/// slices have two owners, one where they have one): it is asked for at
/// once, from its claimants in an order hashed from this node, the chunk
/// and the claimant. Every fetcher used to ask whichever owner claimed
/// first, so that owner served the slice to most of the network; the hash
/// splits the serving evenly between the owners that agree. A lone claim
/// waits the grace for its co-owner's (or for this node's own result of a
/// slice it co-owns: then nothing is fetched).
pub fn chunks_to_fetch(me: &PeerId, awaited: &[Awaited], (grace, agreeing): (Duration, usize), skip: impl Fn(&Digest) -> bool) -> Vec<(Digest, VecDeque<PeerId>)> {
    let mut claimants: HashMap<Digest, Vec<PeerId>> = HashMap::new();
    for claim in awaited.iter().filter(|a| a.kind == ManifestKind::Slice) {
        for id in claim.chunk_ids {
            let owners = claimants.entry(*id).or_default();
            if !owners.contains(&claim.author) {
                owners.push(claim.author);
            }
        }
    }
    let me = me.to_bytes();
    for (id, owners) in &mut claimants {
        owners.sort_by_cached_key(|owner| Digest::of(&[me.as_slice(), &id.0, &owner.to_bytes()].concat()));
    }
    let mut fetch: Vec<(Digest, VecDeque<PeerId>)> = Vec::new();
    let mut chosen: HashSet<Digest> = HashSet::new();
    for waiting in awaited {
        for id in waiting.chunk_ids {
            let claimed = claimants.get(id).filter(|owners| owners.len() >= agreeing.max(1));
            if (waiting.waited < grace && claimed.is_none()) || skip(id) || !chosen.insert(*id) {
                continue;
            }
            let mut peers: VecDeque<PeerId> = claimed.cloned().unwrap_or_default().into();
            for peer in waiting.sources {
                if !peers.contains(peer) {
                    peers.push_back(*peer);
                }
            }
            fetch.push((*id, peers));
        }
    }
    fetch
}

#[cfg(test)]
mod tests {
    use libp2p::identity::Keypair;

    use super::*;

    fn peer(seed: u8) -> PeerId {
        Keypair::ed25519_from_bytes([seed; 32]).expect("a 32-byte seed").public().to_peer_id()
    }

    const GRACE: Duration = Duration::from_millis(1500);
    /// Two owners a slice, as by default.
    const TWO: (Duration, usize) = (GRACE, 2);

    fn claim<'a>(author: PeerId, chunk_ids: &'a [Digest], sources: &'a [PeerId], waited: Duration) -> Awaited<'a> {
        Awaited { kind: ManifestKind::Slice, author, chunk_ids, sources, waited }
    }

    #[test]
    fn agreeing_owners_share_the_fetchers_of_their_slice() {
        let (a, b, forwarder) = (peer(1), peer(2), peer(3));
        let chunk = [Digest::of(b"slice 7 of round 2")];
        let (from_a, from_b) = ([a, forwarder], [b]);
        let mut first = HashMap::new();
        for fetcher in 10..74u8 {
            // Both claims just arrived: asked for at once, both owners before the forwarder.
            let awaited = [claim(a, &chunk, &from_a, Duration::ZERO), claim(b, &chunk, &from_b, Duration::ZERO)];
            let fetch = chunks_to_fetch(&peer(fetcher), &awaited, TWO, |_| false);
            assert_eq!(fetch.len(), 1, "one request for the chunk both claims name");
            let peers: Vec<PeerId> = fetch[0].1.iter().copied().collect();
            assert!(peers == [a, b, forwarder] || peers == [b, a, forwarder], "{peers:?}");
            *first.entry(peers[0]).or_insert(0) += 1;
            // The same fetcher asks the same owner whichever claim came first.
            let reversed = [claim(b, &chunk, &from_b, Duration::ZERO), claim(a, &chunk, &from_a, Duration::ZERO)];
            assert_eq!(chunks_to_fetch(&peer(fetcher), &reversed, TWO, |_| false)[0].1[0], peers[0]);
        }
        let (to_a, to_b) = (first.get(&a).copied().unwrap_or(0), first.get(&b).copied().unwrap_or(0));
        assert!((20..=44).contains(&to_a) && to_a + to_b == 64, "of 64 fetchers {to_a} ask A first and {to_b} B");
    }

    #[test]
    fn a_lone_claim_and_an_update_wait_the_grace() {
        let (a, me) = (peer(1), peer(9));
        let chunk = [Digest::of(b"a result")];
        let sources = [a];
        let lone = |waited| [claim(a, &chunk, &sources, waited)];
        assert!(chunks_to_fetch(&me, &lone(Duration::from_millis(200)), TWO, |_| false).is_empty());
        let late = chunks_to_fetch(&me, &lone(GRACE), TWO, |_| false);
        assert_eq!(late, vec![(chunk[0], VecDeque::from([a]))]);
        let update = |waited| [Awaited { kind: ManifestKind::Update, author: a, chunk_ids: &chunk, sources: &sources, waited }];
        assert!(chunks_to_fetch(&me, &update(Duration::ZERO), TWO, |_| false).is_empty());
        assert_eq!(chunks_to_fetch(&me, &update(GRACE), TWO, |_| false).len(), 1);
        // What is here or asked for already is skipped.
        assert!(chunks_to_fetch(&me, &lone(GRACE), TWO, |id| *id == chunk[0]).is_empty());
    }

    /// Where each slice has one owner (`federation.replicas = 1`) no second
    /// claim will come: its owner's claim is fetched at once.
    #[test]
    fn a_sole_owners_claim_is_fetched_at_once() {
        let (a, me) = (peer(1), peer(9));
        let chunk = [Digest::of(b"a result")];
        let sources = [a];
        let awaited = [claim(a, &chunk, &sources, Duration::ZERO)];
        assert_eq!(chunks_to_fetch(&me, &awaited, (GRACE, 1), |_| false), vec![(chunk[0], VecDeque::from([a]))]);
        assert!(chunks_to_fetch(&me, &awaited, TWO, |_| false).is_empty());
    }

    #[test]
    fn claims_that_name_different_results_are_not_agreement() {
        let (a, b, me) = (peer(1), peer(2), peer(9));
        let (mine, theirs) = ([Digest::of(b"result a")], [Digest::of(b"result b")]);
        let (from_a, from_b) = ([a], [b]);
        let awaited = [claim(a, &mine, &from_a, Duration::ZERO), claim(b, &theirs, &from_b, Duration::ZERO)];
        assert!(chunks_to_fetch(&me, &awaited, TWO, |_| false).is_empty(), "each waits the grace for a co-owner");
    }
}
