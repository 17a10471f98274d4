//! An in-memory Kubernetes API for reconcile tests: objects kept by path, resourceVersion and
//! generation, server-side apply of whole objects (the operator always applies complete
//! objects with force), the status subresource, Secrets' stringData, Events, a request log,
//! and injected failures. kube's real `Client` talks to it over a tower service.
#![allow(dead_code)]

use std::{
    collections::{BTreeMap, VecDeque},
    sync::{Arc, Mutex},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body::Frame;
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use kube::client::Body;
use serde_json::{Value, json};
use tokio::sync::mpsc;

pub mod fleet;
pub mod logs;

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

#[derive(Debug, Clone)]
pub struct Logged {
    pub method: String,
    pub path: String,
}

#[derive(Default)]
struct State {
    objects: BTreeMap<String, Value>,
    watchers: Vec<(Loc, Option<String>, WatchTx)>,
    deleted: BTreeMap<String, Value>,
    rv: u64,
    log: Vec<Logged>,
    events: Vec<Value>,
    /// (method, path substring, status code): the next matching request fails so.
    failures: VecDeque<(String, String, u16)>,
    /// Resources whose LIST and WATCH requests are refused.
    refused: Vec<String>,
    /// Requests that came through `client()` (not the test's own calls), by verb:
    /// GET, LIST, WATCH, POST, PUT, PATCH, DELETE; and GETs by resource ("GET secrets").
    verbs: BTreeMap<String, u64>,
}

#[derive(Clone, Default)]
pub struct FakeApi(Arc<Mutex<State>>);

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": reason, "code": code, "message": message})
}

impl FakeApi {
    pub fn client(&self) -> kube::Client {
        let api = self.clone();
        let svc = tower::service_fn(move |req: Request<Body>| {
            let api = api.clone();
            async move {
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
                let refused = {
                    let mut state = api.state();
                    *state.verbs.entry(verb.to_owned()).or_default() += 1;
                    let resource = loc.map(|l| l.resource).unwrap_or_default();
                    if verb == "GET" && !resource.is_empty() {
                        *state.verbs.entry(format!("GET {resource}")).or_default() += 1;
                    }
                    (watch || list) && state.refused.contains(&resource)
                };
                let resp = if refused {
                    json_response(403, &status(403, "Forbidden", "list and watch refused"))
                } else if watch {
                    api.watch(&path, &query)
                } else if list {
                    json_response(200, &api.list(&path, &query))
                } else {
                    let (code, value) = api.handle(parts.method.as_str(), &path, &bytes);
                    json_response(code, &value)
                };
                Ok::<_, std::convert::Infallible>(resp)
            }
        });
        kube::Client::new(svc, "default")
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

    /// Stores an object as a client would create it.
    pub fn create(&self, path: &str, obj: Value) -> Value {
        let (_, v) = self.handle(
            "POST",
            collection(path),
            &serde_json::to_vec(&obj).unwrap_or_default(),
        );
        v
    }

    /// Replaces an object's status, as the controller that owns it would.
    pub fn set_status(&self, path: &str, status: Value) {
        let body = serde_json::to_vec(&json!({"status": status})).unwrap_or_default();
        let _ = self.handle("PATCH", &format!("{path}/status"), &body);
    }

    /// Changes a stored object the way `kubectl edit` would (spec changes bump generation).
    pub fn edit(&self, path: &str, f: impl FnOnce(&mut Value)) {
        let updated = {
            let mut s = self.state();
            s.rv += 1;
            let rv = s.rv.to_string();
            s.objects.get_mut(path).map(|obj| {
                let before = obj["spec"].clone();
                f(obj);
                if obj["spec"] != before {
                    let g = obj["metadata"]["generation"].as_i64().unwrap_or(1);
                    obj["metadata"]["generation"] = json!(g + 1);
                }
                obj["metadata"]["resourceVersion"] = json!(rv);
                obj.clone()
            })
        };
        if let Some(obj) = updated {
            self.notify(path, "MODIFIED", obj);
        }
    }

    pub fn delete(&self, path: &str) {
        let _ = self.handle("DELETE", path, b"");
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

    fn handle(&self, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
        let existed = self
            .state()
            .objects
            .contains_key(path.trim_end_matches("/status"));
        let (code, value) = self.apply_request(method, path, body);
        if (200..300).contains(&code) && method != "GET" && !path.contains("/events.k8s.io/") {
            let event = match method {
                "DELETE" => "DELETED",
                _ if existed => "MODIFIED",
                _ => "ADDED",
            };
            let obj_path = if method == "POST" {
                format!(
                    "{path}/{}",
                    value["metadata"]["name"].as_str().unwrap_or_default()
                )
            } else {
                path.trim_end_matches("/status").to_owned()
            };
            let obj = if method == "DELETE" {
                self.last_deleted(&obj_path)
            } else {
                self.get(&obj_path)
            };
            if let Some(obj) = obj {
                self.notify(&obj_path, event, obj);
            }
        }
        (code, value)
    }

    fn last_deleted(&self, path: &str) -> Option<Value> {
        self.state().deleted.get(path).cloned()
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

    fn apply_request(&self, method: &str, path: &str, body: &[u8]) -> (u16, Value) {
        let mut s = self.state();
        s.log.push(Logged {
            method: method.into(),
            path: path.into(),
        });
        if let Some(i) = s
            .failures
            .iter()
            .position(|(m, p, _)| m == method && path.contains(p.as_str()))
        {
            let (_, _, code) = s.failures.remove(i).unwrap_or_default();
            let reason = if code == 409 {
                "Conflict"
            } else {
                "InternalError"
            };
            return (code, status(code, reason, "injected failure"));
        }
        let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        if path.contains("/events.k8s.io/") {
            s.events.push(body.clone());
            return (201, body);
        }
        if let Some(obj_path) = path.strip_suffix("/status") {
            if method != "PATCH" {
                return (
                    405,
                    status(405, "MethodNotAllowed", "status: PATCH only here"),
                );
            }
            s.rv += 1;
            let rv = s.rv.to_string();
            return match s.objects.get_mut(obj_path) {
                Some(obj) => {
                    obj["status"] = body["status"].clone();
                    obj["metadata"]["resourceVersion"] = json!(rv);
                    (200, obj.clone())
                }
                None => (404, status(404, "NotFound", "not found")),
            };
        }
        match method {
            "GET" => match s.objects.get(path) {
                Some(obj) => (200, obj.clone()),
                None => (404, status(404, "NotFound", &format!("{path} not found"))),
            },
            "DELETE" => match s.objects.remove(path) {
                Some(old) => {
                    s.deleted.insert(path.to_owned(), old);
                    (
                        200,
                        json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
                    )
                }
                None => (404, status(404, "NotFound", "not found")),
            },
            "POST" => {
                let name = body["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                let obj_path = format!("{path}/{name}");
                if s.objects.contains_key(&obj_path) {
                    return (409, status(409, "AlreadyExists", "already exists"));
                }
                let obj = s.stored(body, None);
                s.objects.insert(obj_path, obj.clone());
                (201, obj)
            }
            "PATCH" => {
                // Server-side apply, strategic and merge patches are all taken as a JSON
                // merge into the stored object: enough for whole-object applies and the
                // partial patches of the lease manager.
                let existing = s.objects.get(path).cloned();
                let code = if existing.is_some() { 200 } else { 201 };
                let merged = match &existing {
                    Some(old) => {
                        let mut merged = old.clone();
                        merge(&mut merged, &body);
                        merged
                    }
                    None => body,
                };
                let obj = s.stored(merged, existing);
                s.objects.insert(path.to_owned(), obj.clone());
                (code, obj)
            }
            _ => (405, status(405, "MethodNotAllowed", method)),
        }
    }
}

impl State {
    /// What the API server would store for `body`, given the existing object.
    fn stored(&mut self, mut body: Value, existing: Option<Value>) -> Value {
        self.rv += 1;
        let meta = body["metadata"]
            .as_object_mut()
            .map(std::mem::take)
            .unwrap_or_default();
        let mut meta = Value::Object(meta);
        match &existing {
            Some(old) => {
                for k in ["uid", "creationTimestamp"] {
                    meta[k] = old["metadata"][k].clone();
                }
                let g = old["metadata"]["generation"].as_i64().unwrap_or(1);
                let changed = body.get("spec").is_some() && body["spec"] != old["spec"];
                meta["generation"] = json!(if changed { g + 1 } else { g });
                if let Some(st) = old.get("status") {
                    body["status"] = st.clone();
                }
            }
            None => {
                meta["uid"] = json!(format!("uid-{}", self.rv));
                meta["creationTimestamp"] = json!("2026-11-26T00:00:00Z");
                meta["generation"] = json!(1);
            }
        }
        meta["resourceVersion"] = json!(self.rv.to_string());
        body["metadata"] = meta;
        // Secrets: the API server turns stringData into base64 data.
        if body["kind"] == json!("Secret")
            && let Some(sd) = body.as_object_mut().and_then(|o| o.remove("stringData"))
        {
            let data = body["data"].as_object().cloned().unwrap_or_default();
            let mut data = Value::Object(data);
            for (k, v) in sd.as_object().into_iter().flatten() {
                data[k] = json!(base64(v.as_str().unwrap_or_default().as_bytes()));
            }
            body["data"] = data;
        }
        body
    }
}

/// RFC 7386 JSON merge: objects merge key by key, `null` removes, anything else replaces.
fn merge(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(t), Some(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
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

fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(A[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
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
