//! Istio's sidecar view of the registry: which namespaces may see an entry
//! (`ServiceEntry.spec.exportTo`, the Service annotation `networking.istio.io/exportTo`)
//! and, when several entries define one name, which one a client sees: its own
//! namespace's first, then the oldest (creationTimestamp, then namespace/name). Never
//! a union of them.
use serde::Serialize;

use std::sync::Arc;

use k8s_openapi::jiff::Timestamp;

use super::manifest::{Meta as _, ObjectMeta};

/// The Service annotation that limits who sees it, comma-separated like `exportTo`.
pub const EXPORT_TO_ANNOTATION: &str = "networking.istio.io/exportTo";

/// Who may see an entry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub enum Visibility {
    /// Every namespace (`*`, or nothing said).
    #[default]
    All,
    /// These namespaces only (`.` is the entry's own; `~` is none at all).
    Namespaces(Vec<String>),
}

impl Visibility {
    /// From `exportTo` values of an object in namespace `own`; `default` (the mesh's
    /// `defaultServiceExportTo`, `--default-export-to`) when it says nothing.
    pub fn parse_or<'a>(
        export_to: impl IntoIterator<Item = &'a str>,
        own: &str,
        default: &[String],
    ) -> Self {
        let mut values = export_to.into_iter().peekable();
        if values.peek().is_none() && !default.is_empty() {
            return Visibility::parse(default.iter().map(String::as_str), own);
        }
        Visibility::parse(values, own)
    }

    /// From `exportTo` values of an object in namespace `own`.
    pub fn parse<'a>(export_to: impl IntoIterator<Item = &'a str>, own: &str) -> Self {
        let mut namespaces = Vec::new();
        let mut said = false;
        for value in export_to
            .into_iter()
            .map(str::trim)
            .filter(|v| !v.is_empty())
        {
            said = true;
            match value {
                "*" => return Visibility::All,
                "~" => {}
                "." => namespaces.push(own.to_owned()),
                ns => namespaces.push(ns.to_owned()),
            }
        }
        if said {
            Visibility::Namespaces(namespaces)
        } else {
            Visibility::All
        }
    }

    /// The annotation form: `".,team-b"`; `default` when there is none.
    pub fn from_annotation(meta: &ObjectMeta, default: &[String]) -> Self {
        let values = meta.annotation(EXPORT_TO_ANNOTATION).unwrap_or_default();
        Visibility::parse_or(
            values.split(',').filter(|v| !v.trim().is_empty()),
            meta.ns(),
            default,
        )
    }

    /// Whether a client in `namespace` sees the entry.
    pub fn allows(&self, namespace: &str) -> bool {
        match self {
            Visibility::All => true,
            Visibility::Namespaces(list) => list.iter().any(|n| n == namespace),
        }
    }

    pub fn is_all(&self) -> bool {
        *self == Visibility::All
    }

    /// Every namespace that sees `other` sees this too.
    pub fn covers(&self, other: &Visibility) -> bool {
        match (self, other) {
            (Visibility::All, _) => true,
            (Visibility::Namespaces(_), Visibility::All) => false,
            (Visibility::Namespaces(mine), Visibility::Namespaces(theirs)) => {
                theirs.iter().all(|ns| mine.contains(ns))
            }
        }
    }
}

/// Precedence among entries for one name: older first (objects without a
/// creationTimestamp, e.g. from files, after those with one), then namespace/name.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rank {
    untimed: bool,
    created: Timestamp,
    namespace: Arc<str>,
    name: Box<str>,
}

impl Rank {
    /// The rank of the object `meta` says, in `namespace` (the caller's shared copy of
    /// `meta`'s namespace).
    pub fn of(meta: &ObjectMeta, namespace: Arc<str>) -> Self {
        let created = meta.creation_timestamp.as_ref().map(|t| t.0);
        Rank {
            untimed: created.is_none(),
            created: created.unwrap_or_default(),
            namespace,
            name: meta.name_str().into(),
        }
    }

    /// The object's namespace.
    pub fn namespace(&self) -> &Arc<str> {
        &self.namespace
    }

    /// The object's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covers_is_seen_everywhere_the_other_is() {
        let v = |values: &[&str]| Visibility::parse(values.iter().copied(), "own");
        assert!(v(&["*"]).covers(&v(&["."])));
        assert!(v(&["*"]).covers(&v(&["*"])));
        assert!(!v(&["."]).covers(&v(&["*"])));
        assert!(v(&[".", "b"]).covers(&v(&["b"])));
        assert!(!v(&["b"]).covers(&v(&[".", "b"])));
        assert!(
            v(&["b"]).covers(&v(&["~"])),
            "seen nowhere: covered by anything"
        );
    }

    #[test]
    fn export_to_values() {
        struct Case {
            values: &'static [&'static str],
            sees: &'static [&'static str],
            not: &'static [&'static str],
        }
        let cases = [
            Case {
                values: &[],
                sees: &["a", "b"],
                not: &[],
            },
            Case {
                values: &["*"],
                sees: &["a", "b"],
                not: &[],
            },
            Case {
                values: &["."],
                sees: &["own"],
                not: &["a"],
            },
            Case {
                values: &[".", "team-b"],
                sees: &["own", "team-b"],
                not: &["a"],
            },
            Case {
                values: &["~"],
                sees: &[],
                not: &["own", "a"],
            },
        ];
        for c in cases {
            let v = Visibility::parse(c.values.iter().copied(), "own");
            for ns in c.sees {
                assert!(v.allows(ns), "{:?} hides from {ns}", c.values);
            }
            for ns in c.not {
                assert!(!v.allows(ns), "{:?} shows to {ns}", c.values);
            }
        }
    }

    #[test]
    fn older_entries_first_then_namespace_and_name() {
        let meta = |ns: &str, name: &str, created: Option<&str>| ObjectMeta {
            name: Some(name.into()),
            namespace: Some(ns.into()),
            creation_timestamp: created
                .map(|t| k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(t.parse().unwrap())),
            ..Default::default()
        };
        let rank = |m: ObjectMeta| {
            let ns = Arc::from(m.ns());
            Rank::of(&m, ns)
        };
        let old = rank(meta("z", "z", Some("2024-01-01T00:00:00Z")));
        let new = rank(meta("a", "a", Some("2025-01-01T00:00:00Z")));
        let untimed = rank(meta("a", "a", None));
        assert!(old < new && new < untimed);
        assert!(rank(meta("a", "x", None)) < rank(meta("b", "a", None)));
    }
}
