//! Client settings, with secrets kept out of `Debug` and errors.

use std::collections::BTreeMap;
use std::fmt;

use pubsub_core::{Error, Result};
use rdkafka::ClientConfig;

/// librdkafka settings shared by the producers and consumers this driver
/// makes: `bootstrap.servers`, security and SASL settings, timeouts.
///
/// `Debug` prints every setting but the secret ones (`sasl.password`,
/// `ssl.key.password`, anything named like a secret or token), which show
/// as `***`.
#[derive(Clone, Default)]
pub struct KafkaConfig {
    settings: BTreeMap<String, String>,
}

fn is_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    [
        "password",
        "secret",
        "token",
        "oauthbearer.config",
        "ssl.key.pem",
        "credentials",
    ]
    .iter()
    .any(|s| k.contains(s))
}

impl KafkaConfig {
    /// Settings for the given comma-separated brokers.
    pub fn new(brokers: &str) -> Self {
        KafkaConfig::default().set("bootstrap.servers", brokers)
    }

    /// Settings for the brokers in `KAFKA_BROKERS`, the variable the Go CDK
    /// reads.
    pub fn from_env() -> Result<Self> {
        let brokers = std::env::var("KAFKA_BROKERS").map_err(|_| {
            Error::invalid_argument(
                "KAFKA_BROKERS is not set; set it to the brokers, e.g. 127.0.0.1:9092",
            )
        })?;
        Ok(Self::new(&brokers))
    }

    /// Settings copied from an rdkafka `ClientConfig`.
    pub fn from_client_config(config: &ClientConfig) -> Self {
        KafkaConfig {
            settings: config
                .config_map()
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    /// Sets a librdkafka property.
    pub fn set(mut self, key: &str, value: impl Into<String>) -> Self {
        self.settings.insert(key.to_owned(), value.into());
        self
    }

    /// A property, if set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.settings.get(key).map(String::as_str)
    }

    /// An rdkafka config: `defaults` first, then these settings over them.
    pub(crate) fn client_config(&self, defaults: &[(&str, &str)]) -> ClientConfig {
        let mut c = ClientConfig::new();
        for (k, v) in defaults {
            c.set(*k, *v);
        }
        for (k, v) in &self.settings {
            c.set(k, v);
        }
        c
    }
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut m = f.debug_map();
        for (k, v) in &self.settings {
            if is_secret(k) {
                m.entry(k, &"***");
            } else {
                m.entry(k, v);
            }
        }
        m.finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_never_show_in_debug() {
        let c = KafkaConfig::new("b:9092")
            .set("sasl.username", "alice")
            .set("sasl.password", "hunter2")
            .set("ssl.key.password", "swordfish");
        let shown = format!("{c:?}");
        assert!(shown.contains("alice") && shown.contains("b:9092"));
        assert!(
            !shown.contains("hunter2") && !shown.contains("swordfish"),
            "{shown}"
        );
    }
}
