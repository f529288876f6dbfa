//! The hub of simulated nodes and the libp2p `Transport` each node uses.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use futures::future::{Ready, ready};
use libp2p::core::transport::{DialOpts, ListenerId, Transport, TransportError, TransportEvent};
use libp2p::multiaddr::{Multiaddr, Protocol};
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use tokio::sync::mpsc;

use crate::link::{Counters, LinkParams, Message, SimStream, Windows};

/// Bytes one node's links have carried so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Traffic {
    pub sent: u64,
    pub received: u64,
}

struct Link {
    ends: (u64, u64),
    to_first: mpsc::UnboundedSender<Message>,
    to_second: mpsc::UnboundedSender<Message>,
    cut: Arc<AtomicBool>,
    windows: Windows,
}

impl Link {
    fn cut(&self) {
        self.cut.store(true, Ordering::Relaxed);
        let _ = self.to_first.send(Message::Cut);
        let _ = self.to_second.send(Message::Cut);
        // A writer waiting for room finds the cut.
        self.windows.0.wake();
        self.windows.1.wake();
    }

    fn closed(&self) -> bool {
        self.to_first.is_closed() && self.to_second.is_closed()
    }
}

type Incoming = (SimStream, u64);

struct Hub {
    params: LinkParams,
    rng: ChaCha8Rng,
    listeners: HashMap<u64, mpsc::UnboundedSender<Incoming>>,
    links: Vec<Link>,
    /// Node → group while the network is partitioned.
    groups: Option<HashMap<u64, usize>>,
    counters: HashMap<u64, Arc<Counters>>,
}

impl Hub {
    fn counters(&mut self, node: u64) -> Arc<Counters> {
        self.counters.entry(node).or_default().clone()
    }

    fn separated(&self, a: u64, b: u64) -> bool {
        // Nodes a partition does not name stay with the first group.
        self.groups.as_ref().is_some_and(|groups| groups.get(&a).copied().unwrap_or(0) != groups.get(&b).copied().unwrap_or(0))
    }

    fn connect(&mut self, from: u64, to: u64) -> io::Result<SimStream> {
        let refused = |why: &str| io::Error::new(io::ErrorKind::ConnectionRefused, format!("/memory/{to}: {why}"));
        if self.separated(from, to) {
            return Err(refused("unreachable (network partition)"));
        }
        let listener = self.listeners.get(&to).filter(|l| !l.is_closed()).cloned().ok_or_else(|| refused("nobody listens there"))?;
        let (to_dialer, dialer_in) = mpsc::unbounded_channel();
        let (to_listener, listener_in) = mpsc::unbounded_channel();
        let cut = Arc::new(AtomicBool::new(false));
        let (dialer_counters, listener_counters) = (self.counters(from), self.counters(to));
        let windows: Windows = Default::default();
        let dialer = SimStream::new((dialer_in, to_listener.clone()), self.params, self.rng.next_u64(), cut.clone(), (dialer_counters.clone(), listener_counters.clone()), (&windows, true));
        let accepted = SimStream::new((listener_in, to_dialer.clone()), self.params, self.rng.next_u64(), cut.clone(), (listener_counters, dialer_counters), (&windows, false));
        listener.send((accepted, from)).map_err(|_| refused("the listener stopped"))?;
        self.links.retain(|l| !l.closed());
        self.links.push(Link {
            ends: (from, to),
            to_first: to_dialer,
            to_second: to_listener,
            cut,
            windows,
        });
        Ok(dialer)
    }
}

/// The simulated network: every node's transport connects through it.
#[derive(Clone)]
pub struct SimNetwork {
    hub: Arc<Mutex<Hub>>,
}

impl std::fmt::Debug for SimNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SimNetwork")
    }
}

impl SimNetwork {
    /// A network whose links all have `params`; `seed` drives loss.
    pub fn new(params: LinkParams, seed: u64) -> Self {
        Self {
            hub: Arc::new(Mutex::new(Hub {
                params,
                rng: ChaCha8Rng::seed_from_u64(seed),
                listeners: HashMap::new(),
                links: Vec::new(),
                groups: None,
                counters: HashMap::new(),
            })),
        }
    }

    fn hub(&self) -> MutexGuard<'_, Hub> {
        // A panic while holding the lock cannot leave the hub inconsistent
        // in a way that matters to a simulation; keep going.
        self.hub.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The address node `node` listens on.
    pub fn address(node: u64) -> Multiaddr {
        Multiaddr::empty().with(Protocol::Memory(node + 1))
    }

    pub fn transport(&self, node: u64) -> SimTransport {
        SimTransport {
            network: self.clone(),
            node,
            listener: None,
            events: VecDeque::new(),
        }
    }

    /// Splits the nodes into `groups`: links between groups are cut and new
    /// ones refused until [`heal`](Self::heal). Nodes no group names join
    /// the first.
    pub fn partition(&self, groups: &[Vec<u64>]) {
        let mut hub = self.hub();
        hub.groups = Some(groups.iter().enumerate().flat_map(|(g, nodes)| nodes.iter().map(move |n| (*n, g))).collect());
        let separated: Vec<bool> = hub.links.iter().map(|l| hub.separated(l.ends.0, l.ends.1)).collect();
        for (link, separated) in hub.links.iter().zip(separated) {
            if separated {
                link.cut();
            }
        }
    }

    pub fn heal(&self) {
        self.hub().groups = None;
    }

    /// Cuts every link of `node` at once, as a crash or a pulled cable does.
    pub fn cut_off(&self, node: u64) {
        let hub = self.hub();
        for link in hub.links.iter().filter(|l| l.ends.0 == node || l.ends.1 == node) {
            link.cut();
        }
    }

    pub fn traffic(&self, node: u64) -> Traffic {
        let counters = self.hub().counters(node);
        Traffic {
            sent: counters.sent.load(Ordering::Relaxed),
            received: counters.received.load(Ordering::Relaxed),
        }
    }
}

/// One node's libp2p transport on a [`SimNetwork`].
pub struct SimTransport {
    network: SimNetwork,
    node: u64,
    listener: Option<(ListenerId, mpsc::UnboundedReceiver<Incoming>)>,
    events: VecDeque<TransportEvent<Ready<io::Result<SimStream>>, io::Error>>,
}

fn memory_port(addr: &Multiaddr) -> Option<u64> {
    let mut parts = addr.iter();
    match (parts.next(), parts.next()) {
        (Some(Protocol::Memory(port)), None | Some(Protocol::P2p(_))) if port > 0 => Some(port),
        _ => None,
    }
}

impl Transport for SimTransport {
    type Output = SimStream;
    type Error = io::Error;
    type ListenerUpgrade = Ready<io::Result<SimStream>>;
    type Dial = Ready<io::Result<SimStream>>;

    fn listen_on(&mut self, id: ListenerId, addr: Multiaddr) -> Result<(), TransportError<Self::Error>> {
        if memory_port(&addr) != Some(self.node + 1) {
            return Err(TransportError::MultiaddrNotSupported(addr));
        }
        if self.listener.is_some() {
            return Err(TransportError::Other(io::Error::new(io::ErrorKind::AddrInUse, format!("{addr} is already listened on"))));
        }
        let (tx, rx) = mpsc::unbounded_channel();
        self.network.hub().listeners.insert(self.node, tx);
        self.listener = Some((id, rx));
        self.events.push_back(TransportEvent::NewAddress {
            listener_id: id,
            listen_addr: addr,
        });
        Ok(())
    }

    fn remove_listener(&mut self, id: ListenerId) -> bool {
        if self.listener.as_ref().is_some_and(|(l, _)| *l == id) {
            self.listener = None;
            self.network.hub().listeners.remove(&self.node);
            self.events.push_back(TransportEvent::ListenerClosed {
                listener_id: id,
                reason: Ok(()),
            });
            return true;
        }
        false
    }

    fn dial(&mut self, addr: Multiaddr, _opts: DialOpts) -> Result<Self::Dial, TransportError<Self::Error>> {
        let Some(port) = memory_port(&addr) else {
            return Err(TransportError::MultiaddrNotSupported(addr));
        };
        Ok(ready(self.network.hub().connect(self.node, port - 1)))
    }

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<TransportEvent<Self::ListenerUpgrade, Self::Error>> {
        if let Some(event) = self.events.pop_front() {
            return Poll::Ready(event);
        }
        let node = self.node;
        let Some((id, incoming)) = &mut self.listener else { return Poll::Pending };
        match incoming.poll_recv(cx) {
            Poll::Ready(Some((stream, from))) => Poll::Ready(TransportEvent::Incoming {
                listener_id: *id,
                upgrade: ready(Ok(stream)),
                local_addr: SimNetwork::address(node),
                send_back_addr: SimNetwork::address(from),
            }),
            // The hub keeps the sender while the listener is registered.
            _ => Poll::Pending,
        }
    }
}

impl Drop for SimTransport {
    fn drop(&mut self) {
        if self.listener.is_some() {
            self.network.hub().listeners.remove(&self.node);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    async fn pair(network: &SimNetwork) -> (SimStream, SimStream, SimTransport) {
        let mut listener = network.transport(1);
        listener.listen_on(ListenerId::next(), SimNetwork::address(1)).unwrap();
        let mut dialer = network.transport(0);
        let opts = DialOpts {
            role: libp2p::core::Endpoint::Dialer,
            port_use: libp2p::core::transport::PortUse::New,
        };
        let dialed = dialer.dial(SimNetwork::address(1), opts).unwrap().await.unwrap();
        let accepted = loop {
            match futures::future::poll_fn(|cx| Pin::new(&mut listener).poll(cx)).await {
                TransportEvent::Incoming { upgrade, .. } => break upgrade.await.unwrap(),
                _ => continue,
            }
        };
        (dialed, accepted, listener)
    }

    #[tokio::test]
    async fn latency_and_bandwidth_delay_delivery() {
        let params = LinkParams {
            latency: Duration::from_millis(50),
            bandwidth: Some(1_000_000.0),
            loss: 0.0,
        };
        let network = SimNetwork::new(params, 1);
        let (mut a, mut b, _listener) = pair(&network).await;
        let started = tokio::time::Instant::now();
        a.write_all(&vec![7u8; 100_000]).await.unwrap();
        let mut got = vec![0u8; 100_000];
        b.read_exact(&mut got).await.unwrap();
        // 100 kB at 1 MB/s plus 50 ms.
        let elapsed = started.elapsed();
        assert!(elapsed >= Duration::from_millis(150) && elapsed < Duration::from_secs(2), "{elapsed:?}");
        assert_eq!(network.traffic(0).sent, 100_000);
        assert_eq!(network.traffic(1).received, 100_000);
    }

    #[tokio::test]
    async fn a_partition_cuts_links_and_refuses_dials_until_healed() {
        let network = SimNetwork::new(LinkParams::IDEAL, 1);
        let (mut a, mut b, _listener) = pair(&network).await;
        network.partition(&[vec![0], vec![1]]);
        let mut buf = [0u8; 4];
        assert!(b.read(&mut buf).await.is_err());
        assert!(a.write_all(b"ping").await.is_err());
        let mut dialer = network.transport(0);
        let opts = DialOpts {
            role: libp2p::core::Endpoint::Dialer,
            port_use: libp2p::core::transport::PortUse::New,
        };
        assert!(dialer.dial(SimNetwork::address(1), opts).unwrap().await.is_err());
        network.heal();
        assert!(dialer.dial(SimNetwork::address(1), opts).unwrap().await.is_ok());
    }

    #[tokio::test]
    async fn a_writer_waits_while_the_reader_holds_a_full_window() {
        use crate::link::WINDOW;
        let network = SimNetwork::new(LinkParams::IDEAL, 1);
        let (mut a, mut b, _listener) = pair(&network).await;
        let sent: Vec<u8> = (0..3 * WINDOW).map(|i| (i % 251) as u8).collect();
        let writing = tokio::spawn(async move {
            for piece in sent.chunks(64 * 1024) {
                a.write_all(piece).await?;
            }
            Ok::<_, io::Error>(a)
        });
        // Bounded: the writer fills the window and stops there.
        let mut filled = false;
        for _ in 0..200 {
            if network.traffic(0).sent >= WINDOW as u64 {
                filled = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert!(filled, "the writer never filled the window");
        tokio::time::sleep(Duration::from_millis(50)).await;
        let held = network.traffic(0).sent;
        assert!(held <= WINDOW as u64, "{held} bytes queued past the window");
        assert!(!writing.is_finished(), "the writer went on while nobody read");
        // Reading lets it finish, every byte in order.
        let mut got = vec![0u8; 3 * WINDOW];
        b.read_exact(&mut got).await.unwrap();
        assert!(got.iter().enumerate().all(|(i, v)| *v == (i % 251) as u8));
        let a = writing.await.unwrap().unwrap();
        assert_eq!(a.unread(), 0);
    }

    #[tokio::test]
    async fn a_writer_waiting_for_room_fails_when_the_link_is_cut_or_the_reader_goes() {
        use crate::link::WINDOW;
        let network = SimNetwork::new(LinkParams::IDEAL, 1);
        for reader_goes in [false, true] {
            let (mut a, b, listener) = pair(&network).await;
            let before = network.traffic(0).sent;
            let writing = tokio::spawn(async move {
                for _ in 0..32 {
                    a.write_all(&[1u8; 64 * 1024]).await?;
                }
                Ok::<_, io::Error>(())
            });
            for _ in 0..200 {
                if network.traffic(0).sent >= before + WINDOW as u64 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if reader_goes {
                drop(b);
            } else {
                network.cut_off(1);
            }
            let result = tokio::time::timeout(Duration::from_secs(5), writing).await.expect("the writer woke").unwrap();
            assert!(result.is_err(), "reader_goes {reader_goes}");
            drop(listener);
            network.heal();
        }
    }

    #[tokio::test]
    async fn loss_delays_but_never_reorders() {
        let params = LinkParams {
            latency: Duration::from_millis(10),
            bandwidth: None,
            loss: 0.3,
        };
        let network = SimNetwork::new(params, 9);
        let (mut a, mut b, _listener) = pair(&network).await;
        let started = tokio::time::Instant::now();
        for i in 0..50u8 {
            a.write_all(&[i; 3000]).await.unwrap();
        }
        let mut got = vec![0u8; 150_000];
        b.read_exact(&mut got).await.unwrap();
        assert!(got.chunks(3000).enumerate().all(|(i, c)| c.iter().all(|&v| v == i as u8)));
        assert!(started.elapsed() >= Duration::from_millis(200), "some segment was retransmitted");
    }
}
