//! The in-memory API of tests/support behaves like the API server where the operator relies
//! on it: server-side apply removes what an applier stops sending and keeps what others set,
//! the garbage collector follows owner references, deletes honour their preconditions.

mod support;

use k8s_openapi::api::core::v1::ConfigMap;
use kube::{
    Api,
    api::{DeleteParams, Patch, PatchParams, Preconditions},
};
use serde_json::{Value, json};
use support::FakeApi;

const PATH: &str = "/api/v1/namespaces/ns/configmaps/cm";

async fn apply(api: &Api<ConfigMap>, manager: &str, data: Value) -> Value {
    let cm = json!({"apiVersion": "v1", "kind": "ConfigMap",
                    "metadata": {"name": "cm", "namespace": "ns"}, "data": data});
    let applied = api
        .patch(
            "cm",
            &PatchParams::apply(manager).force(),
            &Patch::Apply(&cm),
        )
        .await
        .expect("applied");
    serde_json::to_value(applied).expect("json")["data"].clone()
}

#[tokio::test]
async fn apply_removes_only_the_fields_its_manager_alone_stopped_sending() {
    let fake = FakeApi::default();
    let api: Api<ConfigMap> = Api::namespaced(fake.client(), "ns");
    apply(&api, "op", json!({"a": "1", "b": "2", "shared": "s"})).await;
    apply(&api, "other", json!({"c": "3", "shared": "s"})).await;
    fake.edit(PATH, |cm| cm["data"]["d"] = json!("4"));

    let data = apply(&api, "op", json!({"a": "1"})).await;
    assert_eq!(
        data,
        json!({"a": "1", "c": "3", "d": "4", "shared": "s"}),
        "b was op's alone; shared is also other's; c and d are others'"
    );
    // A field another manager changed is no longer op's: op dropping it keeps it.
    fake.edit(PATH, |cm| cm["data"]["a"] = json!("edited"));
    let data = apply(&api, "op", json!({})).await;
    assert_eq!(data["a"], json!("edited"));
}

#[tokio::test]
async fn deleting_an_owner_deletes_dependents_whose_owners_are_all_gone() {
    let fake = FakeApi::default();
    let cm = |name: &str, owners: Value| {
        fake.create(
            &format!("/api/v1/namespaces/ns/configmaps/{name}"),
            json!({"apiVersion": "v1", "kind": "ConfigMap",
                   "metadata": {"name": name, "namespace": "ns", "ownerReferences": owners}}),
        )["metadata"]["uid"]
            .clone()
    };
    let owner_ref =
        |uid: &Value| json!({"apiVersion": "v1", "kind": "ConfigMap", "name": "x", "uid": uid});
    let a = cm("a", json!([]));
    let b = cm("b", json!([]));
    let child = cm("child", json!([owner_ref(&a)]));
    cm("grandchild", json!([owner_ref(&child)]));
    cm("shared", json!([owner_ref(&a), owner_ref(&b)]));

    fake.delete("/api/v1/namespaces/ns/configmaps/a");
    let left: Vec<String> = fake
        .paths()
        .into_iter()
        .map(|p| p.rsplit('/').next().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(left, ["b", "shared"], "b still owns shared");
}

#[tokio::test]
async fn a_delete_with_another_objects_uid_as_precondition_is_refused() {
    let fake = FakeApi::default();
    let api: Api<ConfigMap> = Api::namespaced(fake.client(), "ns");
    apply(&api, "op", json!({})).await;
    let params = DeleteParams {
        preconditions: Some(Preconditions {
            uid: Some("another".into()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    let err = api.delete("cm", &params).await.expect_err("refused");
    assert!(
        matches!(err, kube::Error::Api(ref s) if s.code == 409),
        "{err}"
    );
    assert!(fake.get(PATH).is_some());
}
