//! Shared by the Redis tests: the server and the admin calls they make.
#![allow(dead_code)]

use pubsub_driver_redis::redis::{self, aio::ConnectionManager};
use pubsub_driver_redis::Connector;

/// The server the tests use.
pub fn server() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// How to start the server, for the message of a test that cannot reach it.
pub const HOW: &str = "start Redis (scripts/backends up, or \
     `redis-server --daemonize yes --bind 127.0.0.1 --port 6379`) or set REDIS_URL";

/// A connector on `url` whose shared connection answers a PING.
pub async fn connect_to(url: &str) -> Result<(Connector, ConnectionManager), String> {
    let connector = Connector::new(url).map_err(|e| e.to_string())?;
    let mut conn = connector.connection().map_err(|e| e.to_string())?;
    let pong: redis::RedisResult<String> = redis::cmd("PING").query_async(&mut conn).await;
    pong.map_err(|e| format!("cannot reach Redis at {url}: {e}; {HOW}"))?;
    Ok((connector, conn))
}

/// A connector on the test server.
pub async fn connect() -> Result<(Connector, ConnectionManager), String> {
    connect_to(&server()).await
}

/// An empty stream that expires within the hour, so test runs do not pile
/// up in the shared server.
pub async fn create_stream(conn: &mut ConnectionManager, name: &str) -> redis::RedisResult<()> {
    redis::pipe()
        .cmd("XGROUP")
        .arg("CREATE")
        .arg(name)
        .arg("pubsub-probe")
        .arg("$")
        .arg("MKSTREAM")
        .ignore()
        .cmd("XGROUP")
        .arg("DESTROY")
        .arg(name)
        .arg("pubsub-probe")
        .ignore()
        .cmd("EXPIRE")
        .arg(name)
        .arg(3600)
        .ignore()
        .query_async(conn)
        .await
}

/// A group of `stream` that gets what is added from now on.
pub async fn create_group(
    conn: &mut ConnectionManager,
    stream: &str,
    group: &str,
) -> redis::RedisResult<()> {
    redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(stream)
        .arg(group)
        .arg("$")
        .query_async(conn)
        .await
}
