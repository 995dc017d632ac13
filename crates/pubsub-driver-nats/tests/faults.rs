//! Fault tests: 10,000 messages sent by several tasks while connections are
//! cut through a proxy, or while a NATS server of the test's own is stopped
//! and started. Every message whose `send` returned `Ok` must be received at
//! least once; duplicates are counted and bounded.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use pubsub_conformance::faults::{faults_lose_nothing, FaultProxy};
use pubsub_driver_nats::async_nats::jetstream::{self, stream};
use pubsub_driver_nats::{open_subscription, open_topic, SubscriptionConfig};

const SENDERS: usize = 5;
const PER_SENDER: usize = 2_000;
const ACK_WAIT: Duration = Duration::from_secs(5);
const SETTLE: Duration = Duration::from_secs(120);

async fn context(url: &str) -> jetstream::Context {
    let client = pubsub_driver_nats::connect(url)
        .await
        .unwrap_or_else(|e| panic!("{e}; {}", common::HOW));
    jetstream::new(client)
}

/// A stream and consumer made on `admin`, a topic and subscription opened on
/// `through`; the run; and its checks.
async fn run(
    admin: &jetstream::Context,
    through: &jetstream::Context,
    storage: stream::StorageType,
    name: &str,
    fault: impl FnMut(u32) -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>,
) {
    let name = format!("fault-{name}-{:08x}", fastrand::u32(..));
    admin
        .create_stream(stream::Config {
            name: name.clone(),
            subjects: vec![name.clone()],
            storage,
            max_age: Duration::from_secs(3600),
            ..Default::default()
        })
        .await
        .expect("create stream");
    common::create_consumer(admin, &name, "sub", ACK_WAIT)
        .await
        .expect("create consumer");
    let topic = open_topic(through, &name, Default::default()).unwrap();
    let sub = open_subscription(
        through,
        &name,
        "sub",
        SubscriptionConfig::default(),
        Default::default(),
    )
    .await
    .unwrap();
    faults_lose_nothing(topic, sub, SENDERS, PER_SENDER, SETTLE, fault).await;
    let _ = admin.delete_stream(&name).await;
}

fn upstream() -> SocketAddr {
    let url = common::server();
    let hostport = url.trim_start_matches("nats://");
    hostport.parse().unwrap_or_else(|_| {
        panic!("NATS_SERVER_URL must be nats://IP:PORT for the proxy test, not {url}")
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_cut_twice_lose_nothing() {
    let admin = context(&common::server()).await;
    let proxy = std::sync::Arc::new(FaultProxy::start(upstream()).await.expect("proxy"));
    let through = context(&format!("nats://{}", proxy.addr())).await;
    run(
        &admin,
        &through,
        stream::StorageType::Memory,
        "cut",
        FaultProxy::cutter(&proxy),
    )
    .await;
    assert!(
        proxy.accepted() >= 3,
        "the client reconnected after each cut"
    );
}

/// A `nats-server` of the test's own, with JetStream on file storage that
/// survives its restarts. Stopped when dropped.
struct OwnServer {
    port: u16,
    dir: PathBuf,
    child: Option<Child>,
}

impl OwnServer {
    fn start() -> Self {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let dir =
            std::env::temp_dir().join(format!("pubsub-nats-{port}-{:08x}", fastrand::u32(..)));
        let mut s = OwnServer {
            port,
            dir,
            child: None,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let child = Command::new("nats-server")
            .args([
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-js",
                "-sd",
            ])
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nats-server must be on PATH for this test (scripts/backends up installs it)");
        self.child = Some(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("nats-server on port {} did not start", self.port);
    }

    /// Stops the server gracefully (SIGTERM, so JetStream flushes its
    /// store) and waits for it to exit.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restarted_twice_loses_nothing() {
    let server = std::sync::Arc::new(std::sync::Mutex::new(OwnServer::start()));
    let url = server.lock().unwrap().url();
    let js = context(&url).await;
    let s = server.clone();
    run(&js, &js, stream::StorageType::File, "restart", move |k| {
        let s = s.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let mut s = s.lock().unwrap();
                s.stop();
                std::thread::sleep(Duration::from_secs(1));
                s.spawn();
            })
            .await
            .unwrap();
            println!("restart {k} done");
        })
    })
    .await;
}
