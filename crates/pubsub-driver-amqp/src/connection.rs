//! One connection to RabbitMQ, reopened whenever it is found dead.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use lapin::{Channel, Connection, ConnectionProperties};
use pubsub_core::{Error, Result, Url};
use tokio::sync::Mutex;

use crate::error;

/// How long setting up may take: dialling, opening a channel, turning
/// confirms on, starting a consumer. A broker that is stopping or starting
/// can accept a socket and never answer; without a limit, the dial would
/// hang, and every send and receive queued behind it with it. A timed-out
/// step fails as temporary, so the core retries it on a fresh connection.
pub(crate) const BROKER_TIMEOUT: Duration = Duration::from_secs(10);

/// The error for a step that took longer than [`BROKER_TIMEOUT`].
pub(crate) fn timed_out(what: &str) -> Error {
    Error::unavailable(format!(
        "{what} got no answer from RabbitMQ within {} s",
        BROKER_TIMEOUT.as_secs()
    ))
    .with_temporary(true)
}

/// Runs one step with the time limit.
pub(crate) async fn bounded<T>(
    what: &str,
    step: impl Future<Output = lapin::Result<T>>,
) -> Result<T> {
    match tokio::time::timeout(BROKER_TIMEOUT, step).await {
        Ok(r) => r.map_err(error::map),
        Err(_) => Err(timed_out(what)),
    }
}

/// Holds the connection that topics and subscriptions open their channels
/// on, and reconnects when it has dropped (broker restart, forced close,
/// network cut). Cheap to clone; clones share the connection.
///
/// The server URL may hold a password; it is never printed: `Debug` and
/// errors show it redacted.
#[derive(Clone)]
pub struct Connector {
    inner: Arc<Inner>,
}

struct Inner {
    /// Where to (re)connect; `None` for a connection handed in without one.
    uri: Option<String>,
    redacted: String,
    properties: ConnectionProperties,
    current: Mutex<Option<Arc<Connection>>>,
}

impl Connector {
    /// A connector for `uri` (`amqp://user:pass@host:port/vhost`). Nothing
    /// is dialled until first use.
    pub fn new(uri: &str) -> Result<Self> {
        let parsed = Url::parse(uri)
            .map_err(|e| Error::invalid_argument(format!("malformed RabbitMQ server URL: {e}")))?;
        if !matches!(parsed.scheme(), "amqp" | "amqps") {
            return Err(Error::invalid_argument(format!(
                "RabbitMQ server URL must start with amqp:// or amqps://, not {}://",
                parsed.scheme()
            )));
        }
        Ok(Self::build(
            Some(uri.to_owned()),
            pubsub_core::redact_url(&parsed),
            None,
        ))
    }

    /// A connector for the server in `RABBIT_SERVER_URL`, the variable the
    /// Go CDK reads.
    pub fn from_env() -> Result<Self> {
        let uri = std::env::var("RABBIT_SERVER_URL").map_err(|_| {
            Error::invalid_argument(
                "RABBIT_SERVER_URL is not set; set it to the server, e.g. amqp://guest:guest@127.0.0.1:5672/%2f",
            )
        })?;
        Self::new(&uri)
    }

    /// Uses an existing connection. With `reconnect_uri`, a dropped
    /// connection is replaced by dialling it; without, errors are reported
    /// once the given connection is gone.
    pub fn from_connection(conn: Connection, reconnect_uri: Option<&str>) -> Result<Self> {
        let (uri, redacted) = match reconnect_uri {
            Some(u) => {
                let c = Self::new(u)?;
                (c.inner.uri.clone(), c.inner.redacted.clone())
            }
            None => (None, "(existing connection)".to_owned()),
        };
        Ok(Self::build(uri, redacted, Some(conn)))
    }

    fn build(uri: Option<String>, redacted: String, current: Option<Connection>) -> Self {
        Connector {
            inner: Arc::new(Inner {
                uri,
                redacted,
                properties: ConnectionProperties::default()
                    .with_connection_name("pubsub-rs".into()),
                current: Mutex::new(current.map(Arc::new)),
            }),
        }
    }

    /// The live connection, dialling a new one if there is none or the last
    /// one died.
    pub async fn connection(&self) -> Result<Arc<Connection>> {
        let mut current = self.inner.current.lock().await;
        if let Some(c) = current.as_ref() {
            if c.status().connected() {
                return Ok(c.clone());
            }
            tracing::info!(server = %self.inner.redacted, "RabbitMQ connection lost; reconnecting");
        }
        let Some(uri) = &self.inner.uri else {
            return Err(Error::unavailable(
                "the RabbitMQ connection handed to this driver is closed, and no URL to reconnect to was given",
            )
            .with_temporary(false)
            .with_context("driver", crate::DRIVER));
        };
        let conn = bounded(
            "connecting",
            Connection::connect(uri, self.inner.properties.clone()),
        )
        .await
        .map_err(|e| {
            e.with_temporary(true)
                .with_context("server", self.inner.redacted.clone())
        })?;
        let conn = Arc::new(conn);
        *current = Some(conn.clone());
        Ok(conn)
    }

    /// A new channel on the live connection.
    pub async fn channel(&self) -> Result<Channel> {
        let conn = self.connection().await?;
        match tokio::time::timeout(BROKER_TIMEOUT, conn.create_channel()).await {
            Ok(Ok(ch)) => Ok(ch),
            Ok(Err(e)) => {
                if !conn.status().connected() {
                    self.forget(&conn).await;
                }
                Err(error::map(e))
            }
            Err(_) => {
                // A connection that cannot open a channel in time is as good
                // as dead even if it has not noticed: dial anew, where there
                // is a URL to dial (a connection handed in is kept).
                if self.inner.uri.is_some() {
                    self.forget(&conn).await;
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(
                            BROKER_TIMEOUT,
                            conn.close(320, "no answer in time".into()),
                        )
                        .await;
                    });
                }
                Err(timed_out("opening a channel"))
            }
        }
    }

    /// Drops `dead` if it is still the current connection, so the next call
    /// dials anew.
    async fn forget(&self, dead: &Arc<Connection>) {
        let mut current = self.inner.current.lock().await;
        if current.as_ref().is_some_and(|c| Arc::ptr_eq(c, dead)) {
            *current = None;
        }
    }

    /// The server, with any password redacted.
    pub fn server(&self) -> &str {
        &self.inner.redacted
    }

    /// Closes the connection, if open.
    pub async fn close(&self) -> Result<()> {
        if let Some(c) = self.inner.current.lock().await.take() {
            if c.status().connected() {
                match tokio::time::timeout(BROKER_TIMEOUT, c.close(200, "bye".into())).await {
                    Ok(r) => r.map_err(error::map)?,
                    Err(_) => tracing::warn!(
                        server = %self.inner.redacted,
                        "RabbitMQ did not confirm closing the connection in time"
                    ),
                }
            }
        }
        Ok(())
    }
}

impl fmt::Debug for Connector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connector")
            .field("server", &self.inner.redacted)
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_never_show() {
        let c = Connector::new("amqp://user:hunter2@localhost:5672/%2f").unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
        assert!(!c.server().contains("hunter2"));
        let e = Connector::new("http://user:hunter2@localhost/").unwrap_err();
        assert!(!e.to_string().contains("hunter2"));
        let e = Connector::new("amqp://user:hunter2@[bad").unwrap_err();
        assert!(!e.to_string().contains("hunter2"));
    }
}
