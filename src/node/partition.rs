//! Who trains on which rows (docs/PROTOCOL.md, "Partitions"): pure functions that
//! every node evaluates alike from the same inputs.
//!
//! Rows fall into B buckets by hash, bucket(i) = blake3(fingerprint ‖ i) mod B,
//! and each bucket belongs to the live peer with the highest rendezvous
//! score blake3(peer ‖ bucket). When a peer leaves, only its buckets move
//! (each to the next-highest scorer); when one joins, it takes only the
//! buckets it now wins.

/// The bucket of row `index` of the data set with this fingerprint.
pub fn bucket(fingerprint: &str, index: u64, num_buckets: u32) -> u32 {
    let mut hasher = blake3::Hasher::new();
    hasher.update(fingerprint.as_bytes());
    hasher.update(&index.to_le_bytes());
    let hash = hasher.finalize();
    let mut word = [0u8; 8];
    word.copy_from_slice(&hash.as_bytes()[..8]);
    (u64::from_le_bytes(word) % u64::from(num_buckets.max(1))) as u32
}

fn score(peer: &[u8], bucket: u32) -> [u8; 32] {
    let mut hasher = blake3::Hasher::new();
    hasher.update(peer);
    hasher.update(&bucket.to_le_bytes());
    *hasher.finalize().as_bytes()
}

/// The position in `peers` of the owner of `bucket` (`None` if no peers).
pub fn owner(bucket: u32, peers: &[Vec<u8>]) -> Option<usize> {
    // Ties are impossible in practice (256-bit hashes); break them by
    // position anyway so the result is a total function.
    peers.iter().enumerate().max_by(|(i, a), (j, b)| score(a, bucket).cmp(&score(b, bucket)).then(j.cmp(i))).map(|(i, _)| i)
}

/// The position in `peers` of each row's owner, in `indices` order.
fn row_owners<'a>(fingerprint: &'a str, indices: &'a [u64], num_buckets: u32, peers: &[Vec<u8>]) -> impl Iterator<Item = (u64, Option<usize>)> + 'a {
    let owners: Vec<Option<usize>> = (0..num_buckets).map(|b| owner(b, peers)).collect();
    indices.iter().map(move |&i| (i, owners[bucket(fingerprint, i, num_buckets) as usize]))
}

/// The row indices (in `indices` order) that `me` trains on when `peers`
/// (which should include `me`) are live.
pub fn hash_partition(fingerprint: &str, indices: &[u64], num_buckets: u32, peers: &[Vec<u8>], me: &[u8]) -> Vec<u64> {
    let Some(mine) = peers.iter().position(|p| p == me) else { return Vec::new() };
    row_owners(fingerprint, indices, num_buckets, peers).filter(|(_, owner)| *owner == Some(mine)).map(|(i, _)| i).collect()
}

/// How many rows each of `peers` trains on (in `peers` order), in one pass.
pub fn hash_partition_sizes(fingerprint: &str, indices: &[u64], num_buckets: u32, peers: &[Vec<u8>]) -> Vec<usize> {
    let mut sizes = vec![0; peers.len()];
    for (_, owner) in row_owners(fingerprint, indices, num_buckets, peers) {
        if let Some(owner) = owner {
            sizes[owner] += 1;
        }
    }
    sizes
}

/// Partition `id` of `count` contiguous shards, sized as Hugging Face
/// datasets' `shard(contiguous=True)` (which the old IID partitioner used):
/// the first `len % count` shards get one extra row.
pub fn static_partition(indices: &[u64], id: u32, count: u32) -> Vec<u64> {
    let (n, count, id) = (indices.len(), count.max(1) as usize, id as usize);
    if id >= count {
        return Vec::new();
    }
    let (size, extra) = (n / count, n % count);
    let start = size * id + id.min(extra);
    let end = start + size + usize::from(id < extra);
    indices[start..end].to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peers(n: u8) -> Vec<Vec<u8>> {
        (0..n).map(|i| vec![i; 38]).collect()
    }

    #[test]
    fn every_row_belongs_to_exactly_one_live_peer() {
        let rows: Vec<u64> = (0..2000).collect();
        let live = peers(7);
        let mut seen = vec![0u32; rows.len()];
        for me in &live {
            for i in hash_partition("fp", &rows, 256, &live, me) {
                seen[i as usize] += 1;
            }
        }
        assert!(seen.iter().all(|&c| c == 1));
        let sizes: Vec<usize> = live.iter().map(|me| hash_partition("fp", &rows, 256, &live, me).len()).collect();
        assert_eq!(hash_partition_sizes("fp", &rows, 256, &live), sizes);
    }

    #[test]
    fn a_departure_moves_only_the_departed_peers_rows() {
        let rows: Vec<u64> = (0..5000).collect();
        let before = peers(8);
        let after: Vec<Vec<u8>> = before.iter().filter(|p| p[0] != 3).cloned().collect();
        for me in &after {
            let old = hash_partition("fp", &rows, 1024, &before, me);
            let new = hash_partition("fp", &rows, 1024, &after, me);
            assert!(old.iter().all(|i| new.contains(i)), "a surviving peer lost rows");
        }
        let departed = hash_partition("fp", &rows, 1024, &before, &before[3]).len();
        let moved: usize = after
            .iter()
            .map(|me| hash_partition("fp", &rows, 1024, &after, me).len() - hash_partition("fp", &rows, 1024, &before, me).len())
            .sum();
        assert_eq!(moved, departed, "exactly the departed peer's rows move");
        // For the record: the moved fraction is the departed peer's share.
        eprintln!("moved {moved} of {} rows ({:.1}%) when 1 of 8 peers left", rows.len(), moved as f64 / rows.len() as f64 * 100.0);
    }

    #[test]
    fn static_shards_cover_the_rows_in_order() {
        let rows: Vec<u64> = (10..20).collect();
        let shards: Vec<Vec<u64>> = (0..3).map(|k| static_partition(&rows, k, 3)).collect();
        assert_eq!(shards[0], vec![10, 11, 12, 13]);
        assert_eq!(shards[1], vec![14, 15, 16]);
        assert_eq!(shards[2], vec![17, 18, 19]);
        assert!(static_partition(&rows, 3, 3).is_empty());
    }
}
