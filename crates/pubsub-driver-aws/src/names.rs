//! SNS topic ARNs and SQS queue URLs, checked before any I/O.

use pubsub_core::{Error, Result, Url};

fn name_ok(name: &str, max: usize) -> bool {
    let base = name.strip_suffix(".fifo").unwrap_or(name);
    !base.is_empty()
        && name.len() <= max
        && base
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// The topic name of an SNS ARN (`arn:PARTITION:sns:REGION:ACCOUNT:NAME`).
pub(crate) fn sns_topic_name(arn: &str) -> Result<&str> {
    let parts: Vec<&str> = arn.split(':').collect();
    let ok = parts.len() == 6
        && parts[0] == "arn"
        && !parts[1].is_empty()
        && parts[2] == "sns"
        && !parts[3].is_empty()
        && !parts[4].is_empty()
        && name_ok(parts[5], 256);
    if !ok {
        return Err(Error::invalid_argument(format!(
            "{arn:?} is not an SNS topic ARN (arn:aws:sns:REGION:ACCOUNT:NAME, the name 1-256 \
             letters, digits, - and _, with .fifo for a FIFO topic)"
        )));
    }
    Ok(parts[5])
}

/// The region of an SNS ARN.
pub(crate) fn sns_region(arn: &str) -> Option<&str> {
    arn.split(':').nth(3).filter(|r| !r.is_empty())
}

/// The queue name of an SQS queue URL (`https://HOST/ACCOUNT/NAME`).
pub(crate) fn sqs_queue_name(queue_url: &str) -> Result<String> {
    let bad = || {
        Error::invalid_argument(format!(
            "{queue_url:?} is not an SQS queue URL (https://sqs.REGION.amazonaws.com/ACCOUNT/NAME, \
             the name 1-80 letters, digits, - and _, with .fifo for a FIFO queue)"
        ))
    };
    let url = Url::parse(queue_url).map_err(|_| bad())?;
    let segments: Vec<&str> = url.path_segments().ok_or_else(bad)?.collect();
    match segments[..] {
        [account, name] if !account.is_empty() && name_ok(name, 80) => Ok(name.to_owned()),
        _ => Err(bad()),
    }
}

/// The region in an SQS endpoint host (`sqs.REGION.amazonaws.com`, or the
/// legacy `REGION.queue.amazonaws.com`).
pub(crate) fn sqs_region(queue_url: &str) -> Option<String> {
    let url = Url::parse(queue_url).ok()?;
    let host = url.host_str()?;
    let parts: Vec<&str> = host.split('.').collect();
    match parts[..] {
        ["sqs", region, "amazonaws", ..] => Some(region.to_owned()),
        [region, "queue", "amazonaws", ..] => Some(region.to_owned()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arns() {
        assert_eq!(
            sns_topic_name("arn:aws:sns:us-east-1:123456789012:orders").unwrap(),
            "orders"
        );
        assert_eq!(
            sns_topic_name("arn:aws:sns:eu-west-1:1:o.fifo").unwrap(),
            "o.fifo"
        );
        for bad in [
            "orders",
            "arn:aws:sqs:us-east-1:1:q",
            "arn:aws:sns:us-east-1:1:",
            "arn:aws:sns:us-east-1:1:a/b",
            "arn:aws:sns::1:t",
        ] {
            assert!(sns_topic_name(bad).is_err(), "{bad}");
        }
        assert_eq!(sns_region("arn:aws:sns:eu-west-1:1:t"), Some("eu-west-1"));
    }

    #[test]
    fn queue_urls() {
        let u = "https://sqs.us-east-2.amazonaws.com/123456789012/jobs";
        assert_eq!(sqs_queue_name(u).unwrap(), "jobs");
        assert_eq!(sqs_region(u).as_deref(), Some("us-east-2"));
        assert_eq!(
            sqs_region("https://eu-west-1.queue.amazonaws.com/1/q").as_deref(),
            Some("eu-west-1")
        );
        assert_eq!(sqs_region("https://127.0.0.1:5000/1/q"), None);
        assert_eq!(
            sqs_queue_name("https://127.0.0.1:5000/1/q.fifo").unwrap(),
            "q.fifo"
        );
        for bad in [
            "https://host/q",
            "https://host/1/q/extra",
            "https://host/1/bad name",
            "not a url",
        ] {
            assert!(sqs_queue_name(bad).is_err(), "{bad}");
        }
    }
}
