//! How a message is laid out in a stream entry, and reading entries out of
//! the server's replies.
//!
//! Sending, an entry's fields are `$id` (the message's unique id in hex),
//! `$body` (the body, byte for byte), each attribute under its own name,
//! and `$key` (the ordering key) when there is one. An attribute whose name
//! starts with `$` is written with a second `$` in front, so no attribute
//! can be taken for one of the driver's fields.
//!
//! Receiving, `$body`, `$key` and `$id` are read back; a field starting
//! `$$` is the attribute named without the first `$`; other fields starting
//! `$` are left out (kept for the driver); every other field is an
//! attribute. An entry written by another client with plain fields
//! (`XADD s * name alice`) is received with an empty body and those fields
//! as attributes, its entry id as the message id. Field names and values
//! that are not UTF-8 become attributes with U+FFFD for each invalid byte.

use bytes::Bytes;
use pubsub_core::driver::{Attributes, OutgoingMessage};
use pubsub_core::{Error, Result};
use redis::Value;

/// The field list of one entry as it goes to `XADD`: what a before-send
/// hook sees and may change.
pub type Fields = Vec<(String, Bytes)>;

pub(crate) const BODY: &str = "$body";
pub(crate) const KEY: &str = "$key";
pub(crate) const ID: &str = "$id";

/// A stream entry as the server returned it: the raw form of a received
/// message, for [`pubsub_core::Message::as_raw`].
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct Entry {
    /// The stream it was read from.
    pub stream: String,
    /// The entry id, `MILLISECONDS-SEQUENCE`.
    pub id: String,
    /// The fields in the order they were written.
    pub fields: Vec<(Bytes, Bytes)>,
}

/// The fields of a message.
pub(crate) fn to_fields(m: &OutgoingMessage) -> Fields {
    let mut fields = Vec::with_capacity(m.attributes.len() + 3);
    fields.push((ID.to_owned(), Bytes::from(m.unique_id_hex())));
    fields.push((BODY.to_owned(), m.body.clone()));
    for (k, v) in &m.attributes {
        let name = if k.starts_with('$') {
            format!("${k}")
        } else {
            k.clone()
        };
        fields.push((name, Bytes::from(v.clone())));
    }
    if let Some(key) = &m.ordering_key {
        fields.push((KEY.to_owned(), Bytes::from(key.clone())));
    }
    fields
}

/// What a received entry holds, by the rule in the module docs.
pub(crate) struct Decoded {
    pub(crate) body: Bytes,
    pub(crate) attributes: Attributes,
    pub(crate) ordering_key: Option<String>,
    pub(crate) id: Option<String>,
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

pub(crate) fn decode(fields: &[(Bytes, Bytes)]) -> Decoded {
    let mut d = Decoded {
        body: Bytes::new(),
        attributes: Attributes::new(),
        ordering_key: None,
        id: None,
    };
    for (name, value) in fields {
        match name.as_ref() {
            n if n == BODY.as_bytes() => d.body = value.clone(),
            n if n == KEY.as_bytes() => d.ordering_key = Some(text(value)),
            n if n == ID.as_bytes() => d.id = Some(text(value)),
            n if n.starts_with(b"$$") => {
                d.attributes.insert(text(&n[1..]), text(value));
            }
            n if n.starts_with(b"$") => {}
            n => {
                d.attributes.insert(text(n), text(value));
            }
        }
    }
    d
}

/// An entry id's two numbers.
pub(crate) fn parse_id(id: &str) -> Option<(u64, u64)> {
    let (ms, seq) = id.split_once('-')?;
    Some((ms.parse().ok()?, seq.parse().ok()?))
}

pub(crate) fn format_id((ms, seq): (u64, u64)) -> String {
    format!("{ms}-{seq}")
}

fn bad_reply(what: &str) -> Error {
    Error::internal(format!("unexpected reply from Redis to {what}"))
        .with_context("driver", crate::DRIVER)
}

fn bytes(v: Value) -> Option<Bytes> {
    match v {
        Value::BulkString(b) => Some(Bytes::from(b)),
        Value::SimpleString(s) => Some(Bytes::from(s)),
        _ => None,
    }
}

fn string(v: Value) -> Option<String> {
    bytes(v).map(|b| text(&b))
}

/// Lists, whether the server answered in RESP2 arrays or RESP3 maps.
fn items(v: Value) -> Option<Vec<Value>> {
    match v {
        Value::Array(a) | Value::Set(a) => Some(a),
        Value::Map(m) => Some(m.into_iter().flat_map(|(k, v)| [k, v]).collect()),
        Value::Nil => Some(Vec::new()),
        _ => None,
    }
}

/// One `[id, [field, value, ...]]`; `None` for an entry deleted since it
/// was delivered (its fields are nil).
fn entry(stream: &str, v: Value, what: &str) -> Result<Option<Entry>> {
    let mut pair = items(v).ok_or_else(|| bad_reply(what))?.into_iter();
    let id = pair
        .next()
        .and_then(string)
        .ok_or_else(|| bad_reply(what))?;
    let fields = match pair.next() {
        None | Some(Value::Nil) => return Ok(None),
        Some(f) => items(f).ok_or_else(|| bad_reply(what))?,
    };
    let mut out = Vec::with_capacity(fields.len() / 2);
    let mut it = fields.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((
            bytes(k).ok_or_else(|| bad_reply(what))?,
            bytes(v).ok_or_else(|| bad_reply(what))?,
        ));
    }
    Ok(Some(Entry {
        stream: stream.to_owned(),
        id,
        fields: out,
    }))
}

fn entries(stream: &str, v: Value, what: &str) -> Result<Vec<Entry>> {
    let list = items(v).ok_or_else(|| bad_reply(what))?;
    let mut out = Vec::with_capacity(list.len());
    for e in list {
        if let Some(e) = entry(stream, e, what)? {
            out.push(e);
        }
    }
    Ok(out)
}

/// The entries of an `XREADGROUP` reply for one stream (nil when the
/// block timed out).
pub(crate) fn read_reply(stream: &str, v: Value) -> Result<Vec<Entry>> {
    const WHAT: &str = "XREADGROUP";
    let streams = items(v).ok_or_else(|| bad_reply(WHAT))?;
    let mut out = Vec::new();
    // RESP2: [[name, entries], ...]; RESP3 maps flatten to name, entries.
    let mut it = streams.into_iter().peekable();
    while let Some(first) = it.next() {
        let (name, list) = match first {
            Value::Array(_) | Value::Set(_) | Value::Map(_) => {
                let mut pair = items(first).ok_or_else(|| bad_reply(WHAT))?.into_iter();
                (pair.next(), pair.next())
            }
            name => (Some(name), it.next()),
        };
        let (Some(_), Some(list)) = (name, list) else {
            return Err(bad_reply(WHAT));
        };
        out.extend(entries(stream, list, WHAT)?);
    }
    Ok(out)
}

/// An `XAUTOCLAIM` reply: the next cursor, the claimed entries and the
/// ids of entries that were deleted meanwhile (Redis 7).
pub(crate) fn autoclaim_reply(stream: &str, v: Value) -> Result<(String, Vec<Entry>, usize)> {
    const WHAT: &str = "XAUTOCLAIM";
    let mut parts = items(v).ok_or_else(|| bad_reply(WHAT))?.into_iter();
    let cursor = parts
        .next()
        .and_then(string)
        .ok_or_else(|| bad_reply(WHAT))?;
    let claimed = entries(stream, parts.next().ok_or_else(|| bad_reply(WHAT))?, WHAT)?;
    let deleted = parts.next().and_then(items).map_or(0, |d| d.len());
    Ok((cursor, claimed, deleted))
}

/// An extended `XPENDING` reply: each entry's id and delivery count.
pub(crate) fn pending_reply(v: Value) -> Result<Vec<(String, u64)>> {
    const WHAT: &str = "XPENDING";
    let mut out = Vec::new();
    for row in items(v).ok_or_else(|| bad_reply(WHAT))? {
        let mut row = items(row).ok_or_else(|| bad_reply(WHAT))?.into_iter();
        let id = row.next().and_then(string).ok_or_else(|| bad_reply(WHAT))?;
        let count = match row.nth(2) {
            Some(Value::Int(n)) => u64::try_from(n).unwrap_or(0),
            _ => return Err(bad_reply(WHAT)),
        };
        out.push((id, count));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::from(s.to_owned())
    }

    #[test]
    fn fields_round_trip_and_reserved_names_are_escaped() {
        let mut m = OutgoingMessage::new(&b"\xffbody"[..]);
        m.attributes.insert("$body".into(), "not the body".into());
        m.attributes.insert("plain".into(), "v".into());
        m.ordering_key = Some("k".into());
        let fields: Vec<(Bytes, Bytes)> = to_fields(&m)
            .into_iter()
            .map(|(k, v)| (Bytes::from(k), v))
            .collect();
        let d = decode(&fields);
        assert_eq!(d.body.as_ref(), b"\xffbody");
        assert_eq!(d.attributes, m.attributes);
        assert_eq!(d.ordering_key.as_deref(), Some("k"));
        assert_eq!(d.id, Some(m.unique_id_hex()));
    }

    #[test]
    fn plain_entries_are_attributes() {
        let d = decode(&[(b("name"), b("alice")), (b("$other"), b("x"))]);
        assert!(d.body.is_empty());
        assert_eq!(d.attributes.len(), 1);
        assert_eq!(d.attributes["name"], "alice");
        assert_eq!(d.id, None);
    }

    #[test]
    fn ids_parse() {
        assert_eq!(parse_id("1700000000000-7"), Some((1_700_000_000_000, 7)));
        assert_eq!(parse_id("x"), None);
        assert_eq!(format_id((1, 2)), "1-2");
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn reply() -> impl Strategy<Value = Value> {
            let leaf = prop_oneof![
                Just(Value::Nil),
                Just(Value::Okay),
                any::<i64>().prop_map(Value::Int),
                proptest::collection::vec(any::<u8>(), 0..12).prop_map(Value::BulkString),
                "\\PC{0,8}".prop_map(Value::SimpleString),
                any::<bool>().prop_map(Value::Boolean),
            ];
            leaf.prop_recursive(4, 48, 6, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
                    proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::Set),
                    proptest::collection::vec((inner.clone(), inner), 0..3).prop_map(Value::Map),
                ]
            })
        }

        proptest! {
            /// Whatever the server answers, reading it gives entries or a
            /// typed error, never a panic.
            #[test]
            fn any_reply_reads_or_fails_cleanly(v in reply()) {
                let _ = read_reply("s", v.clone());
                let _ = autoclaim_reply("s", v.clone());
                let _ = pending_reply(v);
            }

            /// Any fields another client wrote decode without a panic.
            #[test]
            fn any_fields_decode(
                fields in proptest::collection::vec(
                    (proptest::collection::vec(any::<u8>(), 0..8), proptest::collection::vec(any::<u8>(), 0..8)),
                    0..8,
                )
            ) {
                let fields: Vec<(Bytes, Bytes)> =
                    fields.into_iter().map(|(k, v)| (Bytes::from(k), Bytes::from(v))).collect();
                let _ = decode(&fields);
            }

            /// A message's body, attributes and key come back as sent,
            /// whatever their names.
            #[test]
            fn messages_round_trip_through_fields(
                body in proptest::collection::vec(any::<u8>(), 0..64),
                attrs in proptest::collection::btree_map("[$]{0,3}\\PC{0,8}", "\\PC{0,12}", 0..6),
                key in proptest::option::of("\\PC{0,8}"),
            ) {
                let mut m = OutgoingMessage::new(body.clone());
                m.attributes = attrs.clone().into_iter().collect();
                m.ordering_key = key.clone();
                let fields: Vec<(Bytes, Bytes)> = to_fields(&m)
                    .into_iter()
                    .map(|(k, v)| (Bytes::from(k), v))
                    .collect();
                let d = decode(&fields);
                prop_assert_eq!(d.body.as_ref(), &body[..]);
                prop_assert_eq!(d.attributes, m.attributes);
                prop_assert_eq!(d.ordering_key, key);
            }

            #[test]
            fn any_entry_id_parses_or_is_refused(id in "[0-9-]{0,24}|\\PC{0,12}") {
                if let Some(p) = parse_id(&id) {
                    prop_assert_eq!(parse_id(&format_id(p)), Some(p));
                }
            }
        }
    }
}
