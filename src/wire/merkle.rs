//! A binary Merkle tree over an adapter's chunk ids, so that a manifest can
//! sign one root instead of listing every chunk id (docs/PROTOCOL.md, "The
//! reduce exchange"): a chunk fetched by (adapter, index) comes with the
//! sibling hashes from its leaf to the root, and is checked against the
//! signed root before it is kept.
//!
//! Leaves are the chunk ids; an inner node is blake3(0x01 ‖ left ‖ right);
//! a level's odd last node moves up unchanged. The shape follows from the
//! leaf count alone, so a proof is only the siblings, in order from the leaf.
//! The count must come from the signed manifest (its length and chunk size):
//! a proof checked against another count can fit another tree's shape.

use super::codec::Digest;

/// The most leaves a tree may have: a proof is at most 31 hashes long.
pub const MAX_LEAVES: usize = 1 << 31;

fn parent(left: &Digest, right: &Digest) -> Digest {
    let mut bytes = [0u8; 65];
    bytes[0] = 1;
    bytes[1..33].copy_from_slice(&left.0);
    bytes[33..].copy_from_slice(&right.0);
    Digest::of(&bytes)
}

fn next_level(level: &[Digest]) -> Vec<Digest> {
    level.chunks(2).map(|pair| if let [l, r] = pair { parent(l, r) } else { pair[0] }).collect()
}

/// The root over `leaves` (the zero digest for none).
pub fn root(leaves: &[Digest]) -> Digest {
    let mut level = leaves.to_vec();
    while level.len() > 1 {
        level = next_level(&level);
    }
    level.first().copied().unwrap_or(Digest([0; 32]))
}

/// The siblings from leaf `index` up to the root (`None` past the end).
pub fn proof(leaves: &[Digest], index: usize) -> Option<Vec<Digest>> {
    if index >= leaves.len() {
        return None;
    }
    let mut siblings = Vec::new();
    let (mut level, mut at) = (leaves.to_vec(), index);
    while level.len() > 1 {
        let sibling = at ^ 1;
        if sibling < level.len() {
            siblings.push(level[sibling]);
        }
        level = next_level(&level);
        at /= 2;
    }
    Some(siblings)
}

/// Whether `leaf` is leaf `index` of the `count`-leaf tree with `root`,
/// by the siblings in `proof` (every sibling used, none missing).
pub fn verify(root: &Digest, count: usize, index: usize, leaf: &Digest, proof: &[Digest]) -> bool {
    if index >= count || count > MAX_LEAVES {
        return false;
    }
    let (mut hash, mut at, mut width) = (*leaf, index, count);
    let mut siblings = proof.iter();
    while width > 1 {
        let sibling = at ^ 1;
        if sibling < width {
            let Some(other) = siblings.next() else { return false };
            hash = if at % 2 == 0 { parent(&hash, other) } else { parent(other, &hash) };
        }
        width = width.div_ceil(2);
        at /= 2;
    }
    siblings.next().is_none() && hash == *root
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaves(n: usize) -> Vec<Digest> {
        (0..n as u32).map(|i| Digest::of(&i.to_le_bytes())).collect()
    }

    #[test]
    fn every_leaf_proves_against_the_root_and_nothing_else_does() {
        for n in [1, 2, 3, 5, 8, 13, 64, 257] {
            let leaves = leaves(n);
            let root = root(&leaves);
            for (i, leaf) in leaves.iter().enumerate() {
                let proof = proof(&leaves, i).unwrap();
                assert!(proof.len() <= 10);
                assert!(verify(&root, n, i, leaf, &proof), "leaf {i} of {n}");
                // Another leaf, index, count, root or proof fails.
                let other = Digest::of(b"other");
                assert!(!verify(&root, n, i, &other, &proof));
                if n > 1 {
                    assert!(!verify(&root, n, (i + 1) % n, leaf, &proof));
                    let mut bent = proof.clone();
                    bent[0] = other;
                    assert!(!verify(&root, n, i, leaf, &bent));
                    assert!(!verify(&root, n, i, leaf, &proof[1..]));
                }
                let mut longer = proof.clone();
                longer.push(other);
                assert!(!verify(&root, n, i, leaf, &longer));
                assert!(!verify(&other, n, i, leaf, &proof));
            }
            assert!(proof(&leaves, n).is_none());
            assert!(!verify(&root, n, n, &leaves[0], &[]));
        }
    }
}
