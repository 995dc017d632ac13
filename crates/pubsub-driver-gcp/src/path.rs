//! Resource paths: the Go CDK's URL forms, and the names Pub/Sub accepts,
//! checked before any I/O.

use pubsub_core::{Error, Result};

/// Which collection a path names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Collection {
    Topics,
    Subscriptions,
}

impl Collection {
    fn as_str(self) -> &'static str {
        match self {
            Collection::Topics => "topics",
            Collection::Subscriptions => "subscriptions",
        }
    }

    fn singular(self) -> &'static str {
        match self {
            Collection::Topics => "topic",
            Collection::Subscriptions => "subscription",
        }
    }
}

/// The full path (`projects/P/topics/T`) of `name`, which is either that
/// path or the short form `P/T`, as the Go CDK's URLs write them.
pub(crate) fn full_path(name: &str, collection: Collection) -> Result<String> {
    let parts: Vec<&str> = name.split('/').collect();
    let (project, resource) = match parts.as_slice() {
        ["projects", p, c, r] if *c == collection.as_str() => (*p, *r),
        [p, r] if *p != "projects" => (*p, *r),
        _ => {
            return Err(Error::invalid_argument(format!(
                "a Pub/Sub {} is named projects/PROJECT/{}/NAME or PROJECT/NAME, not {name:?}",
                collection.singular(),
                collection.as_str()
            )))
        }
    };
    check_project(project)?;
    check_resource(resource, collection.singular())?;
    Ok(format!(
        "projects/{project}/{}/{resource}",
        collection.as_str()
    ))
}

/// Project ids are lowercase letters, digits and hyphens; a domain-scoped
/// one (`example.com:project`) also has dots and a colon.
fn check_project(project: &str) -> Result<()> {
    let ok = !project.is_empty()
        && project.len() <= 100
        && project
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b':'));
    if ok {
        Ok(())
    } else {
        Err(Error::invalid_argument(format!(
            "{project:?} is not a Google Cloud project id"
        )))
    }
}

/// Pub/Sub's rule for topic and subscription names: 3 to 255 characters,
/// starting with a letter, of letters, digits and `-_.~+%`, and not
/// starting with `goog`.
pub(crate) fn check_resource(name: &str, what: &str) -> Result<()> {
    let problem = if name.len() < 3 || name.len() > 255 {
        Some("must be 3 to 255 characters long")
    } else if !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
        Some("must start with a letter")
    } else if name.to_ascii_lowercase().starts_with("goog") {
        Some("must not start with \"goog\"")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~' | b'+' | b'%'))
    {
        Some("may hold only letters, digits and - _ . ~ + %")
    } else {
        None
    };
    match problem {
        None => Ok(()),
        Some(p) => Err(Error::invalid_argument(format!(
            "Pub/Sub would refuse the {what} name {name:?}: a name {p}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pubsub_core::ErrorKind;

    #[test]
    fn both_url_forms_name_the_same_path() {
        let t = Collection::Topics;
        assert_eq!(
            full_path("projects/p-1/topics/orders", t).unwrap(),
            "projects/p-1/topics/orders"
        );
        assert_eq!(
            full_path("p-1/orders", t).unwrap(),
            "projects/p-1/topics/orders"
        );
        assert_eq!(
            full_path("example.com:p/orders", Collection::Subscriptions).unwrap(),
            "projects/example.com:p/subscriptions/orders"
        );
    }

    #[test]
    fn bad_shapes_and_names_are_invalid_arguments() {
        let t = Collection::Topics;
        for bad in [
            "",
            "p",
            "p/",
            "/t",
            "projects/p/subscriptions/s",
            "projects/p/topics",
            "projects/p/topics/t/extra",
            "p/t/u",
            "P Q/orders",
            "p/ab",
            "p/1abc",
            "p/goog-topic",
            "p/with space",
            "p/a*b",
        ] {
            let e = full_path(bad, t).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{bad:?}: {e}");
        }
        assert!(full_path(&format!("p/a{}", "b".repeat(254)), t).is_ok());
        assert!(full_path(&format!("p/a{}", "b".repeat(255)), t).is_err());
        assert!(full_path("p/a-_.~+%b", t).is_ok());
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            /// Any name gives a full path Pub/Sub accepts, the same again
            /// when given back, or InvalidArgument before any I/O.
            #[test]
            fn any_name_gives_a_valid_path_or_is_refused(
                name in "(projects/)?[a-z0-9.:-]{0,12}(/(topics|subscriptions))?/[a-zA-Z0-9_.~+%-]{0,10}|\\PC{0,30}"
            ) {
                for c in [Collection::Topics, Collection::Subscriptions] {
                    match full_path(&name, c) {
                        Ok(path) => {
                            prop_assert!(path.starts_with("projects/"));
                            prop_assert_eq!(full_path(&path, c).ok(), Some(path.clone()));
                            let resource = path.rsplit('/').next().unwrap_or_default();
                            prop_assert!(check_resource(resource, "name").is_ok());
                        }
                        Err(e) => prop_assert_eq!(e.kind(), ErrorKind::InvalidArgument),
                    }
                }
            }
        }
    }
}
