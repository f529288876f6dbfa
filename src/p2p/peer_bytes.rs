//! Bytes moved with each peer, counted on the streams of every connection
//! (after noise and the multiplexer: what the protocols wrote and read).
//! A relay reports them: the circuits it carries run over its connections
//! to both ends, so a peer's bytes are what the relay carried for it.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::io::{AsyncRead, AsyncWrite, IoSlice, IoSliceMut};
use libp2p::core::muxing::{StreamMuxer, StreamMuxerBox, StreamMuxerEvent, SubstreamBox};
use libp2p::PeerId;

/// Every peer's counters, shared by the transport (which counts) and the
/// code that reports. A peer is kept while a connection to it is open, and
/// until one report after the last one closed.
#[derive(Default)]
pub struct PeerBytes {
    peers: Mutex<HashMap<PeerId, Arc<Counters>>>,
}

#[derive(Default)]
struct Counters {
    received: AtomicU64,
    sent: AtomicU64,
    /// Connections open (muxers alive).
    open: AtomicUsize,
    /// received + sent at the last report.
    reported: AtomicU64,
}

/// One peer's totals since its first connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerTraffic {
    pub peer: PeerId,
    pub received: u64,
    pub sent: u64,
    /// Its last connection has closed; these are its final totals.
    pub gone: bool,
}

impl PeerBytes {
    /// `muxer`, a new connection to `peer`, with its streams counted.
    pub fn count(&self, peer: PeerId, muxer: StreamMuxerBox) -> StreamMuxerBox {
        let counters = {
            let mut peers = self.peers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            peers.entry(peer).or_default().clone()
        };
        counters.open.fetch_add(1, Ordering::Relaxed);
        StreamMuxerBox::new(CountedMuxer { inner: muxer, counters })
    }

    /// The peers whose totals changed since the last report, and those
    /// whose connections have all closed (reported once more, then
    /// forgotten, so the table holds no more peers than are connected).
    pub fn report(&self) -> Vec<PeerTraffic> {
        let mut peers = self.peers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut changed = Vec::new();
        peers.retain(|peer, counters| {
            let (received, sent) = (counters.received.load(Ordering::Relaxed), counters.sent.load(Ordering::Relaxed));
            let gone = counters.open.load(Ordering::Relaxed) == 0;
            let total = received.saturating_add(sent);
            if gone || counters.reported.swap(total, Ordering::Relaxed) != total {
                changed.push(PeerTraffic { peer: *peer, received, sent, gone });
            }
            !gone
        });
        changed.sort_by_key(|t| t.peer);
        changed
    }
}

struct CountedMuxer {
    inner: StreamMuxerBox,
    counters: Arc<Counters>,
}

impl Drop for CountedMuxer {
    fn drop(&mut self) {
        self.counters.open.fetch_sub(1, Ordering::Relaxed);
    }
}

impl CountedMuxer {
    fn counted(&self, stream: SubstreamBox) -> CountedStream {
        CountedStream {
            inner: stream,
            counters: self.counters.clone(),
        }
    }
}

impl StreamMuxer for CountedMuxer {
    type Substream = CountedStream;
    type Error = io::Error;

    fn poll_inbound(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<CountedStream, io::Error>> {
        let this = self.get_mut();
        Pin::new(&mut this.inner).poll_inbound(cx).map_ok(|stream| this.counted(stream))
    }

    fn poll_outbound(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<CountedStream, io::Error>> {
        let this = self.get_mut();
        Pin::new(&mut this.inner).poll_outbound(cx).map_ok(|stream| this.counted(stream))
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Pin::new(&mut self.get_mut().inner).poll_close(cx)
    }

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<StreamMuxerEvent, io::Error>> {
        Pin::new(&mut self.get_mut().inner).poll(cx)
    }
}

struct CountedStream {
    inner: SubstreamBox,
    counters: Arc<Counters>,
}

/// Adds the byte count of a finished read or write to `counter`.
fn add(counter: &AtomicU64, poll: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
    if let Poll::Ready(Ok(n)) = poll {
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
    poll
}

impl AsyncRead for CountedStream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        add(&this.counters.received, Pin::new(&mut this.inner).poll_read(cx, buf))
    }

    fn poll_read_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &mut [IoSliceMut<'_>]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        add(&this.counters.received, Pin::new(&mut this.inner).poll_read_vectored(cx, bufs))
    }
}

impl AsyncWrite for CountedStream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        add(&this.counters.sent, Pin::new(&mut this.inner).poll_write(cx, buf))
    }

    fn poll_write_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &[IoSlice<'_>]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        add(&this.counters.sent, Pin::new(&mut this.inner).poll_write_vectored(cx, bufs))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_close(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::future::{poll_fn, select, Either};
    use futures::io::{AsyncReadExt, AsyncWriteExt};
    use futures::StreamExt;
    use libp2p::core::transport::{DialOpts, ListenerId, MemoryTransport, PortUse, Transport, TransportEvent};
    use libp2p::core::{upgrade, Endpoint};
    use libp2p::{identity, noise, yamux};

    /// Polls a connection's muxer (yamux moves bytes only while it is
    /// polled); never ends.
    async fn drive(muxer: &mut StreamMuxerBox) {
        poll_fn(|cx| {
            while let Poll::Ready(Ok(_)) = Pin::new(&mut *muxer).poll(cx) {}
            Poll::<()>::Pending
        })
        .await
    }

    /// A real connection over libp2p's memory transport (noise, yamux),
    /// counted on both ends: what one side writes shows as sent there and
    /// received on the other; a peer is reported while its totals change,
    /// and once more when its connection has closed.
    #[test]
    fn a_connections_bytes_are_counted_for_its_peer_until_it_closes() {
        futures::executor::block_on(async {
            let (server_key, client_key) = (identity::Keypair::generate_ed25519(), identity::Keypair::generate_ed25519());
            let (server_bytes, client_bytes) = (Arc::new(PeerBytes::default()), Arc::new(PeerBytes::default()));
            let transport = |key: &identity::Keypair, bytes: Arc<PeerBytes>| {
                MemoryTransport::default()
                    .upgrade(upgrade::Version::V1)
                    .authenticate(noise::Config::new(key).unwrap())
                    .multiplex(yamux::Config::default())
                    .map(move |(peer, muxer), _| (peer, bytes.count(peer, StreamMuxerBox::new(muxer))))
                    .boxed()
            };
            let mut server = transport(&server_key, server_bytes.clone());
            let mut client = transport(&client_key, client_bytes.clone());
            let addr: libp2p::Multiaddr = "/memory/48111".parse().unwrap();
            server.listen_on(ListenerId::next(), addr.clone()).unwrap();
            let dial = client.dial(addr, DialOpts { role: Endpoint::Dialer, port_use: PortUse::New }).unwrap();
            let accept = async {
                loop {
                    if let Some(TransportEvent::Incoming { upgrade, .. }) = server.next().await {
                        return upgrade.await.unwrap();
                    }
                }
            };
            let ((_, mut server_side), (_, mut client_side)) = futures::join!(accept, async { dial.await.unwrap() });
            let payload = vec![7u8; 100_000];
            let writer = Box::pin(async {
                let mut stream = poll_fn(|cx| Pin::new(&mut client_side).poll_outbound(cx)).await.unwrap();
                let written = Box::pin(async {
                    stream.write_all(&payload).await.unwrap();
                    stream.close().await.unwrap();
                });
                let _ = select(written, Box::pin(drive(&mut client_side))).await;
                drive(&mut client_side).await
            });
            let reader = Box::pin(async {
                let mut stream = poll_fn(|cx| Pin::new(&mut server_side).poll_inbound(cx)).await.unwrap();
                let mut got = Vec::new();
                let read = Box::pin(async {
                    stream.read_to_end(&mut got).await.unwrap();
                });
                let _ = select(read, Box::pin(drive(&mut server_side))).await;
                got
            });
            let got = match select(reader, writer).await {
                Either::Left((got, _)) => got,
                Either::Right(_) => unreachable!("the writer never ends"),
            };
            assert_eq!(got, payload);
            let (server_peer, client_peer) = (server_key.public().to_peer_id(), client_key.public().to_peer_id());
            let sent = client_bytes.report();
            assert_eq!(sent.len(), 1, "{sent:?}");
            assert_eq!((sent[0].peer, sent[0].gone), (server_peer, false));
            assert!(sent[0].sent >= 100_000 && sent[0].sent < 110_000, "{sent:?}");
            let received = server_bytes.report();
            assert_eq!((received[0].peer, received[0].gone), (client_peer, false));
            assert!(received[0].received >= 100_000 && received[0].received < 110_000, "{received:?}");
            // Nothing moved since: nothing to report; then the connection closes.
            assert!(server_bytes.report().is_empty());
            drop(server_side);
            let last = server_bytes.report();
            assert!(last.len() == 1 && last[0].gone && last[0].received == received[0].received, "{last:?}");
            assert!(server_bytes.report().is_empty(), "a gone peer is forgotten");
        });
    }
}
