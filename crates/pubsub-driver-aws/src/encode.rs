//! The Go CDK's encoding of messages for SNS and SQS, both ways: attribute
//! keys hex-escaped for AWS's name rules, values URL-escaped, bodies that
//! SQS cannot carry base64-encoded and marked, and the SNS notification
//! envelope recognised on receive.

use std::collections::BTreeMap;

use base64::Engine as _;
use pubsub_core::{Error, Result};

/// The attribute that marks a base64-encoded body, as the Go CDK names it.
pub const BASE64_ATTRIBUTE: &str = "base64encoded";

/// Most message attributes SQS and SNS take on one message (SNS raw
/// delivery silently drops a message with more).
pub const MAX_ATTRIBUTES: usize = 10;

/// Longest attribute name AWS takes.
pub const MAX_ATTRIBUTE_NAME: usize = 256;

/// When bodies are base64-encoded, as the Go CDK's `BodyBase64Encoding`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum BodyEncoding {
    /// Bodies SQS cannot carry as text are encoded: those that are not
    /// UTF-8 and (beyond the Go CDK) those with characters SQS refuses,
    /// such as NUL. The default.
    #[default]
    WhenNeeded,
    /// Every body is encoded.
    Always,
    /// No body is encoded; one SQS cannot carry fails to send.
    Never,
}

/// Whether SQS takes `c` in a message body or attribute value: XML's
/// characters (`#x9 | #xA | #xD | #x20-#xD7FF | #xE000-#xFFFD |
/// #x10000-#x10FFFF`).
fn sqs_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

/// The body as sent, and whether it was base64-encoded.
pub fn encode_body(body: &[u8], how: BodyEncoding) -> (String, bool) {
    let text = std::str::from_utf8(body)
        .ok()
        .filter(|s| s.chars().all(sqs_char));
    match (how, text) {
        (BodyEncoding::WhenNeeded, Some(s)) | (BodyEncoding::Never, Some(s)) => {
            (s.to_owned(), false)
        }
        (BodyEncoding::Never, None) => (String::from_utf8_lossy(body).into_owned(), false),
        _ => (base64::engine::general_purpose::STANDARD.encode(body), true),
    }
}

/// The body received: decoded when marked as base64, else as is. A marked
/// body that is not base64 stays as it came, as in the Go CDK.
pub fn decode_body(body: String, base64_marked: bool) -> Vec<u8> {
    if base64_marked {
        if let Ok(b) = base64::engine::general_purpose::STANDARD.decode(body.as_bytes()) {
            return b;
        }
    }
    body.into_bytes()
}

/// The Go CDK's `escape.unescape` at `i`: `__0x<hex>__` with the hex a
/// signed 32-bit number, giving the rune and the index of the last `_`.
fn unescape_at(r: &[char], i: usize) -> Option<(char, usize)> {
    let rest = r.get(i..)?;
    if rest.len() < 4 || rest[..4] != ['_', '_', '0', 'x'] {
        return None;
    }
    let mut j = i + 4;
    while j < r.len() && r[j] != '_' {
        j += 1;
    }
    if r.get(j) != Some(&'_') || r.get(j + 1) != Some(&'_') {
        return None;
    }
    let digits: String = r[i + 4..j].iter().collect();
    let v = i32::from_str_radix(&digits, 16).ok()?;
    // Go turns a number that is no Unicode scalar into U+FFFD.
    let c = u32::try_from(v)
        .ok()
        .and_then(char::from_u32)
        .unwrap_or('\u{FFFD}');
    Some((c, j + 1))
}

/// Escapes an attribute key as the Go CDK does (`__0x<hex>__` for any
/// character but ASCII letters, digits, `_`, `-` and a `.` that neither
/// starts the key nor follows another `.`, and for the start of anything
/// that would read as an escape), and beyond it so AWS never refuses the
/// name: a trailing `.`, the first letter of an `AWS.` or `Amazon.` prefix
/// (any case), and the first letter of a user key spelled like the
/// base64 marker. The Go CDK's unescaping reads all of it back.
pub fn escape_key(key: &str) -> Result<String> {
    let r: Vec<char> = key.chars().collect();
    let lower = key.to_ascii_lowercase();
    let reserved_prefix =
        lower.starts_with("aws.") || lower.starts_with("amazon.") || key == BASE64_ATTRIBUTE;
    let mut out = String::with_capacity(key.len());
    for (i, &c) in r.iter().enumerate() {
        let allowed = c.is_ascii_alphanumeric()
            || c == '_'
            || c == '-'
            || (c == '.' && i != 0 && r[i - 1] != '.' && i + 1 != r.len());
        let escape = !allowed || unescape_at(&r, i).is_some() || (i == 0 && reserved_prefix);
        if escape {
            out.push_str(&format!("__{:#x}__", c as u32));
        } else {
            out.push(c);
        }
    }
    if out.len() > MAX_ATTRIBUTE_NAME {
        return Err(Error::invalid_argument(format!(
            "attribute name {key:?} is {} bytes once escaped for AWS, over its limit of \
             {MAX_ATTRIBUTE_NAME}",
            out.len()
        )));
    }
    Ok(out)
}

/// Undoes [`escape_key`] (and the Go CDK's escaping).
pub fn unescape_key(key: &str) -> String {
    let r: Vec<char> = key.chars().collect();
    if !key.contains("__0x") {
        return key.to_owned();
    }
    let mut out = String::with_capacity(key.len());
    let mut i = 0;
    while i < r.len() {
        match unescape_at(&r, i) {
            Some((c, last)) => {
                out.push(c);
                i = last + 1;
            }
            None => {
                out.push(r[i]);
                i += 1;
            }
        }
    }
    out
}

/// Go's `url.PathEscape`: every byte but ASCII letters, digits and
/// `-_.~$&+:=@` as `%XX`.
pub fn escape_value(v: &str) -> String {
    let keep = |b: u8| b.is_ascii_alphanumeric() || b"-_.~$&+:=@".contains(&b);
    if v.bytes().all(keep) {
        return v.to_owned();
    }
    let mut out = String::with_capacity(v.len() * 3);
    for b in v.bytes() {
        if keep(b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Go's `url.PathUnescape`, keeping the value as it came when it is not
/// well formed, as the Go CDK does.
pub fn unescape_value(v: &str) -> String {
    if !v.contains('%') {
        return v.to_owned();
    }
    let b = v.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    let hex = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    while i < b.len() {
        if b[i] == b'%' {
            match (
                b.get(i + 1).copied().and_then(hex),
                b.get(i + 2).copied().and_then(hex),
            ) {
                (Some(h), Some(l)) => {
                    out.push(h << 4 | l);
                    i += 3;
                    continue;
                }
                _ => return v.to_owned(),
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// A message ready for SNS or SQS: escaped attributes (the base64 marker
/// among them) and the body as text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    /// Escaped names to escaped values.
    pub attributes: BTreeMap<String, String>,
    /// The body as sent.
    pub body: String,
}

impl Encoded {
    /// The size AWS counts against its message limit: the body, and each
    /// attribute's name, data type (`String`) and value.
    pub fn size(&self) -> usize {
        self.body.len()
            + self
                .attributes
                .iter()
                .map(|(k, v)| k.len() + "String".len() + v.len())
                .sum::<usize>()
    }
}

/// Encodes a message, refusing before any I/O what AWS would refuse or
/// silently drop: more than [`MAX_ATTRIBUTES`] attributes once encoded
/// (the base64 marker counts), names over [`MAX_ATTRIBUTE_NAME`] and empty
/// values.
pub fn encode(
    body: &[u8],
    attributes: &BTreeMap<String, String>,
    how: BodyEncoding,
) -> Result<Encoded> {
    let (body, marked) = encode_body(body, how);
    let count = attributes.len() + usize::from(marked);
    if count > MAX_ATTRIBUTES {
        return Err(Error::invalid_argument(format!(
            "SQS and SNS take at most {MAX_ATTRIBUTES} message attributes; this message has {count}{}",
            if marked {
                " (counting the base64encoded marker its body needs)"
            } else {
                ""
            }
        )));
    }
    let mut out = BTreeMap::new();
    for (k, v) in attributes {
        if v.is_empty() {
            return Err(Error::invalid_argument(format!(
                "attribute {k:?} has an empty value; SQS and SNS take none"
            )));
        }
        out.insert(escape_key(k)?, escape_value(v));
    }
    if marked {
        out.insert(BASE64_ATTRIBUTE.to_owned(), "true".to_owned());
    }
    Ok(Encoded {
        attributes: out,
        body,
    })
}

/// Decodes what arrived: unescapes the attributes and, if the marker is
/// among them, decodes the body.
pub fn decode(
    body: String,
    attributes: BTreeMap<String, String>,
) -> (Vec<u8>, BTreeMap<String, String>) {
    let mut marked = false;
    let mut out = BTreeMap::new();
    for (k, v) in attributes {
        if k == BASE64_ATTRIBUTE {
            marked = true;
            continue;
        }
        out.insert(unescape_key(&k), unescape_value(&v));
    }
    (decode_body(body, marked), out)
}

/// The body and attributes an SNS notification envelope wraps, when `body`
/// really is one: JSON with `Type` `Notification`, `MessageId`,
/// `Timestamp` and `TopicArn`, and that topic `expected_topic` when given.
/// Anything else is a raw body (`None`).
pub fn unwrap_notification(
    body: &str,
    expected_topic: Option<&str>,
) -> Option<(String, BTreeMap<String, String>)> {
    if !body.starts_with('{') {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(body).ok()?;
    let field = |k: &str| v.get(k).and_then(|x| x.as_str()).filter(|s| !s.is_empty());
    if v.get("Type")?.as_str()? != "Notification" {
        return None;
    }
    field("MessageId")?;
    field("Timestamp")?;
    let topic = field("TopicArn")?;
    if expected_topic.is_some_and(|t| t != topic) {
        return None;
    }
    let message = v
        .get("Message")
        .and_then(|m| m.as_str())
        .unwrap_or("")
        .to_owned();
    let mut attrs = BTreeMap::new();
    if let Some(map) = v.get("MessageAttributes").and_then(|m| m.as_object()) {
        for (k, a) in map {
            let value = a.get("Value").and_then(|x| x.as_str()).unwrap_or("");
            attrs.insert(k.clone(), value.to_owned());
        }
    }
    Some((message, attrs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_escape_as_the_go_cdk() {
        // Expected forms from the Go CDK's rules (escape.HexEscape with the
        // awssnssqs predicate).
        for (k, want) in [
            ("plain_Key-1", "plain_Key-1"),
            ("a.b", "a.b"),
            (".a", "__0x2e__a"),
            ("a..b", "a.__0x2e__b"),
            ("a/b", "a__0x2f__b"),
            ("with space", "with__0x20__space"),
            ("☺", "__0x263a__"),
            ("__0x2f__", "__0x5f___0x2f__"),
        ] {
            assert_eq!(escape_key(k).unwrap(), want, "{k:?}");
            assert_eq!(unescape_key(want), k, "{want:?}");
        }
    }

    #[test]
    fn keys_aws_would_refuse_are_escaped_beyond_the_go_cdk() {
        for (k, want) in [
            ("a.", "a__0x2e__"),
            ("AWS.x", "__0x41__WS.x"),
            ("amazon.y", "__0x61__mazon.y"),
            ("base64encoded", "__0x62__ase64encoded"),
        ] {
            assert_eq!(escape_key(k).unwrap(), want, "{k:?}");
            assert_eq!(unescape_key(want), k);
        }
        let long = "k".repeat(257);
        assert!(escape_key(&long).is_err());
        assert!(escape_key(&"k".repeat(256)).is_ok());
        // A short key can grow past the limit once escaped.
        assert!(escape_key(&"/".repeat(40)).is_err());
    }

    #[test]
    fn go_unescaping_corner_cases() {
        assert_eq!(unescape_key("__0x__"), "__0x__");
        assert_eq!(unescape_key("__0xzz__"), "__0xzz__");
        assert_eq!(unescape_key("__0x-1__"), "\u{FFFD}");
        assert_eq!(unescape_key("__0xd800__"), "\u{FFFD}");
        assert_eq!(unescape_key("x__0x41__y__0x42_"), "xAy__0x42_");
    }

    #[test]
    fn values_escape_as_go_path_escape() {
        assert_eq!(escape_value("a-b_c.d~e"), "a-b_c.d~e");
        assert_eq!(escape_value("a=b;c:d"), "a=b%3Bc:d");
        assert_eq!(escape_value("x/y?z,w"), "x%2Fy%3Fz%2Cw");
        assert_eq!(escape_value("sp ace"), "sp%20ace");
        assert_eq!(escape_value("値"), "%E5%80%A4");
        assert_eq!(unescape_value("%E5%80%A4"), "値");
        assert_eq!(unescape_value("100%"), "100%", "malformed stays as is");
        assert_eq!(unescape_value("a+b"), "a+b", "path unescaping keeps +");
    }

    #[test]
    fn bodies_sqs_cannot_carry_are_base64_encoded() {
        assert_eq!(
            encode_body(b"hello", BodyEncoding::WhenNeeded),
            ("hello".into(), false)
        );
        assert_eq!(
            encode_body(b"\xff", BodyEncoding::WhenNeeded),
            ("/w==".into(), true)
        );
        assert_eq!(
            encode_body(b"a\0b", BodyEncoding::WhenNeeded),
            ("YQBi".into(), true)
        );
        assert_eq!(
            encode_body(b"hi", BodyEncoding::Always),
            ("aGk=".into(), true)
        );
        assert!(!encode_body(b"\xff", BodyEncoding::Never).1);
        assert_eq!(decode_body("aGk=".into(), true), b"hi");
        assert_eq!(decode_body("not base64!".into(), true), b"not base64!");
    }

    #[test]
    fn the_marker_counts_toward_the_attribute_limit() {
        let ten: BTreeMap<String, String> =
            (0..10).map(|i| (format!("k{i}"), "v".to_owned())).collect();
        assert!(encode(b"text", &ten, BodyEncoding::WhenNeeded).is_ok());
        let e = encode(b"\xff", &ten, BodyEncoding::WhenNeeded).unwrap_err();
        assert!(e.to_string().contains("base64encoded"), "{e}");
        let eleven: BTreeMap<String, String> =
            (0..11).map(|i| (format!("k{i}"), "v".to_owned())).collect();
        assert!(encode(b"text", &eleven, BodyEncoding::WhenNeeded).is_err());
        let empty: BTreeMap<String, String> = [("k".to_owned(), String::new())].into();
        assert!(encode(b"text", &empty, BodyEncoding::WhenNeeded).is_err());
    }

    #[test]
    fn envelopes_are_unwrapped_only_when_they_are_notifications() {
        let n = r#"{"Type":"Notification","MessageId":"m1","TopicArn":"arn:aws:sns:us-east-1:1:t",
            "Timestamp":"2026-01-01T00:00:00Z","Message":"hi",
            "MessageAttributes":{"k":{"Type":"String","Value":"v"}}}"#;
        let (body, attrs) = unwrap_notification(n, None).unwrap();
        assert_eq!(body, "hi");
        assert_eq!(attrs.get("k").map(String::as_str), Some("v"));
        assert!(unwrap_notification(n, Some("arn:aws:sns:us-east-1:1:t")).is_some());
        assert!(unwrap_notification(n, Some("arn:aws:sns:us-east-1:1:other")).is_none());
        for raw in [
            "plain text",
            r#"{"TopicArn":"arn:aws:sns:us-east-1:1:t","Message":"x"}"#,
            r#"{"Type":"SubscriptionConfirmation","MessageId":"m","TopicArn":"a","Timestamp":"t"}"#,
            r#"{"Type":"Notification","MessageId":"","TopicArn":"a","Timestamp":"t"}"#,
            "{not json",
        ] {
            assert!(unwrap_notification(raw, None).is_none(), "{raw}");
        }
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        fn attrs() -> impl Strategy<Value = BTreeMap<String, String>> {
            proptest::collection::btree_map("\\PC{1,40}", "\\PC{0,60}", 0..10)
        }

        proptest! {
            #[test]
            fn encode_then_decode_is_the_identity(
                body in proptest::collection::vec(any::<u8>(), 0..200),
                attributes in attrs(),
                always in any::<bool>(),
            ) {
                let how = if always { BodyEncoding::Always } else { BodyEncoding::WhenNeeded };
                match encode(&body, &attributes, how) {
                    Ok(e) => {
                        for k in e.attributes.keys() {
                            prop_assert!(k.len() <= MAX_ATTRIBUTE_NAME);
                            prop_assert!(!k.starts_with('.') && !k.ends_with('.') && !k.contains(".."));
                            let lower = k.to_ascii_lowercase();
                            prop_assert!(!lower.starts_with("aws.") && !lower.starts_with("amazon."));
                        }
                        prop_assert!(e.body.chars().all(sqs_char));
                        prop_assert!(e.attributes.values().all(|v| v.is_ascii()));
                        let (b, a) = decode(e.body, e.attributes);
                        prop_assert_eq!(b, body);
                        prop_assert_eq!(a, attributes);
                    }
                    Err(_) => {
                        // Only the limits refuse.
                        let marked = encode_body(&body, how).1;
                        prop_assert!(attributes.len() + usize::from(marked) > MAX_ATTRIBUTES
                            || attributes.keys().any(|k| escape_key(k).is_err())
                            || attributes.values().any(String::is_empty));
                    }
                }
            }

            #[test]
            fn escaped_keys_use_only_what_aws_takes(key in "\\PC{1,60}") {
                if let Ok(k) = escape_key(&key) {
                    prop_assert!(k.chars().all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c)));
                    prop_assert_eq!(unescape_key(&k), key);
                }
            }
        }
    }
}
