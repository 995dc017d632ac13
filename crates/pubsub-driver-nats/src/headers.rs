//! Attributes as NATS headers, encoded as the Go CDK's `natsv2` mode does.
//!
//! Each attribute is one header whose name and value are query-escaped the
//! way Go's `url.QueryEscape` does it (letters, digits and `-_.~` as they
//! are, a space as `+`, every other byte as `%XX`), so names and values may
//! hold anything and a Go CDK service on the same subject reads them back.

use async_nats::header::{HeaderMap, HeaderName, HeaderValue};
use pubsub_core::driver::Attributes;
use pubsub_core::{Error, Result};

/// Headers whose names start with this are NATS's and JetStream's own
/// (`Nats-Msg-Id`, `Nats-Expected-Stream`...): never attributes.
pub(crate) const RESERVED_PREFIX: &str = "Nats-";

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~')
}

/// Go's `url.QueryEscape`.
pub(crate) fn query_escape(s: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if unreserved(b) {
            out.push(char::from(b));
        } else if b == b' ' {
            out.push('+');
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 15)]));
        }
    }
    out
}

/// Go's `url.QueryUnescape`; `None` where Go would fail (a `%` not followed
/// by two hex digits, or bytes that are not UTF-8).
pub(crate) fn query_unescape(s: &str) -> Option<String> {
    if !s.bytes().any(|b| b == b'%' || b == b'+') {
        return Some(s.to_owned());
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                // Two hex digits, as Go takes them (`from_str_radix` alone
                // would also take a sign: "%+1").
                let hex = bytes.get(i + 1..i + 3)?;
                if !hex.iter().all(u8::is_ascii_hexdigit) {
                    return None;
                }
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The headers of a message's attributes. An attribute whose escaped name
/// starts with `Nats-` is refused: the server would take it for its own.
pub(crate) fn to_headers(attrs: &Attributes) -> Result<HeaderMap> {
    let mut headers = HeaderMap::new();
    for (k, v) in attrs {
        let name = query_escape(k);
        if name.starts_with(RESERVED_PREFIX) {
            return Err(Error::invalid_argument(format!(
                "attribute {k:?}: names starting with {RESERVED_PREFIX:?} are reserved by NATS"
            )));
        }
        let name = HeaderName::try_from(name).map_err(|_| {
            Error::invalid_argument(format!("attribute {k:?} is not a valid NATS header"))
        })?;
        headers.insert(name, HeaderValue::from(query_escape(v)));
    }
    Ok(headers)
}

/// The attributes of received headers: `Nats-` headers are left out, every
/// other header becomes an attribute (its first value), unescaped. A name
/// or value that does not unescape (written by a client that does not
/// escape, with a stray `%`) is kept as it arrived rather than failing the
/// message, where the Go CDK fails it.
pub(crate) fn from_headers(headers: Option<&HeaderMap>) -> Attributes {
    let mut attrs = Attributes::new();
    let Some(headers) = headers else {
        return attrs;
    };
    for (name, values) in headers.iter() {
        let name: &str = name.as_ref();
        if name.starts_with(RESERVED_PREFIX) {
            continue;
        }
        let value = values.first().map_or("", |v| v.as_str());
        let key = query_unescape(name).unwrap_or_else(|| name.to_owned());
        let value = query_unescape(value).unwrap_or_else(|| value.to_owned());
        attrs.insert(key, value);
    }
    attrs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_matches_go() {
        // Expected strings from Go's url.QueryEscape.
        for (raw, go) in [
            ("plain-key_1.~", "plain-key_1.~"),
            ("with space", "with+space"),
            ("a/b:c=d&e", "a%2Fb%3Ac%3Dd%26e"),
            ("100%", "100%25"),
            ("plus+sign", "plus%2Bsign"),
            ("ünï", "%C3%BCn%C3%AF"),
            ("", ""),
        ] {
            assert_eq!(query_escape(raw), go, "{raw:?}");
            assert_eq!(query_unescape(go).as_deref(), Some(raw), "{go:?}");
        }
    }

    #[test]
    fn unescaping_fails_where_go_fails() {
        assert_eq!(query_unescape("50%"), None);
        assert_eq!(query_unescape("%zz"), None);
        assert_eq!(query_unescape("%FF"), None, "not UTF-8");
    }

    #[test]
    fn reserved_and_unescapable_headers() {
        let mut h = HeaderMap::new();
        h.insert("Nats-Msg-Id", "abc");
        h.insert("raw%", "50%");
        h.insert("k+1", "v+1");
        let attrs = from_headers(Some(&h));
        assert_eq!(attrs.len(), 2, "{attrs:?}");
        assert_eq!(attrs["raw%"], "50%");
        assert_eq!(attrs["k 1"], "v 1");
        let mut bad = Attributes::new();
        bad.insert("Nats-Expected-Stream".into(), "x".into());
        assert!(to_headers(&bad).is_err());
    }

    #[test]
    fn a_percent_must_be_followed_by_two_hex_digits() {
        for bad in ["%+1", "%-1", "% 1", "%1", "%g0", "%"] {
            assert_eq!(query_unescape(bad), None, "{bad:?}");
        }
        assert_eq!(query_unescape("%2b").as_deref(), Some("+"));
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn escaping_round_trips(s in "\\PC{0,40}") {
                prop_assert_eq!(query_unescape(&query_escape(&s)), Some(s));
            }

            /// Any header text unescapes or is refused without a panic, and
            /// only where Go's `url.QueryUnescape` would accept it: every
            /// `%` followed by two hex digits, and UTF-8 after.
            #[test]
            fn unescaping_takes_only_what_go_takes(s in "[%+0-9a-fA-F\\PC]{0,24}") {
                let b = s.as_bytes();
                let well_formed = b.iter().enumerate().all(|(i, &c)| {
                    c != b'%'
                        || (b.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                            && b.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
                });
                if let Some(out) = query_unescape(&s) {
                    prop_assert!(well_formed, "{:?} unescaped to {:?}", s, out);
                }
            }

            /// Attributes sent come back as they were, or are refused with
            /// InvalidArgument before I/O.
            #[test]
            fn attributes_round_trip_or_are_refused(
                attrs in proptest::collection::btree_map("\\PC{0,16}", "\\PC{0,24}", 0..6)
            ) {
                let attrs: Attributes = attrs.into_iter().collect();
                match to_headers(&attrs) {
                    Ok(h) => prop_assert_eq!(from_headers(Some(&h)), attrs),
                    Err(e) => prop_assert_eq!(e.kind(), pubsub_core::ErrorKind::InvalidArgument),
                }
            }
        }
    }
}
