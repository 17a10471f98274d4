//! An in-memory Kubernetes API for the operator's tests: objects kept by path, with
//! resourceVersion, generation and uid; server-side apply with field ownership (fields.rs: a
//! field an applier stops sending goes away), merge patches, the status subresource, Secrets'
//! stringData, delete preconditions, the garbage collector (deleting an owner deletes its
//! dependents), watches, Events, a log of the requests as the authorizer sees them
//! (requests.rs), and injected failures. kube's real `Client` talks to it over a tower
//! service.
#![allow(dead_code)]

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use kube::client::Body;
use serde_json::{Value, json};
use tokio::sync::mpsc;

use requests::ApiRequest;
pub use store::Logged;
#[allow(unused_imports)] // each test binary uses part of the harness
pub use store::base64;
use store::{Req, State, status};

pub mod access;
pub mod fields;
pub mod fleet;
pub mod logs;
pub mod requests;
pub mod running;
mod store;

type RespBody = UnsyncBoxBody<Bytes, std::convert::Infallible>;
type WatchTx = mpsc::UnboundedSender<Result<Frame<Bytes>, std::convert::Infallible>>;

/// Where a path points: `/api/v1` or `/apis/<group>/<version>`, then an optional namespace,
/// the resource, an optional name and subresource.
#[derive(Debug, Clone, PartialEq)]
struct Loc {
    prefix: String,
    ns: Option<String>,
    resource: String,
    name: Option<String>,
    subresource: Option<String>,
}

fn locate(path: &str) -> Option<Loc> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let base = match segs.first() {
        Some(&"api") => 2,
        Some(&"apis") => 3,
        _ => return None,
    };
    let prefix = format!("/{}", segs.get(..base)?.join("/"));
    let rest = &segs[base..];
    let (ns, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
        _ => (None, rest),
    };
    Some(Loc {
        prefix,
        ns,
        resource: rest.first()?.to_string(),
        name: rest.get(1).map(|n| n.to_string()),
        subresource: rest.get(2).map(|n| n.to_string()),
    })
}

fn query_param<'a>(query: &'a str, key: &str) -> Option<&'a str> {
    query
        .split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

/// `a=b,c=d` label selectors (all that the operator uses).
fn labels_match(obj: &Value, selector: Option<&str>) -> bool {
    let Some(sel) = selector.filter(|s| !s.is_empty()) else {
        return true;
    };
    let sel = sel
        .replace("%3D", "=")
        .replace("%2C", ",")
        .replace("%2F", "/");
    sel.split(',').all(|pair| match pair.split_once('=') {
        Some((k, v)) => obj["metadata"]["labels"][k] == json!(v),
        None => true,
    })
}

#[derive(Clone, Default)]
pub struct FakeApi(Arc<Mutex<State>>);

impl FakeApi {
    pub fn client(&self) -> kube::Client {
        let api = self.clone();
        let svc = tower::service_fn(move |req: Request<Body>| {
            let api = api.clone();
            async move { Ok::<_, std::convert::Infallible>(api.answer(req).await) }
        });
        kube::Client::new(svc, "default")
    }

    /// The same API over HTTP on a loopback port, for a `chorus-operator` process; serves
    /// until the runtime ends.
    pub async fn serve_http(&self) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        let addr = listener.local_addr().expect("its address");
        let api = self.clone();
        let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
            let api = api.clone();
            async move {
                let (parts, body) = req.into_parts();
                let bytes = axum::body::to_bytes(body, usize::MAX)
                    .await
                    .unwrap_or_default();
                let resp = api
                    .answer(Request::from_parts(parts, Body::from(bytes)))
                    .await;
                resp.map(axum::body::Body::new)
            }
        });
        tokio::spawn(async move { axum::serve(listener, app).await });
        addr
    }

    /// Answers one request as the API server would.
    async fn answer(&self, req: Request<Body>) -> Response<RespBody> {
        let (parts, body) = req.into_parts();
        let bytes = body.collect_bytes().await.unwrap_or_default();
        let path = parts.uri.path().to_owned();
        let query = parts.uri.query().unwrap_or("").to_owned();
        let watch = parts.method == "GET" && query_param(&query, "watch") == Some("true");
        let loc = locate(&path);
        let list = parts.method == "GET" && loc.as_ref().is_some_and(|l| l.name.is_none());
        let verb = if watch {
            "WATCH"
        } else if list {
            "LIST"
        } else {
            parts.method.as_str()
        };
        let request = ApiRequest::of(parts.method.as_str(), &path, &query);
        let refused = {
            let mut state = self.state();
            *state.verbs.entry(verb.to_owned()).or_default() += 1;
            let resource = loc.map(|l| l.resource).unwrap_or_default();
            if verb == "GET" && !resource.is_empty() {
                *state.verbs.entry(format!("GET {resource}")).or_default() += 1;
            }
            state.requests.extend(request.clone());
            (watch || list) && state.refused.contains(&resource)
        };
        if self.state().unserved(&path) {
            let message = "the server could not find the requested resource";
            json_response(404, &status(404, "NotFound", message))
        } else if refused {
            json_response(403, &status(403, "Forbidden", "list and watch refused"))
        } else if watch {
            self.watch(&path, &query)
        } else if list {
            json_response(200, &self.list(&path, &query))
        } else {
            let content_type = parts
                .headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            let req = Req {
                method: parts.method.as_str(),
                path: &path,
                body: &bytes,
                apply: content_type == "application/apply-patch+yaml",
                manager: query_param(&query, "fieldManager").unwrap_or("unknown"),
            };
            let (code, value) = self.handle(&req);
            // The authorizer also checks `create` when an apply creates the object.
            if let Some(r) = request.filter(|_| req.apply && code == 201) {
                self.state().requests.push(r.with_verb("create"));
            }
            json_response(code, &value)
        }
    }

    fn list(&self, path: &str, query: &str) -> Value {
        let Some(loc) = locate(path) else {
            return json!({});
        };
        let s = self.state();
        let items: Vec<Value> = s
            .objects
            .iter()
            .filter(|(p, obj)| {
                locate(p).is_some_and(|l| {
                    l.prefix == loc.prefix
                        && l.resource == loc.resource
                        && (loc.ns.is_none() || l.ns == loc.ns)
                }) && labels_match(obj, query_param(query, "labelSelector"))
            })
            .map(|(_, o)| o.clone())
            .collect();
        json!({"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": s.rv.to_string()}, "items": items})
    }

    /// A watch from now on (the watcher lists first, then watches from that version).
    fn watch(&self, path: &str, query: &str) -> Response<RespBody> {
        let (tx, rx) = mpsc::unbounded_channel();
        if let Some(loc) = locate(path) {
            let selector = query_param(query, "labelSelector").map(str::to_owned);
            self.state().watchers.push((loc, selector, tx));
        }
        let stream =
            futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|f| (f, rx)) });
        Response::builder()
            .status(200)
            .header("content-type", "application/json")
            .body(StreamBody::new(stream).boxed_unsync())
            .expect("response")
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Refuses every LIST and WATCH of `resource` (403), as RBAC without those verbs would.
    pub fn refuse_list_and_watch(&self, resource: &str) {
        self.state().refused.push(resource.into());
    }

    /// Makes the next `method` request whose path contains `path_part` fail with `code`.
    pub fn fail_next(&self, method: &str, path_part: &str, code: u16) {
        self.state()
            .failures
            .push_back((method.into(), path_part.into(), code));
    }

    pub fn get(&self, path: &str) -> Option<Value> {
        self.state().objects.get(path).cloned()
    }

    /// Serves an API group that is not there by default (`/apis/keda.sh/v1alpha1`,
    /// `/apis/metrics.k8s.io/v1beta1`) with these resources, as installing it would.
    pub fn serve(&self, group_version: &str, resources: &[(&str, &str)]) {
        let list: Vec<Value> = resources
            .iter()
            .map(|(name, kind)| json!({"name": name, "kind": kind, "namespaced": true, "singularName": "", "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]}))
            .collect();
        let version = group_version.trim_start_matches("/apis/");
        self.state().objects.insert(
            group_version.to_owned(),
            json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": version, "resources": list}),
        );
    }

    /// What the test itself writes (as `kubectl` would, field manager `kubectl`).
    fn write(&self, method: &str, path: &str, body: &Value) -> (u16, Value) {
        let bytes = serde_json::to_vec(body).unwrap_or_default();
        self.handle(&Req {
            method,
            path,
            body: &bytes,
            apply: false,
            manager: "kubectl",
        })
    }

    /// Stores an object as a client would create it.
    pub fn create(&self, path: &str, obj: Value) -> Value {
        self.write("POST", collection(path), &obj).1
    }

    /// Replaces an object's status, as the controller that owns it would.
    pub fn set_status(&self, path: &str, status: Value) {
        self.write(
            "PATCH",
            &format!("{path}/status"),
            &json!({"status": status}),
        );
    }

    /// Changes a stored object the way `kubectl edit` would (spec changes bump generation).
    pub fn edit(&self, path: &str, f: impl FnOnce(&mut Value)) {
        let Some(mut obj) = self.get(path) else {
            return;
        };
        f(&mut obj);
        self.write("PUT", path, &obj);
    }

    pub fn delete(&self, path: &str) {
        self.write("DELETE", path, &Value::Null);
    }

    /// The requests made through `client()` so far, as the authorizer sees them.
    pub fn requests(&self) -> Vec<ApiRequest> {
        self.state().requests.clone()
    }

    pub fn log_len(&self) -> usize {
        self.state().log.len()
    }

    /// Requests that change something (everything but GET), from position `since` of the log.
    pub fn writes_since(&self, since: usize) -> Vec<Logged> {
        self.state().log[since..]
            .iter()
            .filter(|l| l.method != "GET")
            .cloned()
            .collect()
    }

    /// Requests made through `client()` so far, by verb (GET, LIST, WATCH, POST, PUT, PATCH,
    /// DELETE); the test's own `create`, `edit`, `set_status` calls are not counted.
    pub fn client_requests(&self) -> BTreeMap<String, u64> {
        self.state().verbs.clone()
    }

    /// Stored objects for which `pred(path, object)` holds (cloning only those).
    pub fn matching(&self, pred: impl Fn(&str, &Value) -> bool) -> Vec<(String, Value)> {
        self.state()
            .objects
            .iter()
            .filter(|(p, o)| pred(p, o))
            .map(|(p, o)| (p.clone(), o.clone()))
            .collect()
    }

    /// How many stored objects `pred(path, object)` holds for.
    pub fn count(&self, pred: impl Fn(&str, &Value) -> bool) -> usize {
        self.state()
            .objects
            .iter()
            .filter(|(p, o)| pred(p, o))
            .count()
    }

    pub fn events(&self) -> Vec<Value> {
        self.state().events.clone()
    }

    pub fn paths(&self) -> Vec<String> {
        self.state().objects.keys().cloned().collect()
    }

    fn handle(&self, req: &Req<'_>) -> (u16, Value) {
        let (code, value, changes) = self.state().apply_request(req);
        for (path, event, obj) in changes {
            self.notify(&path, event, obj);
        }
        (code, value)
    }

    fn notify(&self, path: &str, event: &str, obj: Value) {
        let Some(loc) = locate(path) else { return };
        let line = format!("{}\n", json!({"type": event, "object": obj}));
        self.state().watchers.retain(|(w, selector, tx)| {
            let matches = w.prefix == loc.prefix
                && w.resource == loc.resource
                && (w.ns.is_none() || w.ns == loc.ns)
                && labels_match(&obj, selector.as_deref());
            !matches || tx.send(Ok(Frame::data(Bytes::from(line.clone())))).is_ok()
        });
    }
}

fn json_response(code: u16, value: &Value) -> Response<RespBody> {
    Response::builder()
        .status(code)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(serde_json::to_vec(value).unwrap_or_default())).boxed_unsync())
        .expect("response")
}

fn collection(path: &str) -> &str {
    path.rsplit_once('/').map_or(path, |(c, _)| c)
}

/// Stores the RealtimeApp `ns/name` with `spec`, as `kubectl apply` would.
pub fn add_app(api: &FakeApi, ns: &str, name: &str, spec: Value) {
    api.create(
        &app_path(ns, name),
        json!({"apiVersion": "chorus.rs/v1alpha1", "kind": "RealtimeApp",
               "metadata": {"name": name, "namespace": ns}, "spec": spec}),
    );
}

/// The condition `type_` of a stored RealtimeApp (Null when it has none).
pub fn condition(app: &Value, type_: &str) -> Value {
    app["status"]["conditions"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["type"] == json!(type_)).cloned())
        .unwrap_or(Value::Null)
}

/// Waits for `ok` to hold, looking every 50 ms; fails the test after `limit`.
pub async fn eventually(what: &str, limit: std::time::Duration, mut ok: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while std::time::Instant::now() < deadline {
        if ok() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!("{what}: not within {limit:?}");
}

pub fn secret_path(ns: &str, name: &str) -> String {
    format!("/api/v1/namespaces/{ns}/secrets/{name}")
}
pub fn deployment_path(ns: &str, name: &str) -> String {
    format!("/apis/apps/v1/namespaces/{ns}/deployments/{name}")
}
pub fn statefulset_path(ns: &str, name: &str) -> String {
    format!("/apis/apps/v1/namespaces/{ns}/statefulsets/{name}")
}
pub fn app_path(ns: &str, name: &str) -> String {
    format!("/apis/chorus.rs/v1alpha1/namespaces/{ns}/realtimeapps/{name}")
}
