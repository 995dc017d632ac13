//! Attributes travel as AMQP headers.
//!
//! Sending: every attribute becomes a header whose value is a long string,
//! as the Go CDK's RabbitMQ driver does. Receiving, headers written by any
//! client are read back as strings by this rule:
//! - long and short strings: their bytes as UTF-8 (invalid sequences
//!   replaced by U+FFFD);
//! - booleans: `true` / `false`; integers and floats: their decimal form
//!   (`NaN`, `inf` and `-inf` for the others, JSON strings when nested);
//! - decimals: the value scaled, e.g. `12.34`; timestamps: seconds since
//!   the Unix epoch;
//! - byte arrays: standard base64;
//! - arrays and nested tables: compact JSON, with the same rule inside;
//! - void: the empty string.

use base64::Engine;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use pubsub_core::{Attributes, Error, Result};

/// Builds the header table of an outgoing message.
pub(crate) fn to_headers(attrs: &Attributes, skip: Option<&str>) -> Result<FieldTable> {
    let mut t = FieldTable::default();
    for (k, v) in attrs {
        if Some(k.as_str()) == skip {
            continue;
        }
        let key = ShortString::try_new(k.as_str()).map_err(|_| {
            Error::invalid_argument(format!(
                "attribute key of {} bytes is longer than AMQP's 255-byte limit",
                k.len()
            ))
        })?;
        t.insert(key, AMQPValue::LongString(LongString::from(v.as_bytes())));
    }
    Ok(t)
}

/// Reads the header table of a delivery as string attributes.
pub(crate) fn from_headers(table: Option<&FieldTable>) -> Attributes {
    let mut attrs = Attributes::new();
    if let Some(t) = table {
        for (k, v) in t {
            attrs.insert(k.as_str().to_owned(), render(v));
        }
    }
    attrs
}

fn render(v: &AMQPValue) -> String {
    match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.as_str().to_owned(),
        other => render_json(other, false),
    }
}

fn json_str(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Renders a value; inside arrays and tables strings are JSON-quoted.
fn render_json(v: &AMQPValue, nested: bool) -> String {
    let quote = |s: String| if nested { json_str(&s) } else { s };
    match v {
        AMQPValue::Boolean(b) => b.to_string(),
        AMQPValue::ShortShortInt(n) => n.to_string(),
        AMQPValue::ShortShortUInt(n) => n.to_string(),
        AMQPValue::ShortInt(n) => n.to_string(),
        AMQPValue::ShortUInt(n) => n.to_string(),
        AMQPValue::LongInt(n) => n.to_string(),
        AMQPValue::LongUInt(n) => n.to_string(),
        AMQPValue::LongLongInt(n) => n.to_string(),
        // JSON has no NaN or infinity: inside arrays and tables those are
        // strings.
        AMQPValue::Float(f) if f.is_finite() => f.to_string(),
        AMQPValue::Double(f) if f.is_finite() => f.to_string(),
        AMQPValue::Float(f) => quote(f.to_string()),
        AMQPValue::Double(f) => quote(f.to_string()),
        AMQPValue::DecimalValue(d) => {
            let scale = u32::from(d.scale);
            let value = i64::from(d.value);
            if scale == 0 {
                value.to_string()
            } else {
                let div = 10i64.pow(scale.min(18));
                format!(
                    "{}.{:0width$}",
                    value / div,
                    value % div,
                    width = scale as usize
                )
            }
        }
        AMQPValue::Timestamp(t) => t.to_string(),
        AMQPValue::ShortString(s) => quote(s.as_str().to_owned()),
        AMQPValue::LongString(s) => quote(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ByteArray(b) => {
            quote(base64::engine::general_purpose::STANDARD.encode(b.as_slice()))
        }
        AMQPValue::FieldArray(a) => {
            let items: Vec<String> = a.as_slice().iter().map(|x| render_json(x, true)).collect();
            format!("[{}]", items.join(","))
        }
        AMQPValue::FieldTable(t) => {
            let items: Vec<String> = t
                .into_iter()
                .map(|(k, x)| format!("{}:{}", json_str(k.as_str()), render_json(x, true)))
                .collect();
            format!("{{{}}}", items.join(","))
        }
        AMQPValue::Void => {
            if nested {
                "null".to_owned()
            } else {
                String::new()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lapin::types::{ByteArray, DecimalValue, FieldArray};

    #[test]
    fn attributes_round_trip_through_headers() {
        let mut a = Attributes::new();
        a.insert("k".into(), "v".into());
        a.insert("ünï".into(), "値".into());
        let t = to_headers(&a, None).unwrap();
        assert_eq!(from_headers(Some(&t)), a);
    }

    #[test]
    fn overlong_keys_are_refused() {
        let mut a = Attributes::new();
        a.insert("k".repeat(256), "v".into());
        assert_eq!(
            to_headers(&a, None).unwrap_err().kind(),
            pubsub_core::ErrorKind::InvalidArgument
        );
    }

    #[test]
    fn foreign_header_types_render_as_strings() {
        let mut t = FieldTable::default();
        t.insert("bool".into(), AMQPValue::Boolean(true));
        t.insert("int".into(), AMQPValue::LongInt(-42));
        t.insert("double".into(), AMQPValue::Double(1.5));
        t.insert(
            "decimal".into(),
            AMQPValue::DecimalValue(DecimalValue {
                scale: 2,
                value: 1234,
            }),
        );
        t.insert("ts".into(), AMQPValue::Timestamp(1_700_000_000));
        t.insert(
            "bytes".into(),
            AMQPValue::ByteArray(ByteArray::from(vec![0xff, 0])),
        );
        t.insert(
            "array".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![
                AMQPValue::LongInt(1),
                AMQPValue::LongString("a\"b".into()),
                AMQPValue::Void,
            ])),
        );
        let mut inner = FieldTable::default();
        inner.insert("x".into(), AMQPValue::Boolean(false));
        t.insert("table".into(), AMQPValue::FieldTable(inner));
        t.insert("void".into(), AMQPValue::Void);
        t.insert(
            "bad-utf8".into(),
            AMQPValue::LongString(LongString::from(&b"a\xffb"[..])),
        );
        let a = from_headers(Some(&t));
        assert_eq!(a["bool"], "true");
        assert_eq!(a["int"], "-42");
        assert_eq!(a["double"], "1.5");
        assert_eq!(a["decimal"], "12.34");
        assert_eq!(a["ts"], "1700000000");
        assert_eq!(a["bytes"], "/wA=");
        assert_eq!(a["array"], r#"[1,"a\"b",null]"#);
        assert_eq!(a["table"], r#"{"x":false}"#);
        assert_eq!(a["void"], "");
        assert_eq!(a["bad-utf8"], "a\u{fffd}b");
    }

    #[test]
    fn nested_floats_that_json_cannot_hold_read_as_strings() {
        let mut t = FieldTable::default();
        t.insert(
            "array".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![
                AMQPValue::Double(f64::NAN),
                AMQPValue::Float(f32::INFINITY),
                AMQPValue::Double(f64::NEG_INFINITY),
                AMQPValue::Double(0.5),
            ])),
        );
        t.insert("alone".into(), AMQPValue::Double(f64::NAN));
        let a = from_headers(Some(&t));
        assert_eq!(a["array"], r#"["NaN","inf","-inf",0.5]"#);
        serde_json::from_str::<serde_json::Value>(&a["array"]).expect("JSON");
        assert_eq!(a["alone"], "NaN");
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        fn leaf() -> impl Strategy<Value = AMQPValue> {
            prop_oneof![
                any::<bool>().prop_map(AMQPValue::Boolean),
                any::<i8>().prop_map(AMQPValue::ShortShortInt),
                any::<u8>().prop_map(AMQPValue::ShortShortUInt),
                any::<i16>().prop_map(AMQPValue::ShortInt),
                any::<u16>().prop_map(AMQPValue::ShortUInt),
                any::<i32>().prop_map(AMQPValue::LongInt),
                any::<u32>().prop_map(AMQPValue::LongUInt),
                any::<i64>().prop_map(AMQPValue::LongLongInt),
                any::<f32>().prop_map(AMQPValue::Float),
                any::<f64>().prop_map(AMQPValue::Double),
                (any::<u8>(), any::<u32>()).prop_map(|(scale, value)| AMQPValue::DecimalValue(
                    DecimalValue { scale, value }
                )),
                any::<u64>().prop_map(AMQPValue::Timestamp),
                "\\PC{0,20}".prop_map(|s| AMQPValue::ShortString(s.into())),
                proptest::collection::vec(any::<u8>(), 0..40)
                    .prop_map(|b| AMQPValue::LongString(LongString::from(b))),
                proptest::collection::vec(any::<u8>(), 0..40)
                    .prop_map(|b| AMQPValue::ByteArray(ByteArray::from(b))),
                Just(AMQPValue::Void),
            ]
        }

        fn value() -> impl Strategy<Value = AMQPValue> {
            leaf().prop_recursive(3, 40, 5, |inner| {
                prop_oneof![
                    proptest::collection::vec(inner.clone(), 0..5)
                        .prop_map(|v| AMQPValue::FieldArray(FieldArray::from(v))),
                    proptest::collection::vec(("\\PC{0,8}", inner), 0..5).prop_map(|kv| {
                        let mut t = FieldTable::default();
                        for (k, v) in kv {
                            t.insert(ShortString::from(k), v);
                        }
                        AMQPValue::FieldTable(t)
                    }),
                ]
            })
        }

        proptest! {
            /// Whatever another client puts in the headers reads as
            /// attributes without a panic, and arrays and tables read as
            /// JSON a receiver can parse.
            #[test]
            fn any_foreign_headers_read_as_attributes(
                headers in proptest::collection::vec(("\\PC{0,12}", value()), 0..6)
            ) {
                let mut t = FieldTable::default();
                for (k, v) in &headers {
                    t.insert(ShortString::from(k.clone()), v.clone());
                }
                let attrs = from_headers(Some(&t));
                for (k, v) in &t {
                    let got = &attrs[k.as_str()];
                    if matches!(v, AMQPValue::FieldArray(_) | AMQPValue::FieldTable(_)) {
                        prop_assert!(
                            serde_json::from_str::<serde_json::Value>(got).is_ok(),
                            "not JSON: {}", got
                        );
                    }
                }
            }

            /// A decimal reads as its value scaled.
            #[test]
            fn decimals_read_as_their_scaled_value(scale in 0u8..=40, value: u32) {
                let got = render(&AMQPValue::DecimalValue(DecimalValue { scale, value }));
                let want = f64::from(value) / 10f64.powi(i32::from(scale));
                let read: f64 = got.parse().expect("a decimal number");
                prop_assert!((read - want).abs() <= want.abs() * 1e-12, "{got} for {value}e-{scale}");
            }

            /// Attributes sent come back as they were; a key AMQP cannot
            /// carry is refused with InvalidArgument, never a panic.
            #[test]
            fn attributes_round_trip_or_are_refused(
                attrs in proptest::collection::btree_map("\\PC{0,300}", "\\PC{0,30}", 0..6)
            ) {
                let attrs: Attributes = attrs.into_iter().collect();
                match to_headers(&attrs, None) {
                    Ok(t) => prop_assert_eq!(from_headers(Some(&t)), attrs),
                    Err(e) => {
                        prop_assert_eq!(e.kind(), pubsub_core::ErrorKind::InvalidArgument);
                        prop_assert!(attrs.keys().any(|k| k.len() > 255));
                    }
                }
            }
        }
    }
}
