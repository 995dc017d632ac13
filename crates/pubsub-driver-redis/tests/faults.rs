//! Fault tests: 10,000 messages sent by several tasks while a Redis server
//! of the test's own has its client connections killed (`CLIENT KILL TYPE
//! normal`), is restarted (with its stream kept in an append-only file), or
//! sits behind a proxy that cuts every connection. Every message whose
//! `send` returned `Ok` must be received at least once; duplicates are
//! counted and bounded.

mod common;

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pubsub_conformance::faults::{faults_lose_nothing, FaultProxy};
use pubsub_driver_redis::redis::{self, aio::ConnectionManager};
use pubsub_driver_redis::{open_subscription, open_topic, Connector, SubscriptionConfig};

const SENDERS: usize = 5;
const PER_SENDER: usize = 2_000;
const ACK_DEADLINE: Duration = Duration::from_secs(5);
const SETTLE: Duration = Duration::from_secs(120);

type Fault = Box<dyn FnMut(u32) -> Pin<Box<dyn Future<Output = ()> + Send>> + Send>;

/// A `redis-server` of the test's own on a free port, with an append-only
/// file, so what it acknowledged survives a restart. Stopped when dropped.
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
            std::env::temp_dir().join(format!("pubsub-redis-{port}-{:08x}", fastrand::u32(..)));
        std::fs::create_dir_all(&dir).expect("a data directory");
        let mut s = OwnServer {
            port,
            dir,
            child: None,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args([
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be on PATH for this test (scripts/backends up installs it)");
        self.child = Some(child);
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("redis-server on port {} did not start", self.port);
    }

    /// Stops the server gracefully (SIGTERM: it finishes its AOF) and waits.
    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .args(["-TERM", &child.id().to_string()])
                .status();
            let _ = child.wait();
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
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

async fn run(admin: &mut ConnectionManager, through: &Connector, name: &str, fault: Fault) {
    let stream = format!("fault-{name}-{:08x}", fastrand::u32(..));
    common::create_stream(admin, &stream).await.expect("stream");
    common::create_group(admin, &stream, "g")
        .await
        .expect("group");
    let topic = open_topic(through, &stream, Default::default(), Default::default()).unwrap();
    let config = SubscriptionConfig::default().with_ack_deadline(ACK_DEADLINE);
    let sub = open_subscription(through, &stream, "g", config, Default::default()).unwrap();
    faults_lose_nothing(topic, sub, SENDERS, PER_SENDER, SETTLE, fault).await;
    let _: redis::RedisResult<()> = redis::cmd("DEL").arg(&stream).query_async(admin).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_killed_twice_lose_nothing() {
    let server = OwnServer::start();
    let (_, mut admin) = common::connect_to(&server.url()).await.unwrap();
    let connector = Connector::new(&server.url()).unwrap();
    let killer = Arc::new(tokio::sync::Mutex::new(admin.clone()));
    let fault: Fault = Box::new(move |_| {
        let killer = killer.clone();
        Box::pin(async move {
            let mut conn = killer.lock().await;
            // SKIPME yes (the default): the admin connection survives.
            let killed: i64 = redis::cmd("CLIENT")
                .arg("KILL")
                .arg("TYPE")
                .arg("normal")
                .query_async(&mut *conn)
                .await
                .expect("CLIENT KILL");
            println!("killed {killed} client connections");
            assert!(killed >= 2, "the driver's connections were killed");
        })
    });
    run(&mut admin, &connector, "kill", fault).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restarted_twice_loses_nothing() {
    let server = Arc::new(Mutex::new(OwnServer::start()));
    let url = server.lock().unwrap().url();
    let (connector, mut admin) = common::connect_to(&url).await.unwrap();
    let s = server.clone();
    let fault: Fault = Box::new(move |k| {
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
    });
    run(&mut admin, &connector, "restart", fault).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_cut_twice_through_a_proxy_lose_nothing() {
    let server = OwnServer::start();
    let (_, mut admin) = common::connect_to(&server.url()).await.unwrap();
    let proxy = Arc::new(
        FaultProxy::start(([127, 0, 0, 1], server.port).into())
            .await
            .expect("proxy"),
    );
    let through = Connector::new(&format!("redis://{}", proxy.addr())).unwrap();
    let fault: Fault = Box::new(FaultProxy::cutter(&proxy));
    run(&mut admin, &through, "cut", fault).await;
    assert!(
        proxy.accepted() >= 4,
        "the driver reconnected after each cut"
    );
}
