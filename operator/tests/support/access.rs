//! The access the operator needs from the API server, as RBAC grants it: verb, API group,
//! resource, subresource, and whether the request named a namespace. The committed list
//! (tests/api-access.json) is what the chart's RBAC is checked against
//! (tests/packaging/test_rbac.py); tests/api_access.rs keeps it current, and every test that
//! runs the operator checks that it stayed within it.

use std::{collections::BTreeSet, path::PathBuf};

use serde_json::{Value, json};

use super::{FakeApi, requests::ApiRequest};

/// One kind of request, whatever the object's name and namespace.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Access {
    pub verb: String,
    pub group: String,
    pub resource: String,
    pub subresource: String,
    /// False for a request across all namespaces.
    pub namespaced: bool,
}

impl From<&ApiRequest> for Access {
    fn from(r: &ApiRequest) -> Self {
        Self {
            verb: r.verb.clone(),
            group: r.group.clone(),
            resource: r.resource.clone(),
            subresource: r.subresource.clone(),
            namespaced: r.namespace.is_some(),
        }
    }
}

impl Access {
    fn to_json(&self) -> Value {
        json!({"verb": self.verb, "apiGroup": self.group, "resource": self.resource,
               "subresource": self.subresource, "namespaced": self.namespaced})
    }

    fn from_json(v: &Value) -> Option<Self> {
        let text = |k: &str| v[k].as_str().map(str::to_owned);
        Some(Self {
            verb: text("verb")?,
            group: text("apiGroup")?,
            resource: text("resource")?,
            subresource: text("subresource")?,
            namespaced: v["namespaced"].as_bool()?,
        })
    }
}

/// Where the committed list lives.
pub fn committed_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/api-access.json")
}

/// The committed list.
pub fn committed() -> BTreeSet<Access> {
    let path = committed_path();
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let items: Vec<Value> = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
    items
        .iter()
        .map(|v| {
            Access::from_json(v).unwrap_or_else(|| panic!("{}: bad entry {v}", path.display()))
        })
        .collect()
}

/// The list as the committed file holds it: sorted, one access per line.
pub fn render(accesses: &BTreeSet<Access>) -> String {
    let lines: Vec<String> = accesses
        .iter()
        .map(|a| format!("  {}", a.to_json()))
        .collect();
    format!("[\n{}\n]\n", lines.join(",\n"))
}

/// What `api`'s clients asked for.
pub fn used(api: &FakeApi) -> BTreeSet<Access> {
    api.requests().iter().map(Access::from).collect()
}

/// Fails the test if the operator made a request that the committed list lacks: the chart's
/// RBAC is only checked against that list.
pub fn assert_within_committed(api: &FakeApi) {
    let committed = committed();
    let missing: Vec<Value> = used(api)
        .difference(&committed)
        .map(Access::to_json)
        .collect();
    assert!(
        missing.is_empty(),
        "the operator made requests that tests/api-access.json does not list (extend the \
         scenario of tests/api_access.rs so that it makes them, regenerate the list with \
         CHORUS_REGENERATE=1, and grant them in charts/chorus/templates/rbac.yaml): {missing:#?}"
    );
}
