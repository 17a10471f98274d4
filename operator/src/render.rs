//! `chorus-operator render`: every object the operator would apply for a RealtimeApp, as
//! YAML, without a cluster.

use kube::CustomResourceExt;
use serde::Deserialize;

use crate::{
    crd::RealtimeApp,
    resources::{self, BuildError, Inputs, OperatorConfig},
};

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("not a RealtimeApp: {0}")]
    Parse(String),
    #[error("document {index}: expected apiVersion chorus.rs/v1alpha1, kind RealtimeApp")]
    WrongKind { index: usize },
    #[error("{0}")]
    Build(#[from] BuildError),
    #[error("cannot write YAML: {0}")]
    Yaml(String),
}

/// The CRD, as committed under `crds/`.
pub fn crd_yaml() -> Result<String, RenderError> {
    serde_norway::to_string(&RealtimeApp::crd()).map_err(|e| RenderError::Yaml(e.to_string()))
}

/// Renders every RealtimeApp in a (multi-document) YAML text. Generated Secrets carry fresh
/// random values, as they would on creation. Without `metadata.uid` (an object that was never
/// stored) the children carry no ownerReferences, and the namespace defaults to `default`.
pub fn render(input: &str, config: &OperatorConfig) -> Result<String, RenderError> {
    let mut docs = Vec::new();
    for (index, doc) in serde_norway::Deserializer::from_str(input).enumerate() {
        let value =
            serde_json::Value::deserialize(doc).map_err(|e| RenderError::Parse(e.to_string()))?;
        if value.is_null() {
            continue; // an empty document, e.g. a trailing `---`
        }
        let api_version = value.get("apiVersion").and_then(|v| v.as_str());
        let kind = value.get("kind").and_then(|v| v.as_str());
        if api_version != Some("chorus.rs/v1alpha1") || kind != Some("RealtimeApp") {
            return Err(RenderError::WrongKind { index });
        }
        let app: RealtimeApp =
            serde_json::from_value(value).map_err(|e| RenderError::Parse(e.to_string()))?;
        let generated = resources::generated(&app, config)?;
        let children = resources::build(&app, config, &Inputs::default())?;
        let secrets = [generated.redis_password, generated.api_token]
            .into_iter()
            .flatten()
            .map(|s| serde_json::to_value(s).unwrap_or_default());
        for obj in secrets.chain(children.objects()) {
            docs.push(serde_norway::to_string(&obj).map_err(|e| RenderError::Yaml(e.to_string()))?);
        }
    }
    Ok(docs.iter().map(|d| format!("---\n{d}")).collect::<String>())
}
