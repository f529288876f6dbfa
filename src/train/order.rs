//! Which rows make each micro-batch. A pure function of the seed, the
//! micro-batch's number and the rows, so that a resumed run sees the same
//! batches as an uninterrupted one.

use crate::rng::SeededRng;

/// How a node's rows are dealt into micro-batches.
#[derive(Debug, Clone, PartialEq)]
pub enum BatchOrder {
    /// `size` rows at a time from a seeded shuffle of the rows, epoch after
    /// epoch (a batch may straddle two epochs).
    Shuffled { rows: usize, size: usize },
    /// Batches of rows of similar length (`train.group_by_length`), as
    /// mlx_lm makes them: a batch is padded to its longest row, so rows of
    /// mixed lengths in one batch are mostly padding. Every batch comes
    /// once an epoch, in a seeded shuffle per epoch.
    ByLength { batches: Vec<Vec<usize>> },
}

impl BatchOrder {
    pub fn shuffled(rows: usize, size: usize) -> Self {
        BatchOrder::Shuffled { rows, size: size.max(1) }
    }

    /// The rows (given by their token counts) sorted by length, ties by
    /// position, cut into batches of `size`. Every batch holds `size` rows,
    /// since peers weigh an update by steps × batch size: the last batch is
    /// the `size` longest rows (so it repeats a few of the batch before),
    /// and fewer rows than `size` repeat in turn.
    pub fn by_length(lengths: &[usize], size: usize) -> Self {
        let (n, size) = (lengths.len(), size.max(1));
        let mut sorted: Vec<usize> = (0..n).collect();
        sorted.sort_by_key(|&position| (lengths[position], position));
        let batches = (0..n.div_ceil(size))
            .map(|k| {
                let start = (k * size).min(n.saturating_sub(size));
                (start..start + size).map(|i| sorted[i % n]).collect()
            })
            .collect();
        BatchOrder::ByLength { batches }
    }

    /// Micro-batches an epoch holds (a shuffled epoch's last batch may
    /// straddle into the next).
    pub fn batches_per_epoch(&self) -> u64 {
        match self {
            BatchOrder::Shuffled { rows, size } => rows.div_ceil(*size) as u64,
            BatchOrder::ByLength { batches } => batches.len() as u64,
        }
    }

    /// Positions (into the rows) of micro-batch `micro`; empty when there
    /// are no rows.
    pub fn batch(&self, seed: u64, micro: u64) -> Vec<usize> {
        match self {
            BatchOrder::Shuffled { rows, size } => {
                let n = *rows as u64;
                if n == 0 {
                    return Vec::new();
                }
                (0..*size as u64)
                    .map(|j| {
                        let position = micro * *size as u64 + j;
                        epoch_order(n, seed, position / n)[(position % n) as usize] as usize
                    })
                    .collect()
            }
            BatchOrder::ByLength { batches } => {
                let n = batches.len() as u64;
                if n == 0 {
                    return Vec::new();
                }
                let which = epoch_order(n, seed, micro / n)[(micro % n) as usize];
                batches[which as usize].clone()
            }
        }
    }
}

/// A seeded shuffle of `0..n` for one epoch.
fn epoch_order(n: u64, seed: u64, epoch: u64) -> Vec<u64> {
    let mut order: Vec<u64> = (0..n).collect();
    let mut rng = SeededRng::new(seed ^ epoch.wrapping_mul(0x9E37_79B9));
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_row_comes_every_epoch_in_full_batches() {
        let lengths: Vec<usize> = (0..23).map(|i| (i * 7919) % 61 + 3).collect();
        for order in [BatchOrder::shuffled(23, 4), BatchOrder::by_length(&lengths, 4)] {
            let per_epoch = match &order {
                BatchOrder::Shuffled { .. } => 23,
                BatchOrder::ByLength { batches } => batches.len() as u64,
            };
            for epoch in 0..3 {
                let batches: Vec<Vec<usize>> = (epoch * per_epoch..(epoch + 1) * per_epoch).map(|m| order.batch(7, m)).collect();
                assert!(batches.iter().all(|b| b.len() == 4), "a batch of another size: {batches:?}");
                let mut seen: Vec<usize> = batches.concat();
                seen.sort_unstable();
                seen.dedup();
                // Shuffled: 23 batches of four are four whole epochs of rows.
                assert_eq!(seen, (0..23).collect::<Vec<_>>(), "epoch {epoch} of {order:?}");
                if let BatchOrder::ByLength { .. } = order {
                    // Six batches of four: one row of the fifth batch comes again in the last.
                    assert_eq!(batches.concat().len(), 24);
                }
            }
        }
        // Fewer rows than a batch: they repeat in turn.
        assert_eq!(BatchOrder::by_length(&[9, 4, 6], 5).batch(0, 0), vec![1, 2, 0, 1, 2]);
    }

    #[test]
    fn length_batches_hold_neighbours_in_length_and_pad_less() {
        let lengths: Vec<usize> = (0..64).map(|i| 20 + (i * 37) % 41).collect();
        let padded = |order: &BatchOrder, micros: u64| -> usize {
            (0..micros)
                .map(|m| {
                    let batch = order.batch(3, m);
                    let longest = batch.iter().map(|&p| lengths[p]).max().unwrap_or(0);
                    batch.iter().map(|&p| longest - lengths[p]).sum::<usize>()
                })
                .sum()
        };
        let by_length = BatchOrder::by_length(&lengths, 8);
        let BatchOrder::ByLength { batches } = &by_length else { unreachable!() };
        assert_eq!(batches.len(), 8);
        for pair in batches.windows(2) {
            let longest = pair[0].iter().map(|&p| lengths[p]).max();
            let shortest = pair[1].iter().map(|&p| lengths[p]).min();
            assert!(longest <= shortest, "batches overlap in length: {pair:?}");
        }
        let (grouped, shuffled) = (padded(&by_length, 8), padded(&BatchOrder::shuffled(64, 8), 8));
        assert!(grouped * 4 < shuffled, "padding {grouped} grouped against {shuffled} shuffled");
    }

    #[test]
    fn the_order_is_a_function_of_seed_and_micro_batch() {
        let lengths = [5, 9, 2, 7, 7, 1, 3];
        let order = BatchOrder::by_length(&lengths, 3);
        assert_eq!(order.batch(1, 5), BatchOrder::by_length(&lengths, 3).batch(1, 5));
        let mut epoch: Vec<usize> = (0..3).flat_map(|m| order.batch(1, m)).collect();
        epoch.sort_unstable();
        assert_eq!(epoch, vec![0, 1, 2, 3, 3, 4, 4, 5, 6], "the last batch is the longest three, rows 3 and 4 again");
        let epochs: Vec<Vec<Vec<usize>>> = (0..4).map(|e| (e * 3..e * 3 + 3).map(|m| order.batch(1, m)).collect()).collect();
        assert!(epochs.windows(2).any(|w| w[0] != w[1]), "each epoch shuffles the batches");
        assert!(BatchOrder::by_length(&[], 4).batch(0, 0).is_empty());
        assert!(BatchOrder::shuffled(0, 4).batch(0, 0).is_empty());
    }
}
