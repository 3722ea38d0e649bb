//! Which namespaces the controllers watch: a list of namespaces, each with
//! its own watches (so that the operator needs only Roles there, see the
//! chart's `watchNamespaces`), or the whole cluster.

use kube::core::NamespaceResourceScope;
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;
use std::fmt::Debug;

/// The namespaces the QuantizedModel and ModelPromotion controllers serve.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum WatchScope {
    /// Every namespace (needs ClusterRoles).
    #[default]
    Cluster,
    /// Exactly these namespaces: sorted, without duplicates, never empty.
    Namespaces(Vec<String>),
}

/// A namespace name that Kubernetes would not accept.
#[derive(Debug, thiserror::Error)]
#[error(
    "watch namespace {name:?}: expected a namespace name (at most 63 lowercase letters, \
     digits and '-', starting and ending with a letter or digit)"
)]
pub struct InvalidNamespace {
    pub name: String,
}

impl WatchScope {
    /// The scope of the namespaces given (the flags' values): none means
    /// the cluster. Blank entries (a trailing comma) are skipped and
    /// duplicates removed.
    pub fn from_names<I, S>(names: I) -> Result<WatchScope, InvalidNamespace>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let mut list = Vec::new();
        for name in names {
            let name = name.as_ref().trim();
            if name.is_empty() {
                continue;
            }
            if !is_dns_label(name) {
                return Err(InvalidNamespace {
                    name: name.to_string(),
                });
            }
            list.push(name.to_string());
        }
        list.sort();
        list.dedup();
        Ok(if list.is_empty() {
            WatchScope::Cluster
        } else {
            WatchScope::Namespaces(list)
        })
    }

    /// What one controller each is started for: `None` is every namespace.
    pub fn targets(&self) -> Vec<Option<String>> {
        match self {
            WatchScope::Cluster => vec![None],
            WatchScope::Namespaces(names) => names.iter().cloned().map(Some).collect(),
        }
    }
}

impl std::fmt::Display for WatchScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WatchScope::Cluster => f.write_str("all namespaces"),
            WatchScope::Namespaces(names) => f.write_str(&names.join(",")),
        }
    }
}

/// The API of `K` in `namespace`, or in every namespace for `None`.
pub fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = NamespaceResourceScope, DynamicType = ()>
        + Clone
        + DeserializeOwned
        + Debug,
{
    match namespace {
        Some(namespace) => Api::namespaced(client.clone(), namespace),
        None => Api::all(client.clone()),
    }
}

/// RFC 1123 label: what a namespace name must be.
fn is_dns_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    let inner = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-';
    let edge = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    bytes.len() <= 63 && bytes.iter().all(inner) && edge(bytes.first()) && edge(bytes.last())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_a_sorted_set_and_none_means_the_cluster() -> Result<(), InvalidNamespace> {
        assert_eq!(
            WatchScope::from_names(["test", "experiment", "test", " prod ", ""])?,
            WatchScope::Namespaces(vec!["experiment".into(), "prod".into(), "test".into()])
        );
        assert_eq!(
            WatchScope::from_names(Vec::<String>::new())?,
            WatchScope::Cluster
        );
        assert_eq!(WatchScope::from_names([""])?, WatchScope::Cluster);
        assert_eq!(WatchScope::Cluster.targets(), vec![None]);
        assert_eq!(
            WatchScope::from_names(["b", "a"])?.targets(),
            vec![Some("a".to_string()), Some("b".to_string())]
        );
        Ok(())
    }

    #[test]
    fn invalid_names_are_refused_by_name() {
        for bad in ["Prod", "-x", "x-", "a_b", "a.b", &"x".repeat(64)] {
            let error = WatchScope::from_names(["ok", bad]).err();
            assert!(
                error.is_some_and(|e| e.name == bad && e.to_string().contains("namespace name")),
                "{bad} must be refused"
            );
        }
        assert!(WatchScope::from_names([&"x".repeat(63)]).is_ok());
    }
}
