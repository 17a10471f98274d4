//! What the Operator engine reads: the app's sockets from its own replicas (`GET /v1/nodes`,
//! with the API token), and their CPU from `metrics.k8s.io` where the cluster serves it.

use std::{collections::BTreeMap, time::Duration};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::{
    client::legacy::{Client as HttpClient, connect::HttpConnector},
    rt::TokioExecutor,
};
use k8s_openapi::api::core::v1::Pod;
use kube::{
    Api, Client,
    api::{ApiResource, DynamicObject, GroupVersionKind, ListParams},
};
use serde::Deserialize;

/// How long one reading of `/v1/nodes` may take (the replica asks the others through Redis,
/// which answers within a second or two).
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest `/v1/nodes` answer read: a few dozen bytes per replica.
const MAX_BODY: usize = 1 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ReadingError {
    #[error("GET http://{address}/v1/nodes: {detail}")]
    Nodes { address: String, detail: String },
}

/// `GET /v1/nodes`: the replicas that answered and their sockets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct Nodes {
    pub sockets: u64,
    #[serde(default)]
    pub nodes: Vec<Node>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Node {
    /// The replica's id: its pod name when it runs in a pod.
    pub id: String,
    pub sockets: u64,
}

/// Reads the app's sockets over HTTP; one pooled client for every app.
#[derive(Clone)]
pub struct NodesReader {
    http: HttpClient<HttpConnector, Empty<Bytes>>,
}

impl Default for NodesReader {
    fn default() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(READ_TIMEOUT));
        Self {
            http: HttpClient::builder(TokioExecutor::new()).build(connector),
        }
    }
}

impl NodesReader {
    /// `GET http://<address>/v1/nodes` with the API token. The error says what failed
    /// without the token.
    pub async fn read(&self, address: &str, token: &str) -> Result<Nodes, ReadingError> {
        let fail = |detail: String| ReadingError::Nodes {
            address: address.to_owned(),
            detail,
        };
        let request = http::Request::get(format!("http://{address}/v1/nodes"))
            .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
            .body(Empty::new())
            .map_err(|_| fail("not a valid address".into()))?;
        let answer = async {
            let response = self
                .http
                .request(request)
                .await
                .map_err(|e| fail(format!("no answer: {e}")))?;
            let status = response.status();
            let body = Limited::new(response.into_body(), MAX_BODY)
                .collect()
                .await
                .map_err(|e| fail(format!("reading the answer: {e}")))?
                .to_bytes();
            if !status.is_success() {
                return Err(fail(format!("answered {status}")));
            }
            serde_json::from_slice::<Nodes>(&body)
                .map_err(|e| fail(format!("not the expected answer: {e}")))
        };
        tokio::time::timeout(READ_TIMEOUT, answer)
            .await
            .map_err(|_| fail(format!("no answer within {}s", READ_TIMEOUT.as_secs())))?
    }
}

/// The server pods' CPU use in percent of their requests: Ok(None) when the cluster serves
/// no `metrics.k8s.io` or the pods request no CPU, with the reason in the string.
pub async fn cpu_percent(
    client: &Client,
    namespace: &str,
    selector: &str,
    pods: &[&Pod],
) -> Result<Result<f64, &'static str>, kube::Error> {
    let resource = ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("metrics.k8s.io", "v1beta1", "PodMetrics"),
        "pods",
    );
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &resource);
    let listed = match api.list(&ListParams::default().labels(selector)).await {
        Ok(l) => l,
        Err(kube::Error::Api(e)) if e.code == 404 => {
            return Ok(Err("the cluster serves no metrics.k8s.io"));
        }
        Err(e) => return Err(e),
    };
    let requests: BTreeMap<&str, f64> = pods
        .iter()
        .filter_map(|p| Some((p.metadata.name.as_deref()?, cpu_requested(p)?)))
        .collect();
    let (mut used, mut requested) = (0.0, 0.0);
    for m in &listed.items {
        let Some(req) = m.metadata.name.as_deref().and_then(|n| requests.get(n)) else {
            continue;
        };
        let usage = m.data["containers"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["usage"]["cpu"].as_str().and_then(cores))
            .sum::<f64>();
        used += usage;
        requested += req;
    }
    if requested <= 0.0 {
        return Ok(Err("no CPU reading for pods with a CPU request"));
    }
    Ok(Ok(100.0 * used / requested))
}

/// The CPU a pod's containers request, in cores; None when one of them requests none.
fn cpu_requested(pod: &Pod) -> Option<f64> {
    let containers = &pod.spec.as_ref()?.containers;
    let mut total = 0.0;
    for c in containers {
        let q = c.resources.as_ref()?.requests.as_ref()?.get("cpu")?;
        total += cores(&q.0)?;
    }
    Some(total)
}

/// A CPU quantity (`250m`, `1`, `0.5`, `123456n`, `12u`) in cores.
pub fn cores(q: &str) -> Option<f64> {
    let q = q.trim();
    let (number, scale) = match q.char_indices().last()? {
        (i, 'n') => (&q[..i], 1e-9),
        (i, 'u') => (&q[..i], 1e-6),
        (i, 'm') => (&q[..i], 1e-3),
        _ => (q, 1.0),
    };
    let value: f64 = number.parse().ok()?;
    (value.is_finite() && value >= 0.0).then_some(value * scale)
}
