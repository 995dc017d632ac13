//! Fault injection shared by every driver's fault tests: a TCP proxy that
//! cuts, refuses and pauses connections, and the run that checks nothing
//! sent is lost while faults strike.
//!
//! ```
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> std::io::Result<()> {
//! use pubsub_conformance::faults::FaultProxy;
//! use tokio::io::{AsyncReadExt, AsyncWriteExt};
//!
//! // An echo server stands in for a broker.
//! let server = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let upstream = server.local_addr()?;
//! tokio::spawn(async move {
//!     while let Ok((mut s, _)) = server.accept().await {
//!         tokio::spawn(async move {
//!             let (mut r, mut w) = s.split();
//!             let _ = tokio::io::copy(&mut r, &mut w).await;
//!         });
//!     }
//! });
//! let proxy = FaultProxy::start(upstream).await?;
//! let mut c = tokio::net::TcpStream::connect(proxy.addr()).await?;
//! c.write_all(b"ping").await?;
//! let mut buf = [0; 4];
//! c.read_exact(&mut buf).await?;
//! assert_eq!(&buf, b"ping");
//! proxy.cut();
//! assert_eq!(c.read(&mut buf).await.unwrap_or(0), 0, "the cut closed it");
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pubsub_core::{Capabilities, Message, Subscription, Topic};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// A TCP proxy on 127.0.0.1 that a test puts between a driver and its
/// backend. It forwards bytes both ways until told to [cut](Self::cut)
/// every open connection, [refuse](Self::refuse_for) new ones for a while,
/// or [pause](Self::pause) all traffic. Stops when dropped.
#[derive(Debug)]
pub struct FaultProxy {
    addr: SocketAddr,
    state: Arc<State>,
    accept: tokio::task::JoinHandle<()>,
}

#[derive(Debug)]
struct State {
    upstream: SocketAddr,
    /// Moves on every cut; each connection ends when it moves.
    cuts: watch::Sender<u64>,
    paused: watch::Sender<bool>,
    refuse_until: Mutex<Option<Instant>>,
    open: AtomicUsize,
    accepted: AtomicU64,
}

impl FaultProxy {
    /// Listens on a free port of 127.0.0.1 and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(State {
            upstream,
            cuts: watch::channel(0).0,
            paused: watch::channel(false).0,
            refuse_until: Mutex::new(None),
            open: AtomicUsize::new(0),
            accepted: AtomicU64::new(0),
        });
        let accept = tokio::spawn(accept_loop(listener, state.clone()));
        Ok(FaultProxy {
            addr,
            state,
            accept,
        })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Closes every open connection at once (both sides see the socket
    /// close), as a network cut or a broker's forced close would.
    pub fn cut(&self) {
        self.state.cuts.send_modify(|n| *n += 1);
    }

    /// Closes each connection made in the next `d` as soon as it is
    /// accepted, as a backend that is down would.
    pub fn refuse_for(&self, d: Duration) {
        *self.lock_refuse() = Some(Instant::now() + d);
    }

    /// Stops forwarding bytes (connections stay open), as a stalled link
    /// would.
    pub fn pause(&self) {
        self.state.paused.send_replace(true);
    }

    /// Forwards again after [`FaultProxy::pause`].
    pub fn resume(&self) {
        self.state.paused.send_replace(false);
    }

    /// Connections open now.
    pub fn open_connections(&self) -> usize {
        self.state.open.load(Ordering::Acquire)
    }

    /// Connections accepted and forwarded so far.
    pub fn accepted(&self) -> u64 {
        self.state.accepted.load(Ordering::Acquire)
    }

    /// A fault for [`faults_lose_nothing`] that cuts every connection
    /// through `proxy` each time, saying how many were open.
    pub fn cutter(proxy: &Arc<FaultProxy>) -> impl FnMut(u32) -> CutFuture + Send + 'static {
        let proxy = proxy.clone();
        move |_| {
            let p = proxy.clone();
            Box::pin(async move {
                let open = p.open_connections();
                p.cut();
                println!("cut {open} connections");
            })
        }
    }

    fn lock_refuse(&self) -> std::sync::MutexGuard<'_, Option<Instant>> {
        self.state
            .refuse_until
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut();
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<State>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let refusing = {
            let mut until = state.refuse_until.lock().unwrap_or_else(|e| e.into_inner());
            match *until {
                Some(t) if Instant::now() < t => true,
                Some(_) => {
                    *until = None;
                    false
                }
                None => false,
            }
        };
        if refusing {
            drop(client);
            continue;
        }
        let state = state.clone();
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(state.upstream).await else {
                return;
            };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            state.accepted.fetch_add(1, Ordering::AcqRel);
            state.open.fetch_add(1, Ordering::AcqRel);
            let mut cuts = state.cuts.subscribe();
            cuts.borrow_and_update();
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            let up = pump(cr, sw, state.paused.subscribe());
            let down = pump(sr, cw, state.paused.subscribe());
            // Either direction ending (or a cut) ends both: dropping the
            // halves closes both sockets.
            tokio::select! {
                _ = up => {}
                _ = down => {}
                _ = cuts.changed() => {}
            }
            state.open.fetch_sub(1, Ordering::AcqRel);
        });
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut paused: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if paused.wait_for(|p| !*p).await.is_err() {
            return;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// What [`faults_lose_nothing`] saw.
#[derive(Clone, Debug)]
pub struct FaultReport {
    /// Sends that returned `Ok`.
    pub sent: usize,
    /// Sends that returned an error (their messages may or may not arrive).
    pub failed: usize,
    /// Deliveries beyond the first of a message.
    pub duplicates: usize,
    /// The most duplicates the run allowed.
    pub duplicate_bound: usize,
}

/// The most deliveries one fault can repeat: what can be unsettled at the
/// moment it strikes, with `senders` tasks each awaiting its own send.
/// - Sends whose acknowledgement is lost are resent: at most one a sender,
///   and no more than the send batches in flight.
/// - Deliveries handed out and not yet acked come back: at most what the
///   core holds and fetches (two receive windows), plus the acks on their
///   way: the ack batches in flight, or, where acks are local bookkeeping
///   queued in the client, one receive window of them.
///
/// Deliveries the client had buffered but not handed out are not counted:
/// when they come back the application sees them for the first time.
pub fn in_flight_window(topic: &Capabilities, sub: &Capabilities, senders: usize) -> usize {
    let sends = senders.min(topic.send_batching.max_batch_size * topic.send_batching.max_handlers);
    let window = sub.max_receive_batch * sub.max_concurrent_receives;
    let acks = if sub.local_settlement {
        window
    } else {
        sub.ack_batching.max_batch_size * sub.ack_batching.max_handlers
    };
    sends + 2 * window + acks
}

/// What [`FaultProxy::cutter`]'s fault returns.
pub type CutFuture = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// Sends `senders × per_sender` messages from `senders` tasks through
/// `topic` while one task receives and acks them from `sub`, calls
/// `fault(1)` once a third are sent and `fault(2)` at two thirds, and
/// checks that every message whose send returned `Ok` is received at least
/// once (within `settle` after the last send), that sends did not fail (the
/// core retries through faults), and that duplicates stay within two
/// [`in_flight_window`]s, one a fault. Each message's body is its index, so
/// accounting is by message, not by count.
pub async fn faults_lose_nothing<F, Fut>(
    topic: Topic,
    sub: Subscription,
    senders: usize,
    per_sender: usize,
    settle: Duration,
    mut fault: F,
) -> FaultReport
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = ()>,
{
    let total = senders * per_sender;
    let issued = Arc::new(AtomicUsize::new(0));
    let confirmed: Arc<Mutex<Vec<usize>>> = Arc::default();
    let failed = Arc::new(AtomicUsize::new(0));
    let received: Arc<Mutex<HashMap<usize, usize>>> = Arc::default();

    let mut tasks = tokio::task::JoinSet::new();
    for s in 0..senders {
        let (topic, issued, confirmed, failed) = (
            topic.clone(),
            issued.clone(),
            confirmed.clone(),
            failed.clone(),
        );
        tasks.spawn(async move {
            for i in 0..per_sender {
                let n = s * per_sender + i;
                match topic.send(Message::new(n.to_string())).await {
                    Ok(()) => confirmed.lock().unwrap().push(n),
                    Err(e) => {
                        eprintln!("send {n} failed: {e}");
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
                issued.fetch_add(1, Ordering::Relaxed);
                // Paced a little, so the faults land mid-stream.
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        });
    }
    let mut receiver = {
        let (sub, received) = (sub.clone(), received.clone());
        tokio::spawn(async move {
            loop {
                match sub.receive().await {
                    Ok(m) => {
                        let n: usize = std::str::from_utf8(m.body())
                            .ok()
                            .and_then(|b| b.parse().ok())
                            .unwrap_or(usize::MAX);
                        *received.lock().unwrap().entry(n).or_default() += 1;
                        m.ack();
                    }
                    Err(_) if sub.is_shut_down() => return,
                    Err(e) => panic!("receive failed for good: {e}"),
                }
            }
        })
    };

    // A failing run must not leave a task behind acking what a caller's
    // diagnosis reads next.
    let _stop_receiving = AbortOnDrop(receiver.abort_handle());

    for k in 1..=2u32 {
        let at = total * k as usize / 3;
        let mut last = (issued.load(Ordering::Relaxed), Instant::now());
        while last.0 < at {
            tokio::time::sleep(Duration::from_millis(5)).await;
            let now = issued.load(Ordering::Relaxed);
            if now > last.0 {
                last = (now, Instant::now());
            }
            assert!(
                last.1.elapsed() < SEND_BUDGET + settle,
                "sends are stuck: none returned for {:?} before fault {k} ({} of {total} returned)",
                SEND_BUDGET + settle,
                last.0
            );
        }
        bounded(&format!("fault {k}"), fault(k)).await;
        let now = issued.load(Ordering::Relaxed);
        assert!(
            now < total,
            "fault {k} must land while sending ({now} sent)"
        );
        println!("fault {k} struck after {now} of {total} sends");
    }
    // A send that never returns is the fault this run exists to find, so
    // waiting for the senders is bounded: past the core's retry budget
    // plus the settle time, a sender still waiting is stuck in the driver.
    let senders_done = async {
        while let Some(r) = tasks.join_next().await {
            r.expect("sender task");
        }
    };
    if tokio::time::timeout(SEND_BUDGET + settle, senders_done)
        .await
        .is_err()
    {
        panic!(
            "sends are stuck: {} of {total} have not returned {:?} after the last fault ({} returned Ok, {} failed)",
            total - issued.load(Ordering::Relaxed),
            SEND_BUDGET + settle,
            confirmed.lock().unwrap().len(),
            failed.load(Ordering::Relaxed)
        );
    }

    let confirmed = confirmed.lock().unwrap().clone();
    let deadline = Instant::now() + settle;
    loop {
        let missing: Vec<usize> = {
            let got = received.lock().unwrap();
            confirmed
                .iter()
                .filter(|n| !got.contains_key(n))
                .copied()
                .collect()
        };
        if missing.is_empty() {
            break;
        }
        if receiver.is_finished() {
            // It stops only by panicking before shutdown: show why.
            match (&mut receiver).await {
                Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Err(e) => panic!("the receiver task ended: {e}"),
                Ok(()) => {}
            }
            panic!("the receiver stopped before shutdown");
        }
        if Instant::now() >= deadline {
            panic!(
                "{} of {} sent messages never arrived within {settle:?}; missing, as runs of bodies (sender s sent s*{per_sender} onwards, in order): {}",
                missing.len(),
                confirmed.len(),
                runs(&missing)
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let topic_caps = topic.capabilities().clone();
    let sub_caps = sub.capabilities().clone();
    bounded("subscription shutdown", sub.shutdown())
        .await
        .expect("subscription shutdown");
    bounded("the receiver's return after shutdown", receiver)
        .await
        .expect("receiver task");
    bounded("topic shutdown", topic.shutdown())
        .await
        .expect("topic shutdown");

    let got = received.lock().unwrap();
    let duplicates: usize = got.values().map(|c| c - 1).sum();
    let duplicate_bound = 2 * in_flight_window(&topic_caps, &sub_caps, senders);
    let report = FaultReport {
        sent: confirmed.len(),
        failed: failed.load(Ordering::Relaxed),
        duplicates,
        duplicate_bound,
    };
    println!(
        "{} of {total} sends returned Ok, all received at least once; {} duplicate deliveries (bound {})",
        report.sent, report.duplicates, report.duplicate_bound
    );
    assert!(
        !got.contains_key(&usize::MAX),
        "a message arrived whose body is not one that was sent"
    );
    assert_eq!(
        report.failed, 0,
        "the core retries through the faults, so every send succeeds"
    );
    assert!(
        report.duplicates <= report.duplicate_bound,
        "{} duplicates exceed the bound {}",
        report.duplicates,
        report.duplicate_bound
    );
    report
}

/// How long a send may keep retrying: the core's default retry budget.
const SEND_BUDGET: Duration = pubsub_core::DEFAULT_SEND_GIVE_UP;

/// How long closing may take after the faults, however slow the backend.
const CLOSE_LIMIT: Duration = Duration::from_secs(60);

/// Awaits `step`, panicking with its name if it takes over [`CLOSE_LIMIT`].
async fn bounded<T>(what: &str, step: impl Future<Output = T>) -> T {
    match tokio::time::timeout(CLOSE_LIMIT, step).await {
        Ok(v) => v,
        Err(_) => panic!("{what} is stuck: no return within {CLOSE_LIMIT:?}"),
    }
}

/// Aborts a task when dropped, as when its run panics.
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `numbers` as sorted runs, `a..=b`, the first few of them: where in each
/// sender's sequence the losses fall says which fault lost them.
fn runs(numbers: &[usize]) -> String {
    const SHOWN: usize = 12;
    let mut sorted = numbers.to_vec();
    sorted.sort_unstable();
    let mut out: Vec<(usize, usize)> = Vec::new();
    for n in sorted {
        match out.last_mut() {
            Some((_, end)) if *end + 1 == n => *end = n,
            _ => out.push((n, n)),
        }
    }
    let mut text: Vec<String> = out
        .iter()
        .take(SHOWN)
        .map(|&(a, b)| {
            if a == b {
                a.to_string()
            } else {
                format!("{a}..={b}")
            }
        })
        .collect();
    if out.len() > SHOWN {
        text.push(format!("and {} more runs", out.len() - SHOWN));
    }
    text.join(", ")
}

#[cfg(test)]
mod tests {
    use super::runs;

    #[test]
    fn losses_show_as_runs() {
        assert_eq!(runs(&[9, 2, 1, 3, 5]), "1..=3, 5, 9");
        let every_other: Vec<usize> = (0..40).step_by(2).collect();
        assert!(runs(&every_other).ends_with("and 8 more runs"));
        assert_eq!(runs(&[]), "");
    }
}
