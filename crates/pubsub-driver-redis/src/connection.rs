//! The connections a driver uses: one shared, multiplexed connection for
//! commands that answer at once, and one a subscription for its blocking
//! reads.

use std::fmt;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use pubsub_core::{Error, Result};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

/// How long a command that does not block may take before it fails (and
/// is retried by the core).
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(10);

/// A Redis server and the connections to it, cheap to clone.
///
/// Every topic and subscription made from one connector shares one
/// multiplexed connection (a `redis::aio::ConnectionManager`, which
/// reconnects by itself); each subscription adds one of its own for
/// `XREADGROUP ... BLOCK`, since a blocked command holds up everything
/// queued behind it on a connection. Passwords in the URL never appear in
/// errors, logs or `Debug`.
#[derive(Clone)]
pub struct Connector {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    shared: OnceLock<ConnectionManager>,
    redacted: String,
}

impl Connector {
    /// A connector for `url` (`redis://[user:pass@]host:6379[/db]`,
    /// `rediss://` for TLS where redis-rs was built with it). Connects on
    /// first use.
    pub fn new(url: &str) -> Result<Self> {
        let client = redis::Client::open(url).map_err(|e| {
            Error::invalid_argument(format!("invalid Redis URL ({:?})", e.kind()))
                .with_context("driver", crate::DRIVER)
        })?;
        Ok(Self::from_client(client))
    }

    /// A connector on the server in `REDIS_URL`.
    pub fn from_env() -> Result<Self> {
        let url = std::env::var("REDIS_URL").map_err(|_| {
            Error::invalid_argument(
                "REDIS_URL is not set; set it to the server, e.g. redis://127.0.0.1:6379",
            )
        })?;
        Self::new(&url)
    }

    /// A connector on an existing client.
    pub fn from_client(client: redis::Client) -> Self {
        let info = client.get_connection_info();
        let redacted = format!("{:?}", info.addr());
        Connector {
            inner: Arc::new(Inner {
                client,
                shared: OnceLock::new(),
                redacted,
            }),
        }
    }

    /// A connector whose shared connection is `manager` (blocking reads
    /// still get connections of their own from `client`).
    pub fn with_connection_manager(client: redis::Client, manager: ConnectionManager) -> Self {
        let c = Self::from_client(client);
        let _ = c.inner.shared.set(manager);
        c
    }

    /// The client the connections are made from.
    pub fn client(&self) -> &redis::Client {
        &self.inner.client
    }

    /// The shared connection, made on first use.
    pub fn connection(&self) -> Result<ConnectionManager> {
        if let Some(c) = self.inner.shared.get() {
            return Ok(c.clone());
        }
        let c = self.manager(RESPONSE_TIMEOUT)?;
        Ok(self.inner.shared.get_or_init(|| c).clone())
    }

    /// A new connection for commands that block up to `block`.
    pub(crate) fn blocking_connection(&self, block: Duration) -> Result<ConnectionManager> {
        self.manager(block + RESPONSE_TIMEOUT)
    }

    fn manager(&self, response_timeout: Duration) -> Result<ConnectionManager> {
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(response_timeout))
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_number_of_retries(3)
            .set_max_delay(Duration::from_secs(2));
        ConnectionManager::new_lazy_with_config(self.inner.client.clone(), config)
            .map_err(|e| crate::error::map(e, "setting up a Redis connection"))
    }

    /// The server's address, without credentials.
    pub fn server(&self) -> &str {
        &self.inner.redacted
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
    use super::Connector;

    #[test]
    fn passwords_never_show() {
        let c = Connector::new("redis://user:s3cret@127.0.0.1:6379/0").unwrap();
        assert!(!format!("{c:?}").contains("s3cret"));
        assert!(!c.server().contains("s3cret"));
        let e = Connector::new("redis://user:s3cret@[::1:6379").unwrap_err();
        assert!(!e.to_string().contains("s3cret"), "{e}");
    }
}
