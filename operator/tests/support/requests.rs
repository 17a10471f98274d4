//! The requests a client makes, as the API server's authorizer sees them: verb, API group,
//! resource, subresource, namespace.

use super::{locate, query_param};

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ApiRequest {
    /// get, list, watch, create, update, patch, delete, deletecollection.
    pub verb: String,
    /// "" for the core group.
    pub group: String,
    pub resource: String,
    /// "" when none.
    pub subresource: String,
    /// None for a request across all namespaces (or of a cluster-scoped resource).
    pub namespace: Option<String>,
}

impl ApiRequest {
    /// The request of `method` on `path?query`; None outside the resource API.
    pub fn of(method: &str, path: &str, query: &str) -> Option<Self> {
        let loc = locate(path)?;
        let named = loc.name.is_some();
        let verb = match method {
            "GET" if query_param(query, "watch") == Some("true") => "watch",
            "GET" if named => "get",
            "GET" => "list",
            "POST" => "create",
            "PUT" => "update",
            "PATCH" => "patch",
            "DELETE" if named => "delete",
            "DELETE" => "deletecollection",
            _ => return None,
        };
        let group = match loc.prefix.split('/').nth(2) {
            Some(group) if loc.prefix.starts_with("/apis/") => group.to_owned(),
            _ => String::new(),
        };
        Some(Self {
            verb: verb.into(),
            group,
            resource: loc.resource,
            subresource: loc.subresource.unwrap_or_default(),
            namespace: loc.ns,
        })
    }

    /// The same request with another verb (a server-side apply that creates the object is
    /// also authorized as `create`).
    pub fn with_verb(&self, verb: &str) -> Self {
        Self {
            verb: verb.into(),
            ..self.clone()
        }
    }
}
