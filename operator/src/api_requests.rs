//! Counts the operator's requests to the API server by verb and resource
//! (`quantops_api_requests_total`), so that what a model costs in API calls
//! is a measured figure (the benchmark divides it by the models) and a
//! regression that adds a request per reconciliation shows on a dashboard.

use http::{Method, Request, Uri};
use prometheus::IntCounterVec;
use tower::util::MapRequestLayer;

/// The labels of `quantops_api_requests_total`.
pub const LABELS: [&str; 2] = ["verb", "resource"];

/// A client layer that counts every request it passes on.
pub fn counting_layer<B>(
    counter: IntCounterVec,
) -> MapRequestLayer<impl FnMut(Request<B>) -> Request<B> + Clone> {
    MapRequestLayer::new(move |request: Request<B>| {
        let (verb, resource) = classify(request.method(), request.uri());
        counter.with_label_values(&[verb, resource.as_str()]).inc();
        request
    })
}

/// The verb and resource of a request, as the API server's audit log names
/// them: `get`, `list`, `watch`, `create`, `update`, `patch`, `delete` or
/// `deletecollection`, and `jobs`, `pods/log`, `quantizedmodels/status`.
/// Paths that are not resources (discovery, `/version`) count as `other`.
pub fn classify(method: &Method, uri: &Uri) -> (&'static str, String) {
    let segments: Vec<&str> = uri.path().split('/').filter(|s| !s.is_empty()).collect();
    // `/api/v1/...` (the core group) or `/apis/{group}/{version}/...`.
    let rest = match segments.first() {
        Some(&"api") if segments.len() > 2 => &segments[2..],
        Some(&"apis") if segments.len() > 3 => &segments[3..],
        _ => return (verb(method, uri, false), "other".to_string()),
    };
    // `namespaces/{ns}/{resource}...`, unless the resource is a namespace.
    let rest = match rest {
        ["namespaces", _, tail @ ..] if !tail.is_empty() => tail,
        other => other,
    };
    let (resource, named) = match rest {
        [resource] => (resource.to_string(), false),
        [resource, _name] => (resource.to_string(), true),
        [resource, _name, subresource, ..] => (format!("{resource}/{subresource}"), true),
        [] => ("other".to_string(), false),
    };
    (verb(method, uri, named), resource)
}

fn verb(method: &Method, uri: &Uri, named: bool) -> &'static str {
    let watching = uri.query().is_some_and(|query| {
        query
            .split('&')
            .any(|pair| pair == "watch=true" || pair == "watch=1")
    });
    match *method {
        Method::GET if watching => "watch",
        Method::GET if named => "get",
        Method::GET => "list",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE if named => "delete",
        Method::DELETE => "deletecollection",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classified(method: Method, uri: &str) -> (&'static str, String) {
        let uri: Uri = uri.parse().expect("a test URI");
        classify(&method, &uri)
    }

    #[test]
    fn requests_are_named_as_the_audit_log_names_them() {
        let cases = [
            (
                Method::GET,
                "/apis/batch/v1/namespaces/a/jobs/x",
                "get",
                "jobs",
            ),
            (
                Method::GET,
                "/apis/batch/v1/namespaces/a/jobs?labelSelector=l",
                "list",
                "jobs",
            ),
            (
                Method::GET,
                "/apis/batch/v1/jobs?watch=true&resourceVersion=1",
                "watch",
                "jobs",
            ),
            (
                Method::PATCH,
                "/apis/quantops.dev/v1alpha1/namespaces/a/quantizedmodels/m/status?fieldManager=q",
                "patch",
                "quantizedmodels/status",
            ),
            (
                Method::GET,
                "/api/v1/namespaces/a/pods/p/log?tailLines=50",
                "get",
                "pods/log",
            ),
            (
                Method::POST,
                "/apis/events.k8s.io/v1/namespaces/a/events",
                "create",
                "events",
            ),
            (
                Method::PUT,
                "/apis/coordination.k8s.io/v1/namespaces/a/leases/l",
                "update",
                "leases",
            ),
            (
                Method::DELETE,
                "/apis/batch/v1/namespaces/a/jobs/x",
                "delete",
                "jobs",
            ),
            (
                Method::DELETE,
                "/apis/batch/v1/namespaces/a/jobs",
                "deletecollection",
                "jobs",
            ),
            (Method::GET, "/api/v1/namespaces/a", "get", "namespaces"),
            (Method::GET, "/api/v1/namespaces", "list", "namespaces"),
            (Method::GET, "/version", "list", "other"),
            (Method::GET, "/apis", "list", "other"),
        ];
        for (method, uri, verb, resource) in cases {
            assert_eq!(
                classified(method, uri),
                (verb, resource.to_string()),
                "{uri}"
            );
        }
    }
}
