//! What the in-memory API stores and how each request changes it: objects by path with
//! resourceVersion, generation and uid, field managers (fields.rs), the status subresource,
//! Secrets' stringData, delete preconditions and the garbage collector.

use std::collections::{BTreeMap, VecDeque};

use serde_json::{Value, json};

use super::{Loc, WatchTx, fields::Managers, requests::ApiRequest};

#[derive(Debug, Clone)]
pub struct Logged {
    pub method: String,
    pub path: String,
}

/// A stored object that changed, for the watches: (path, ADDED|MODIFIED|DELETED, object).
pub(super) type Change = (String, &'static str, Value);

/// One write or read of an object, as the handler takes it.
pub(super) struct Req<'a> {
    pub(super) method: &'a str,
    pub(super) path: &'a str,
    pub(super) body: &'a [u8],
    /// A server-side apply (`application/apply-patch+yaml`), not another kind of patch.
    pub(super) apply: bool,
    /// `fieldManager`, or who wrote it when the test writes.
    pub(super) manager: &'a str,
}

#[derive(Default)]
pub(super) struct State {
    pub(super) objects: BTreeMap<String, Value>,
    /// Field managers, by object path.
    pub(super) managers: BTreeMap<String, Managers>,
    pub(super) watchers: Vec<(Loc, Option<String>, WatchTx)>,
    pub(super) rv: u64,
    pub(super) log: Vec<Logged>,
    pub(super) events: Vec<Value>,
    /// (method, path substring, status code): the next matching request fails so.
    pub(super) failures: VecDeque<(String, String, u16)>,
    /// Resources whose LIST and WATCH requests are refused.
    pub(super) refused: Vec<String>,
    /// Requests that came through `client()` (not the test's own calls), by verb:
    /// GET, LIST, WATCH, POST, PUT, PATCH, DELETE; and GETs by resource ("GET secrets").
    pub(super) verbs: BTreeMap<String, u64>,
    /// The same requests, as the authorizer sees them.
    pub(super) requests: Vec<ApiRequest>,
}

/// API groups a cluster serves only when something installs them (metrics-server, KEDA):
/// until a test stores the group's discovery document at its path (`FakeApi::serve`),
/// every request to them is answered 404, as a real API server does.
const OPTIONAL_GROUPS: [&str; 2] = ["/apis/metrics.k8s.io/v1beta1", "/apis/keda.sh/v1alpha1"];

pub(super) fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "reason": reason, "code": code, "message": message})
}

impl State {
    /// Whether `path` is in an optional API group that is not installed.
    pub(super) fn unserved(&self, path: &str) -> bool {
        OPTIONAL_GROUPS
            .iter()
            .any(|g| path.starts_with(g) && !self.objects.contains_key(*g))
    }

    /// Handles one request; returns the answer and what changed, for the watches.
    pub(super) fn apply_request(&mut self, req: &Req<'_>) -> (u16, Value, Vec<Change>) {
        let (method, path) = (req.method, req.path);
        self.log.push(Logged {
            method: method.into(),
            path: path.into(),
        });
        if let Some(i) = self
            .failures
            .iter()
            .position(|(m, p, _)| m == method && path.contains(p.as_str()))
        {
            let (_, _, code) = self.failures.remove(i).unwrap_or_default();
            let reason = if code == 409 {
                "Conflict"
            } else {
                "InternalError"
            };
            return (code, status(code, reason, "injected failure"), vec![]);
        }
        let body: Value = serde_json::from_slice(req.body).unwrap_or(Value::Null);
        if let Some(obj_path) = path.strip_suffix("/scale") {
            return self.scale(method, obj_path, &body, req.manager);
        }
        if path.contains("/events.k8s.io/") {
            self.events.push(body.clone());
            return (201, body, vec![]);
        }
        if let Some(obj_path) = path.strip_suffix("/status") {
            if method != "PATCH" {
                return (
                    405,
                    status(405, "MethodNotAllowed", "status: PATCH only here"),
                    vec![],
                );
            }
            self.rv += 1;
            let rv = self.rv.to_string();
            return match self.objects.get_mut(obj_path) {
                Some(obj) => {
                    obj["status"] = body["status"].clone();
                    obj["metadata"]["resourceVersion"] = json!(rv);
                    let change = (obj_path.to_owned(), "MODIFIED", obj.clone());
                    (200, obj.clone(), vec![change])
                }
                None => (404, status(404, "NotFound", "not found"), vec![]),
            };
        }
        let not_found = || status(404, "NotFound", &format!("{path} not found"));
        match method {
            "GET" => match self.objects.get(path) {
                Some(obj) => (200, obj.clone(), vec![]),
                None => (404, not_found(), vec![]),
            },
            "DELETE" => {
                let Some(obj) = self.objects.get(path) else {
                    return (404, not_found(), vec![]);
                };
                let want = &body["preconditions"]["uid"];
                let uid = &obj["metadata"]["uid"];
                if !want.is_null() && want != uid {
                    let message = format!(
                        "Precondition failed: UID in precondition: {want}, UID in object meta: {uid}"
                    );
                    return (409, status(409, "Conflict", &message), vec![]);
                }
                let mut changes = self.remove(path).into_iter().collect();
                self.collect_garbage(&mut changes);
                let ok = json!({"kind": "Status", "apiVersion": "v1", "status": "Success"});
                (200, ok, changes)
            }
            "POST" => {
                let name = body["metadata"]["name"].as_str().unwrap_or_default();
                let obj_path = format!("{path}/{name}");
                if self.objects.contains_key(&obj_path) {
                    return (409, status(409, "AlreadyExists", "already exists"), vec![]);
                }
                let mut body = body;
                if let Err(refused) = self.immutable_fields(&mut body, None) {
                    return (422, refused, vec![]);
                }
                let obj = self.stored(body, None);
                self.managers
                    .entry(obj_path.clone())
                    .or_default()
                    .update(req.manager, None, &obj);
                self.objects.insert(obj_path.clone(), obj.clone());
                (201, obj.clone(), vec![(obj_path, "ADDED", obj)])
            }
            "PUT" | "PATCH" => {
                let existing = self.objects.get(path).cloned();
                if existing.is_none() && !req.apply {
                    return (404, not_found(), vec![]);
                }
                let managers = self.managers.entry(path.to_owned()).or_default();
                let merged = if req.apply {
                    managers.apply(req.manager, existing.as_ref(), &body)
                } else {
                    let mut merged = existing.clone().unwrap_or_default();
                    if method == "PUT" {
                        merged = body;
                    } else {
                        merge(&mut merged, &body);
                    }
                    managers.update(req.manager, existing.as_ref(), &merged);
                    merged
                };
                let mut merged = merged;
                if let Err(refused) = self.immutable_fields(&mut merged, existing.as_ref()) {
                    return (422, refused, vec![]);
                }
                let (code, event) = if existing.is_some() {
                    (200, "MODIFIED")
                } else {
                    (201, "ADDED")
                };
                let obj = self.stored(merged, existing);
                self.objects.insert(path.to_owned(), obj.clone());
                (code, obj.clone(), vec![(path.to_owned(), event, obj)])
            }
            _ => (405, status(405, "MethodNotAllowed", method), vec![]),
        }
    }

    /// The scale subresource (`spec.replicas`, `status.replicas`, `status.selector`), as the
    /// API server serves it for a custom resource: GET, and merge PATCH of spec.replicas.
    fn scale(
        &mut self,
        method: &str,
        obj_path: &str,
        body: &Value,
        manager: &str,
    ) -> (u16, Value, Vec<Change>) {
        let Some(existing) = self.objects.get(obj_path).cloned() else {
            return (404, status(404, "NotFound", "not found"), vec![]);
        };
        let mut change = vec![];
        let obj = match (method, body["spec"]["replicas"].as_i64()) {
            ("GET", _) => existing,
            ("PATCH", Some(replicas)) => {
                let mut merged = existing.clone();
                merged["spec"]["replicas"] = json!(replicas);
                self.managers
                    .entry(obj_path.to_owned())
                    .or_default()
                    .update(manager, Some(&existing), &merged);
                let obj = self.stored(merged, Some(existing));
                self.objects.insert(obj_path.to_owned(), obj.clone());
                change.push((obj_path.to_owned(), "MODIFIED", obj.clone()));
                obj
            }
            _ => {
                return (
                    422,
                    status(422, "Invalid", "scale: PATCH spec.replicas"),
                    vec![],
                );
            }
        };
        let scale = json!({
            "apiVersion": "autoscaling/v1", "kind": "Scale",
            "metadata": {"name": obj["metadata"]["name"], "namespace": obj["metadata"]["namespace"],
                         "resourceVersion": obj["metadata"]["resourceVersion"]},
            "spec": {"replicas": obj["spec"]["replicas"]},
            "status": {"replicas": obj["status"]["replicas"].as_i64().unwrap_or(0),
                       "selector": obj["status"]["selector"]},
        });
        (200, scale, change)
    }

    /// Removes the object at `path` and its field managers.
    fn remove(&mut self, path: &str) -> Option<Change> {
        self.managers.remove(path);
        let obj = self.objects.remove(path)?;
        Some((path.to_owned(), "DELETED", obj))
    }

    /// The garbage collector, in the background mode: deletes every object whose owners
    /// (ownerReferences, by uid) are all gone, until none is left.
    fn collect_garbage(&mut self, changes: &mut Vec<Change>) {
        loop {
            let uid = |o: &Value| o["uid"].as_str().unwrap_or_default().to_owned();
            let live: std::collections::BTreeSet<String> =
                self.objects.values().map(|o| uid(&o["metadata"])).collect();
            let orphans: Vec<String> = self
                .objects
                .iter()
                .filter(|(_, o)| {
                    let owners = o["metadata"]["ownerReferences"].as_array();
                    owners.is_some_and(|owners| {
                        !owners.is_empty() && owners.iter().all(|r| !live.contains(&uid(r)))
                    })
                })
                .map(|(p, _)| p.clone())
                .collect();
            if orphans.is_empty() {
                return;
            }
            for path in orphans {
                changes.extend(self.remove(&path));
            }
        }
    }

    /// What the API server defaults, and refuses to change in place, in the fields whose
    /// change makes the operator replace a child: a Service's clusterIP (allocated unless
    /// `None`; an update without one keeps the old one) and a StatefulSet's
    /// podManagementPolicy (default OrderedReady).
    fn immutable_fields(&mut self, obj: &mut Value, old: Option<&Value>) -> Result<(), Value> {
        let (field, default) = match obj["kind"].as_str() {
            Some("Service") => (
                "clusterIP",
                old.map(|o| o["spec"]["clusterIP"].clone())
                    .unwrap_or_else(|| json!(format!("10.96.0.{}", self.rv % 250 + 1))),
            ),
            Some("StatefulSet") => ("podManagementPolicy", json!("OrderedReady")),
            _ => return Ok(()),
        };
        let Some(spec) = obj.get_mut("spec").and_then(Value::as_object_mut) else {
            return Ok(());
        };
        let value = spec.entry(field).or_insert(default).clone();
        match old.map(|o| &o["spec"][field]) {
            Some(was) if !was.is_null() && *was != value => {
                let message = format!("spec.{field}: Invalid value: {value}: field is immutable");
                Err(status(422, "Invalid", &message))
            }
            _ => Ok(()),
        }
    }

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
pub(super) fn merge(target: &mut Value, patch: &Value) {
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

/// Standard base64 with padding, as the API server encodes Secret `data`.
pub fn base64(bytes: &[u8]) -> String {
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
