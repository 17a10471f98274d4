//! The generated CRD: committed copy, shape, structural schema, and its CEL rules evaluated
//! with kube's CEL validator (the API server's own check runs in tests/crd_apiserver.rs).

use chorus_operator::{crd::RealtimeApp, render, resources::OperatorConfig};
use kube::{CustomResourceExt, core::cel::Validator};
use serde_json::{Value, json};

#[path = "common/invalid_specs.rs"]
mod invalid_specs;
use invalid_specs::INVALID;

fn root() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn committed_crd_is_the_generated_one() {
    let committed = std::fs::read_to_string(root().join("crds/realtimeapps.chorus.rs.yaml"))
        .expect("crds/realtimeapps.chorus.rs.yaml");
    let generated = render::crd_yaml().expect("yaml");
    assert!(
        committed == generated,
        "crds/realtimeapps.chorus.rs.yaml is stale: run scripts/generate.sh"
    );
}

#[test]
fn the_charts_crd_template_is_the_generated_one() {
    let committed = std::fs::read_to_string(root().join("charts/chorus/templates/crd.yaml"))
        .expect("charts/chorus/templates/crd.yaml");
    let generated = render::crd_chart_template().expect("template");
    assert!(
        committed == generated,
        "charts/chorus/templates/crd.yaml is stale: run scripts/generate.sh"
    );
    // The same CRD inside: every line of it appears, in order.
    let crd = render::crd_yaml().expect("yaml");
    let mut lines = committed.lines();
    for line in crd.lines() {
        assert!(lines.any(|l| l == line), "missing from the chart: {line}");
    }
}

#[test]
fn crd_names_subresources_and_columns() {
    let crd = serde_json::to_value(RealtimeApp::crd()).expect("json");
    assert_eq!(crd["metadata"]["name"], json!("realtimeapps.chorus.rs"));
    let spec = &crd["spec"];
    assert_eq!(spec["group"], json!("chorus.rs"));
    assert_eq!(spec["scope"], json!("Namespaced"));
    assert_eq!(spec["names"]["kind"], json!("RealtimeApp"));
    assert_eq!(spec["names"]["plural"], json!("realtimeapps"));
    assert_eq!(spec["names"]["shortNames"], json!(["rtapp"]));
    assert_eq!(spec["names"]["categories"], json!(["chorus"]));
    let version = &spec["versions"][0];
    assert_eq!(version["name"], json!("v1alpha1"));
    assert_eq!(version["subresources"]["status"], json!({}));
    assert_eq!(
        version["subresources"]["scale"],
        json!({"specReplicasPath": ".spec.replicas", "statusReplicasPath": ".status.replicas", "labelSelectorPath": ".status.selector"})
    );
    let columns: Vec<&str> = version["additionalPrinterColumns"]
        .as_array()
        .expect("columns")
        .iter()
        .map(|c| c["name"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        columns,
        ["Flavor", "Desired", "Ready", "Redis", "Status", "Age"]
    );
}

/// The API server refuses schemas that are not structural: every node must say its type
/// (or be int-or-string / preserve-unknown-fields), with no `$ref`, `anyOf` without types, etc.
fn assert_structural(path: &str, node: &Value) {
    let obj = node
        .as_object()
        .unwrap_or_else(|| panic!("{path}: schema is not an object: {node}"));
    for banned in [
        "$ref",
        "definitions",
        "$schema",
        "additionalItems",
        "dependencies",
        "patternProperties",
    ] {
        assert!(!obj.contains_key(banned), "{path}: {banned}");
    }
    let typed = obj.contains_key("type")
        || obj.get("x-kubernetes-int-or-string") == Some(&json!(true))
        || obj.get("x-kubernetes-preserve-unknown-fields") == Some(&json!(true));
    assert!(typed, "{path}: no type");
    for key in ["anyOf", "oneOf", "allOf"] {
        for (i, sub) in obj
            .get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .enumerate()
        {
            // Inside these, nodes may not set types of their own (structural rule).
            assert!(
                sub.get("type").is_none() || obj.contains_key("type"),
                "{path}.{key}[{i}]"
            );
        }
    }
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        for (k, v) in props {
            assert_structural(&format!("{path}.{k}"), v);
        }
    }
    if let Some(items) = obj.get("items") {
        assert_structural(&format!("{path}[]"), items);
    }
    if let Some(extra) = obj.get("additionalProperties").filter(|v| v.is_object()) {
        assert_structural(&format!("{path}{{}}"), extra);
    }
}

fn schema() -> Value {
    let crd = serde_json::to_value(RealtimeApp::crd()).expect("json");
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

#[test]
fn schema_is_structural_with_defaults_enums_and_bounds() {
    let s = schema();
    assert_structural("", &s);
    let spec = &s["properties"]["spec"]["properties"];
    assert_eq!(
        spec["flavor"]["enum"],
        json!(["chorus", "sails", "socketio"])
    );
    assert_eq!(spec["flavor"]["default"], json!("chorus"));
    assert_eq!(spec["replicas"]["default"], json!(2));
    assert_eq!(spec["replicas"]["minimum"], json!(0.0));
    assert_eq!(spec["port"]["maximum"], json!(65535.0));
    assert_eq!(
        spec["redis"]["properties"]["mode"]["enum"],
        json!(["Managed", "External"])
    );
    let buses = &spec["redis"]["properties"]["replicas"];
    assert_eq!(
        (&buses["default"], &buses["minimum"], &buses["maximum"]),
        (&json!(1), &json!(1.0), &json!(3.0))
    );
    assert_eq!(
        spec["service"]["properties"]["sessionAffinity"]["default"],
        json!("ClientIP")
    );
    assert_eq!(
        spec["autoscaling"]["properties"]["targetCPUUtilizationPercentage"]["default"],
        json!(70)
    );
    assert_eq!(
        spec["networkPolicy"]["properties"]["enabled"]["default"],
        json!(true)
    );
}

fn object(spec: Value) -> Value {
    json!({"apiVersion": "chorus.rs/v1alpha1", "kind": "RealtimeApp", "metadata": {"name": "x"}, "spec": spec})
}

#[test]
fn cel_rules_refuse_each_broken_spec_with_its_message() {
    let validator = Validator::new();
    let s = schema();
    for (spec, message) in INVALID {
        let obj = object(serde_json::from_str(spec).expect("test json"));
        let errors = validator
            .validate(&s, &obj, None)
            .expect_err(&format!("{spec} must be refused"));
        let messages: Vec<String> = errors.iter().map(|e| e.message.clone()).collect();
        assert!(
            messages.iter().any(|m| m == message),
            "{spec}: {messages:?}"
        );
    }
}

#[test]
fn every_example_passes_the_cel_rules_and_renders() {
    let validator = Validator::new();
    let s = schema();
    let dir = root().join("manifests/examples");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("manifests/examples") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("read");
        let obj: Value = serde_saphyr::from_str(&text).expect("yaml");
        if let Err(e) = validator.validate(&s, &obj, None) {
            panic!("{}: {e}", path.display());
        }
        let out = render::render(&text, &OperatorConfig::default())
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let kinds: Vec<String> = serde_saphyr::from_multiple::<Value>(&out)
            .expect("rendered yaml")
            .iter()
            .map(|v| v["kind"].as_str().unwrap_or("").to_owned())
            .collect();
        assert!(
            kinds.contains(&"Deployment".to_owned()) && kinds.contains(&"Service".to_owned()),
            "{kinds:?}"
        );
        seen += 1;
    }
    assert!(
        seen >= 5,
        "one example per flavor, external Redis and autoscaling"
    );
}
