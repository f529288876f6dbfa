//! Where a slice's inputs come from: each input's bytes fetched point to
//! point from its author or the slice's other owners, checked against
//! their ids, then averaged by `slices.rs`.

use std::ops::Range;
use std::sync::Arc;

use libp2p::PeerId;

use crate::aggregate::Method;
use crate::p2p::network::{NetworkHandle, Piece};
use crate::wire::codec::Digest;
use crate::wire::slices::SliceLayout;

use super::slices::{self, SliceInput};

/// Where a slice computation reads one input from.
#[derive(Clone)]
pub(super) struct InputSource {
    pub(super) author: PeerId,
    pub(super) examples: u64,
    pub(super) adapter: Digest,
    /// The Merkle root over its chunk ids (the signed one, or computed from
    /// the signed list), and their count.
    pub(super) root: Digest,
    pub(super) count: usize,
    pub(super) chunk_size: usize,
    /// This node's own update, in full.
    pub(super) own: Option<Arc<Vec<u8>>>,
}

/// Slices `slices` of the average: each input's needed bytes fetched from
/// its author, or else from the slice's other owners, which fetched the
/// same chunks (its own bytes for this node's update), then averaged. A
/// slice whose inputs could not all be fetched gives the authors that
/// failed.
pub(super) async fn compute_slices(
    net: NetworkHandle,
    layout: Arc<SliceLayout>,
    method: Method,
    previous: Arc<Vec<u8>>,
    sources: Arc<Vec<InputSource>>,
    owners: Arc<Vec<Vec<PeerId>>>,
    slices: Vec<usize>,
) -> Vec<(usize, Result<(Vec<u8>, Vec<usize>), Vec<PeerId>>)> {
    let jobs = slices.into_iter().map(|s| {
        let (net, layout, previous, sources) = (net.clone(), layout.clone(), previous.clone(), sources.clone());
        let helpers: Vec<PeerId> = owners.get(s).cloned().unwrap_or_default().into_iter().filter(|o| *o != net.peer_id).collect();
        async move {
            let needed = slices::needed(&layout, s, method);
            let reads = sources.iter().map(|input| read_range(&net, input, needed.clone(), &helpers, Fetch::WholeChunks));
            let read = futures::future::join_all(reads).await;
            let failed: Vec<PeerId> = sources.iter().zip(&read).filter(|(_, r)| r.is_none()).map(|(i, _)| i.author).collect();
            if !failed.is_empty() {
                return (s, Err(failed));
            }
            let inputs: Vec<SliceInput> = sources
                .iter()
                .zip(read)
                .map(|(input, bytes)| SliceInput {
                    author: input.author.to_bytes(),
                    examples: input.examples,
                    bytes: bytes.unwrap_or_default(),
                })
                .collect();
            match slices::compute_slice(&layout, s, method, &previous, &inputs) {
                Ok(result) => (s, Ok(result)),
                Err(e) => {
                    tracing::warn!(slice = s, error = %e, "a slice could not be computed");
                    (s, Err(Vec::new()))
                }
            }
        }
    });
    futures::future::join_all(jobs).await
}

/// How `read_range` fetches the chunks that cover a range.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Fetch {
    /// Whole chunks, kept to serve on (what owners compute from).
    WholeChunks,
    /// Only the range's bytes of each chunk, with a bao proof (an audit of
    /// part of a slice).
    OnlyRange,
}

/// The bytes `range` of an input: the chunks that cover it (or their
/// bytes in it), fetched from the author or else from `helpers` (each
/// checked against its id), or its own bytes.
pub(super) async fn read_range(net: &NetworkHandle, input: &InputSource, range: Range<usize>, helpers: &[PeerId], fetch: Fetch) -> Option<Vec<u8>> {
    if let Some(own) = &input.own {
        return own.get(range).map(<[u8]>::to_vec);
    }
    if range.is_empty() {
        return Some(Vec::new());
    }
    let first = range.start / input.chunk_size;
    let last = (range.end - 1) / input.chunk_size;
    if last >= input.count {
        return None;
    }
    let mut peers = vec![input.author];
    peers.extend(helpers.iter().filter(|h| **h != input.author));
    let mut pieces = Vec::with_capacity(last + 1 - first);
    for index in first..=last {
        let chunk = index * input.chunk_size..(index + 1) * input.chunk_size;
        let within = range.start.max(chunk.start) - chunk.start..range.end.min(chunk.end) - chunk.start;
        let part = match fetch {
            Fetch::WholeChunks => None,
            Fetch::OnlyRange => Some((u32::try_from(within.start).ok()?, u32::try_from(within.len()).ok()?)),
        };
        pieces.push(Piece {
            adapter: input.adapter,
            index: u32::try_from(index).ok()?,
            root: input.root,
            count: input.count,
            part,
        });
    }
    let fetches = pieces.into_iter().map(|piece| net.fetch_piece(piece, peers.clone()));
    let mut bytes = Vec::with_capacity((last + 1 - first) * input.chunk_size);
    for chunk in futures::future::join_all(fetches).await {
        bytes.extend(chunk.ok()??);
    }
    if fetch == Fetch::OnlyRange {
        return (bytes.len() == range.len()).then_some(bytes);
    }
    let start = range.start - first * input.chunk_size;
    bytes.get(start..start + range.len()).map(<[u8]>::to_vec)
}
