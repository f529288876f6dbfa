//! Bytes moved with each peer, counted on the streams of every connection
//! (after noise and the multiplexer: what the protocols wrote and read).
//! A relay reports them: the circuits it carries run over its connections
//! to both ends, so a peer's bytes are what the relay carried for it. A
//! relay may also cap the rate it reads from each peer (all its streams
//! together), so that one peer cannot take a home uplink over: a stream
//! that has used its share waits, and the sender is held back by the
//! multiplexer's flow control.

use std::collections::HashMap;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures::Future;
use futures::io::{AsyncRead, AsyncWrite, IoSlice, IoSliceMut};
use libp2p::core::muxing::{StreamMuxer, StreamMuxerBox, StreamMuxerEvent, SubstreamBox};
use libp2p::PeerId;

/// Every peer's counters, shared by the transport (which counts) and the
/// code that reports. A peer is kept while a connection to it is open, and
/// until one report after the last one closed.
#[derive(Default)]
pub struct PeerBytes {
    peers: Mutex<HashMap<PeerId, Arc<Counters>>>,
    /// Bytes a second read from one peer, at most; none: no cap.
    read_limit: Option<u64>,
}

#[derive(Default)]
struct Counters {
    received: AtomicU64,
    sent: AtomicU64,
    /// Connections open (muxers alive).
    open: AtomicUsize,
    /// received + sent at the last report.
    reported: AtomicU64,
    /// The peer's share of reading, where reads are capped.
    bucket: Option<Mutex<Bucket>>,
}

/// A token bucket: bytes that may be read now; it refills at `rate` a
/// second up to `capacity`, and goes below zero by the size of the read
/// that emptied it (that read is paid for by waiting).
struct Bucket {
    rate: u64,
    capacity: f64,
    tokens: f64,
    refilled: Instant,
}

impl Bucket {
    /// The smallest burst: a few multiplexer frames, so a slow rate still
    /// moves whole frames.
    const MIN_CAPACITY: f64 = 64.0 * 1024.0;

    fn new(rate: u64) -> Self {
        let capacity = (rate as f64 / 4.0).max(Self::MIN_CAPACITY);
        Bucket { rate, capacity, tokens: capacity, refilled: Instant::now() }
    }

    /// How long until reading may go on (zero: now).
    fn wait(&mut self) -> Duration {
        let now = Instant::now();
        let earned = now.duration_since(self.refilled).as_secs_f64() * self.rate as f64;
        self.tokens = (self.tokens + earned).min(self.capacity);
        self.refilled = now;
        if self.tokens > 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.rate as f64).max(Duration::from_millis(1))
        }
    }

    fn spend(&mut self, bytes: usize) {
        self.tokens -= bytes as f64;
    }
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
    /// Counts, and reads at most `read_limit` bytes a second from each peer
    /// (none or zero: no cap).
    pub fn new(read_limit: Option<u64>) -> Self {
        PeerBytes {
            peers: Mutex::default(),
            read_limit: read_limit.filter(|rate| *rate > 0),
        }
    }

    /// `muxer`, a new connection to `peer`, with its streams counted.
    pub fn count(&self, peer: PeerId, muxer: StreamMuxerBox) -> StreamMuxerBox {
        let counters = {
            let mut peers = self.peers.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let bucket = self.read_limit.map(|rate| Mutex::new(Bucket::new(rate)));
            peers.entry(peer).or_insert_with(|| Arc::new(Counters { bucket, ..Counters::default() })).clone()
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
            waiting: None,
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
    /// Until the peer's bucket has bytes again (capped reads only).
    waiting: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl CountedStream {
    /// Ready when this peer's reads may go on; pending (woken by a timer)
    /// while its bucket is empty.
    fn poll_read_share(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(bucket) = &self.counters.bucket else { return Poll::Ready(()) };
        loop {
            if let Some(sleep) = &mut self.waiting {
                std::task::ready!(sleep.as_mut().poll(cx));
                self.waiting = None;
            }
            let wait = bucket.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).wait();
            if wait.is_zero() {
                return Poll::Ready(());
            }
            self.waiting = Some(Box::pin(tokio::time::sleep(wait)));
        }
    }

    /// Counts a finished read, and takes it from the peer's bucket.
    fn received(&self, poll: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        if let (Poll::Ready(Ok(n)), Some(bucket)) = (&poll, &self.counters.bucket) {
            bucket.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).spend(*n);
        }
        add(&self.counters.received, poll)
    }
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
        std::task::ready!(this.poll_read_share(cx));
        let read = Pin::new(&mut this.inner).poll_read(cx, buf);
        this.received(read)
    }

    fn poll_read_vectored(self: Pin<&mut Self>, cx: &mut Context<'_>, bufs: &mut [IoSliceMut<'_>]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_read_share(cx));
        let read = Pin::new(&mut this.inner).poll_read_vectored(cx, bufs);
        this.received(read)
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

    /// A real connection over libp2p's memory transport (noise, yamux) on
    /// `port`, both ends counted; the client writes `payload` on a stream.
    /// Returns what the server read, and the server's end of the connection.
    async fn send(port: u64, server_bytes: Arc<PeerBytes>, client_bytes: Arc<PeerBytes>, payload: &[u8]) -> (Vec<u8>, StreamMuxerBox) {
        let transport = |bytes: Arc<PeerBytes>| {
            MemoryTransport::default()
                .upgrade(upgrade::Version::V1)
                .authenticate(noise::Config::new(&identity::Keypair::generate_ed25519()).unwrap())
                .multiplex(yamux::Config::default())
                .map(move |(peer, muxer), _| (peer, bytes.count(peer, StreamMuxerBox::new(muxer))))
                .boxed()
        };
        let mut server = transport(server_bytes);
        let mut client = transport(client_bytes);
        let addr: libp2p::Multiaddr = format!("/memory/{port}").parse().unwrap();
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
        let writer = Box::pin(async {
            let mut stream = poll_fn(|cx| Pin::new(&mut client_side).poll_outbound(cx)).await.unwrap();
            let written = Box::pin(async {
                stream.write_all(payload).await.unwrap();
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
        (got, server_side)
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap()
    }

    /// What one side writes shows as sent there and received on the other;
    /// a peer is reported while its totals change, and once more when its
    /// connection has closed.
    #[test]
    fn a_connections_bytes_are_counted_for_its_peer_until_it_closes() {
        runtime().block_on(async {
            let (server_bytes, client_bytes) = (Arc::new(PeerBytes::default()), Arc::new(PeerBytes::default()));
            let payload = vec![7u8; 100_000];
            let (got, server_side) = send(48111, server_bytes.clone(), client_bytes.clone(), &payload).await;
            assert_eq!(got, payload);
            // `send` has dropped the client's end: its final totals.
            let sent = client_bytes.report();
            assert_eq!(sent.len(), 1, "{sent:?}");
            assert!(sent[0].gone && sent[0].sent >= 100_000 && sent[0].sent < 110_000, "{sent:?}");
            let received = server_bytes.report();
            assert_eq!(received.len(), 1, "{received:?}");
            assert!(!received[0].gone && received[0].received >= 100_000 && received[0].received < 110_000, "{received:?}");
            // Nothing moved since: nothing to report; then the connection closes.
            assert!(server_bytes.report().is_empty());
            drop(server_side);
            let last = server_bytes.report();
            assert!(last.len() == 1 && last[0].gone && last[0].received == received[0].received, "{last:?}");
            assert!(server_bytes.report().is_empty(), "a gone peer is forgotten");
        });
    }

    /// Reads capped at 100 kB/s (a 64 KiB burst): 300 kB cannot arrive in
    /// less than (300 - 65.5) / 100 s. Only the lower bound is checked: a
    /// loaded machine may take longer, never shorter.
    #[test]
    fn a_capped_peer_is_read_no_faster_than_its_rate() {
        runtime().block_on(async {
            let (server_bytes, client_bytes) = (Arc::new(PeerBytes::new(Some(100_000))), Arc::new(PeerBytes::default()));
            let payload = vec![3u8; 300_000];
            let started = Instant::now();
            let (got, _server_side) = send(48112, server_bytes, client_bytes, &payload).await;
            assert_eq!(got, payload);
            let least = Duration::from_secs_f64((300_000.0 - Bucket::MIN_CAPACITY) / 100_000.0);
            assert!(started.elapsed() >= least, "300 kB read in {:?} at 100 kB/s", started.elapsed());
        });
    }
}
