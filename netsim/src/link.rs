//! One direction of a simulated link, and the byte stream built on two.
//!
//! A write is accepted at once and delivered to the other end after the
//! link's serialization time (bandwidth, queued behind earlier writes) and
//! latency. Loss is modelled as TCP and QUIC experience it on a stream: a
//! lost segment is retransmitted after a timeout, delaying it and
//! everything behind it, so nothing arrives out of order or not at all.
//!
//! Each direction holds at most [`WINDOW`] bytes written and not yet read
//! by the other end: a writer past it waits, as a TCP sender waits for the
//! receiver's window, so a slow reader holds its peers back instead of
//! making the process buffer without bound (128 nodes in one process).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use futures::task::AtomicWaker;
use futures::{AsyncRead, AsyncWrite, Future};
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use tokio::sync::mpsc;
use tokio::time::{Instant, Sleep};

/// The bytes a segment carries on a typical Ethernet path.
const SEGMENT: usize = 1460;

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkParams {
    /// One-way delay.
    pub latency: Duration,
    /// Bytes per second; `None` is unlimited.
    pub bandwidth: Option<f64>,
    /// Probability that a segment is lost (and retransmitted).
    pub loss: f64,
}

impl LinkParams {
    pub const IDEAL: Self = Self {
        latency: Duration::ZERO,
        bandwidth: None,
        loss: 0.0,
    };

    /// The retransmission timeout: at least 200 ms, as Linux TCP's minimum.
    fn retransmission_timeout(&self) -> Duration {
        (self.latency * 3).max(Duration::from_millis(200))
    }
}

/// Bytes one direction of a link holds written and not yet read: about
/// what Linux's TCP buffers hold on a LAN (rmem default 128 KiB, tcp_wmem
/// 16 KiB to 4 MiB), enough for 10 MB/s at 100 ms round trips.
pub const WINDOW: usize = 1 << 20;

/// One direction's bytes in flight, and its writer waiting for room.
#[derive(Debug, Default)]
pub(crate) struct Window {
    queued: AtomicUsize,
    writer: AtomicWaker,
}

impl Window {
    /// Room again (bytes read, or the reader gone: its writes then fail).
    fn release(&self, bytes: usize) {
        let _ = self.queued.fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| Some(q.saturating_sub(bytes)));
        self.writer.wake();
    }

    /// Wakes a waiting writer (the link was cut: its next write fails).
    pub(crate) fn wake(&self) {
        self.writer.wake();
    }

    /// Bytes written and not read yet.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Acquire)
    }
}

pub(crate) enum Message {
    Data(Instant, Vec<u8>),
    /// The link was cut (partition or crash): the reader sees a reset.
    Cut,
}

/// Bytes a node's links carried.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    pub sent: AtomicU64,
    pub received: AtomicU64,
}

/// The sending side's shaping state.
struct Shaper {
    params: LinkParams,
    rng: ChaCha8Rng,
    /// When the link finishes serializing what was written so far.
    free_at: Instant,
    /// Delivery time of the last write; later writes never overtake it.
    last_delivery: Instant,
}

impl Shaper {
    fn delivery_time(&mut self, len: usize) -> Instant {
        let now = Instant::now();
        let start = self.free_at.max(now);
        let serialization = self.params.bandwidth.map_or(Duration::ZERO, |bps| Duration::from_secs_f64(len as f64 / bps));
        self.free_at = start + serialization;
        let mut at = self.free_at + self.params.latency;
        if self.params.loss > 0.0 {
            let segments = len.div_ceil(SEGMENT);
            let lost = (0..segments).filter(|_| unit_interval(self.rng.next_u64()) < self.params.loss).count().min(3);
            at += self.params.retransmission_timeout() * lost as u32;
        }
        at = at.max(self.last_delivery);
        self.last_delivery = at;
        at
    }
}

/// One end of a simulated connection: `futures` `AsyncRead` + `AsyncWrite`.
pub struct SimStream {
    incoming: mpsc::UnboundedReceiver<Message>,
    outgoing: Option<mpsc::UnboundedSender<Message>>,
    /// A delivered frame being read, and how far.
    reading: Option<(Vec<u8>, usize)>,
    /// A frame that has not arrived yet.
    waiting: Option<(Pin<Box<Sleep>>, Vec<u8>)>,
    shaper: Shaper,
    cut: Arc<AtomicBool>,
    local: Arc<Counters>,
    remote: Arc<Counters>,
    /// This end's writes not yet read by the other end.
    sending: Arc<Window>,
    /// The other end's writes not yet read here.
    receiving: Arc<Window>,
}

/// Both directions of a link: (dialer to listener, listener to dialer).
pub(crate) type Windows = (Arc<Window>, Arc<Window>);

impl SimStream {
    /// The dialer's end (`dialer` true) or the listener's of a link whose
    /// directions' windows are `windows`.
    pub(crate) fn new(
        (incoming, outgoing): (mpsc::UnboundedReceiver<Message>, mpsc::UnboundedSender<Message>),
        params: LinkParams,
        seed: u64,
        cut: Arc<AtomicBool>,
        (local, remote): (Arc<Counters>, Arc<Counters>),
        (windows, dialer): (&Windows, bool),
    ) -> Self {
        let now = Instant::now();
        let (sending, receiving) = if dialer { (windows.0.clone(), windows.1.clone()) } else { (windows.1.clone(), windows.0.clone()) };
        Self {
            sending,
            receiving,
            incoming,
            outgoing: Some(outgoing),
            reading: None,
            waiting: None,
            shaper: Shaper {
                params,
                rng: ChaCha8Rng::seed_from_u64(seed),
                free_at: now,
                last_delivery: now,
            },
            cut,
            local,
            remote,
        }
    }
}

impl SimStream {
    /// Bytes this end wrote that the other end has not read yet.
    pub fn unread(&self) -> usize {
        self.sending.queued()
    }
}

/// A draw uniform in [0, 1), from the 53 high bits.
fn unit_interval(bits: u64) -> f64 {
    (bits >> 11) as f64 / (1u64 << 53) as f64
}

fn reset() -> io::Error {
    io::Error::new(io::ErrorKind::ConnectionReset, "simulated link cut")
}

impl AsyncRead for SimStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        loop {
            if let Some((frame, position)) = &mut this.reading {
                let n = buf.len().min(frame.len() - *position);
                buf[..n].copy_from_slice(&frame[*position..*position + n]);
                *position += n;
                if *position == frame.len() {
                    this.reading = None;
                }
                this.receiving.release(n);
                return Poll::Ready(Ok(n));
            }
            if let Some((sleep, _)) = &mut this.waiting {
                ready!(sleep.as_mut().poll(cx));
                if let Some((_, frame)) = this.waiting.take() {
                    this.reading = Some((frame, 0));
                }
                continue;
            }
            match ready!(this.incoming.poll_recv(cx)) {
                // The other end closed: end of stream.
                None => return Poll::Ready(Ok(0)),
                Some(Message::Cut) => return Poll::Ready(Err(reset())),
                Some(Message::Data(at, frame)) => {
                    if at <= Instant::now() {
                        this.reading = Some((frame, 0));
                    } else {
                        this.waiting = Some((Box::pin(tokio::time::sleep_until(at)), frame));
                    }
                }
            }
        }
    }
}

impl AsyncWrite for SimStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.cut.load(Ordering::Relaxed) {
            return Poll::Ready(Err(reset()));
        }
        if this.sending.queued() >= WINDOW {
            this.sending.writer.register(cx.waker());
            // Read meanwhile, or cut: look again after registering.
            if this.sending.queued() >= WINDOW && !this.cut.load(Ordering::Relaxed) {
                return Poll::Pending;
            }
            if this.cut.load(Ordering::Relaxed) {
                return Poll::Ready(Err(reset()));
            }
        }
        let Some(outgoing) = &this.outgoing else {
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, "write after close")));
        };
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let at = this.shaper.delivery_time(buf.len());
        this.sending.queued.fetch_add(buf.len(), Ordering::AcqRel);
        outgoing.send(Message::Data(at, buf.to_vec())).map_err(|_| reset())?;
        this.local.sent.fetch_add(buf.len() as u64, Ordering::Relaxed);
        this.remote.received.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_close(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Dropping the sender ends the other side's stream once it has read
        // everything in flight.
        self.outgoing = None;
        Poll::Ready(Ok(()))
    }
}

impl Drop for SimStream {
    /// Nothing here will read again: the other end's writer must not wait
    /// for room (its writes now fail: the channel is closed).
    fn drop(&mut self) {
        self.receiving.release(usize::MAX);
    }
}
