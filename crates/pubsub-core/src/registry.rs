//! Opening topics and subscriptions by URL.
//!
//! Each driver crate exports its scheme and a `register` function that adds
//! its [`Opener`] to a [`Registry`]; nothing registers itself behind the
//! application's back. The process-wide registry, [`registry()`], starts
//! with `mem://`.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, OnceLock, RwLock};

use async_trait::async_trait;
use url::Url;

use crate::error::{Error, Result};
use crate::subscription::Subscription;
use crate::topic::Topic;

/// Opens topics and subscriptions for the URL schemes it is registered for.
#[async_trait]
pub trait Opener: Send + Sync + 'static {
    /// Opens a topic. Opening succeeds for a topic that does not exist;
    /// its first send fails with `NotFound`.
    async fn open_topic(&self, url: &Url) -> Result<Topic>;

    /// Opens a subscription, likewise lazily checked.
    async fn open_subscription(&self, url: &Url) -> Result<Subscription>;

    /// The URL forms this opener takes for `scheme`, one a line, topics
    /// first, each saying what it opens (`pubsub schemes` prints them).
    /// None by default.
    fn url_forms(&self, scheme: &str) -> &'static [&'static str] {
        let _ = scheme;
        &[]
    }
}

/// A table from URL scheme to [`Opener`].
#[derive(Default)]
pub struct Registry {
    openers: RwLock<BTreeMap<String, Arc<dyn Opener>>>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Registry")
            .field("schemes", &self.schemes())
            .finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers (or replaces) the opener for `scheme`.
    pub fn register(&self, scheme: &str, opener: impl Opener) {
        self.openers
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(scheme.to_ascii_lowercase(), Arc::new(opener));
    }

    /// The registered schemes, sorted.
    pub fn schemes(&self) -> Vec<String> {
        self.openers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// The URL forms the opener registered for `scheme` describes
    /// ([`Opener::url_forms`]); none for a scheme not registered.
    pub fn url_forms(&self, scheme: &str) -> &'static [&'static str] {
        let opener = self
            .openers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&scheme.to_ascii_lowercase())
            .cloned();
        opener.map_or(&[], |o| o.url_forms(scheme))
    }

    fn opener(&self, url: &str) -> Result<(Arc<dyn Opener>, Url)> {
        let parsed = Url::parse(url).map_err(|e| {
            // The parser's message never echoes the input, which may hold a
            // password.
            Error::invalid_argument(format!("malformed URL: {e}"))
        })?;
        let opener = self
            .openers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(parsed.scheme())
            .cloned();
        match opener {
            Some(o) => Ok((o, parsed)),
            None => Err(Error::invalid_argument(format!(
                "no driver registered for URL scheme {:?}; registered schemes: {}",
                parsed.scheme(),
                self.schemes().join(", ")
            ))),
        }
    }

    /// Opens the topic at `url`.
    pub async fn open_topic(&self, url: &str) -> Result<Topic> {
        let (opener, url) = self.opener(url)?;
        opener.open_topic(&url).await
    }

    /// Opens the subscription at `url`.
    pub async fn open_subscription(&self, url: &str) -> Result<Subscription> {
        let (opener, url) = self.opener(url)?;
        opener.open_subscription(&url).await
    }
}

/// The process-wide registry, with `mem://` registered.
pub fn registry() -> &'static Registry {
    static GLOBAL: OnceLock<Registry> = OnceLock::new();
    GLOBAL.get_or_init(Registry::with_defaults)
}

/// Opens the topic at `url` through the process-wide [`registry()`].
///
/// ```
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> pubsub_core::Result<()> {
/// let topic = pubsub_core::open_topic("mem://greetings").await?;
/// let err = pubsub_core::open_topic("nope://x").await.unwrap_err();
/// assert!(err.to_string().contains("registered schemes: mem"));
/// # topic.shutdown().await
/// # }
/// ```
pub async fn open_topic(url: &str) -> Result<Topic> {
    registry().open_topic(url).await
}

/// Opens the subscription at `url` through the process-wide [`registry()`].
pub async fn open_subscription(url: &str) -> Result<Subscription> {
    registry().open_subscription(url).await
}

/// The query of `url` as decoded pairs, for openers.
pub fn query_pairs(url: &Url) -> Vec<(String, String)> {
    url.query_pairs()
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// The resource a URL names: its host and path, without a trailing slash,
/// percent-decoded (`rabbit://orders` names `orders`, `mem://a%20b` names
/// `a b`); `None` when empty.
pub fn resource_name(url: &Url) -> Option<String> {
    let raw = format!("{}{}", url.host_str().unwrap_or(""), url.path());
    let name = percent_decode(raw.trim_end_matches('/'));
    (!name.is_empty()).then_some(name)
}

fn percent_decode(s: &str) -> String {
    fn hex(b: u8) -> Option<u8> {
        (b as char).to_digit(16).map(|d| d as u8)
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A URL parameter's boolean as Go's `strconv.ParseBool` reads it (the Go
/// CDK's URLs use it), for openers; a bare key (`?nacklazy`) is true.
pub fn parse_bool(key: &str, value: &str) -> Result<bool> {
    match value {
        "" | "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(Error::invalid_argument(format!(
            "{key} must be true or false, not {value:?}"
        ))),
    }
}

/// `url` with any password replaced by `***`, fit for errors and logs.
pub fn redact_url(url: &Url) -> String {
    let mut u = url.clone();
    if u.password().is_some() {
        let _ = u.set_password(Some("***"));
    }
    u.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resource_names() {
        let name = |u: &str| resource_name(&Url::parse(u).unwrap());
        assert_eq!(name("rabbit://orders").as_deref(), Some("orders"));
        assert_eq!(name("mem://a%20b/c/").as_deref(), Some("a b/c"));
        assert_eq!(name("mem://%41%2").as_deref(), Some("A%2"));
        assert_eq!(name("kafka://"), None);
    }

    #[test]
    fn redacts_passwords() {
        let u = Url::parse("amqp://user:s3cret@host:5672/%2f").unwrap();
        let r = redact_url(&u);
        assert!(!r.contains("s3cret"));
        assert!(r.contains("user:***@host"));
    }

    #[tokio::test]
    async fn unknown_scheme_lists_registered_ones() {
        let r = Registry::with_defaults();
        let e = r.open_topic("kafka://orders").await.unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::InvalidArgument);
        assert!(e.to_string().contains("\"kafka\""));
        assert!(e.to_string().contains("registered schemes: mem"));
        let e = r.open_topic("not a url").await.unwrap_err();
        assert_eq!(e.kind(), crate::ErrorKind::InvalidArgument);
        let e = r.open_topic("x://user:hunter2@host/").await.unwrap_err();
        assert!(!e.to_string().contains("hunter2"));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(64))]

            /// Any URL text opens (mem) or fails with a typed error naming
            /// the problem, never a panic: malformed URLs, unknown schemes,
            /// unknown parameters, odd names and values.
            #[test]
            fn any_url_opens_or_fails_cleanly(
                url in "(mem|nope|MEM|)(://|:|:/)?[a-zA-Z0-9%./ _-]{0,12}([?][a-z]{0,14}=[a-z0-9%.&=-]{0,10}){0,2}|\\PC{0,24}"
            ) {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("runtime");
                let r = Registry::with_defaults();
                rt.block_on(async {
                    if let Err(e) = r.open_topic(&url).await {
                        assert!(!e.to_string().is_empty());
                    }
                    if let Ok(s) = r.open_subscription(&url).await {
                        s.shutdown().await.expect("shutdown");
                    }
                });
            }

            /// A URL's resource name and boolean parameters never panic.
            #[test]
            fn names_and_booleans_never_panic(raw in "[a-z]{1,5}://\\PC{0,20}", b in "\\PC{0,6}") {
                if let Ok(u) = Url::parse(&raw) {
                    let _ = resource_name(&u);
                    let _ = query_pairs(&u);
                }
                if let Err(e) = parse_bool("k", &b) {
                    prop_assert_eq!(e.kind(), crate::ErrorKind::InvalidArgument);
                }
            }
        }
    }
}
