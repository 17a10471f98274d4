//! The autoscaler objects of the HPA and KEDA engines (the Operator engine needs none: see
//! src/autoscale). Both scale the RealtimeApp itself through its scale subresource, so that
//! `spec.replicas` stays the one source of truth for the Deployment.

use k8s_openapi::api::autoscaling::v2::{
    CrossVersionObjectReference, HPAScalingPolicy, HPAScalingRules, HorizontalPodAutoscaler,
    HorizontalPodAutoscalerBehavior, HorizontalPodAutoscalerSpec, MetricIdentifier, MetricSpec,
    MetricTarget, PodsMetricSource, ResourceMetricSource,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use kube::{
    Resource,
    api::{ApiResource, DynamicObject, GroupVersionKind},
};
use serde_json::json;

use super::{App, env, server::COMPONENT};
use crate::crd::{AutoscalingEngine, AutoscalingSpec, RealtimeApp};

/// The per-pod metric chorus-server exports for its sockets (an HPA reads it through a
/// custom-metrics adapter).
pub const CONNECTIONS_METRIC: &str = "chorus_sockets_connected";

/// KEDA's kinds, which exist only where KEDA is installed.
pub fn scaled_object_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("keda.sh", "v1alpha1", "ScaledObject"),
        "scaledobjects",
    )
}

pub fn trigger_authentication_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("keda.sh", "v1alpha1", "TriggerAuthentication"),
        "triggerauthentications",
    )
}

fn enabled<'a>(a: &App<'a>, engine: AutoscalingEngine) -> Option<&'a AutoscalingSpec> {
    let auto = &a.app.spec.autoscaling;
    (auto.enabled && auto.engine == engine).then_some(auto)
}

fn target(a: &App<'_>) -> CrossVersionObjectReference {
    CrossVersionObjectReference {
        api_version: Some(RealtimeApp::api_version(&()).into_owned()),
        kind: RealtimeApp::kind(&()).into_owned(),
        name: a.name.clone(),
    }
}

/// What `scaleDown` asks of a scale-down, as HPA behavior (KEDA passes the same to its HPA).
fn behavior(auto: &AutoscalingSpec) -> HorizontalPodAutoscalerBehavior {
    HorizontalPodAutoscalerBehavior {
        scale_down: Some(HPAScalingRules {
            stabilization_window_seconds: Some(auto.scale_down.stabilization_window_seconds),
            policies: Some(vec![HPAScalingPolicy {
                type_: "Pods".into(),
                value: auto.scale_down.max_replicas_per_minute,
                period_seconds: 60,
            }]),
            ..HPAScalingRules::default()
        }),
        ..HorizontalPodAutoscalerBehavior::default()
    }
}

/// engine HPA: CPU as a Resource metric, connections as a Pods metric.
pub fn hpa(a: &App<'_>) -> Option<HorizontalPodAutoscaler> {
    let auto = enabled(a, AutoscalingEngine::HPA)?;
    let mut metrics = Vec::new();
    if let Some(cpu) = auto.target_cpu_utilization_percentage.filter(|c| *c > 0) {
        metrics.push(MetricSpec {
            type_: "Resource".into(),
            resource: Some(ResourceMetricSource {
                name: "cpu".into(),
                target: MetricTarget {
                    type_: "Utilization".into(),
                    average_utilization: Some(cpu),
                    ..MetricTarget::default()
                },
            }),
            ..MetricSpec::default()
        });
    }
    if let Some(per_replica) = auto.target_connections_per_replica {
        metrics.push(MetricSpec {
            type_: "Pods".into(),
            pods: Some(PodsMetricSource {
                metric: MetricIdentifier {
                    name: CONNECTIONS_METRIC.into(),
                    selector: None,
                },
                target: MetricTarget {
                    type_: "AverageValue".into(),
                    average_value: Some(Quantity(per_replica.to_string())),
                    ..MetricTarget::default()
                },
            }),
            ..MetricSpec::default()
        });
    }
    Some(HorizontalPodAutoscaler {
        metadata: a.meta(a.name.clone(), COMPONENT),
        spec: Some(HorizontalPodAutoscalerSpec {
            scale_target_ref: target(a),
            min_replicas: Some(auto.min_replicas),
            max_replicas: auto.max_replicas,
            metrics: Some(metrics),
            behavior: Some(behavior(auto)),
        }),
        ..HorizontalPodAutoscaler::default()
    })
}

/// engine KEDA: a ScaledObject (a CPU trigger, and a `metrics-api` trigger on the app's
/// `GET /v1/nodes` for connections) and, for that trigger, the TriggerAuthentication that
/// gives it the API token from its Secret. Empty unless the engine is KEDA.
pub fn keda(a: &App<'_>) -> Vec<DynamicObject> {
    let Some(auto) = enabled(a, AutoscalingEngine::KEDA) else {
        return Vec::new();
    };
    let token = env::api_token_ref(a).filter(|_| auto.target_connections_per_replica.is_some());
    let mut triggers = Vec::new();
    if let Some(cpu) = auto.target_cpu_utilization_percentage.filter(|c| *c > 0) {
        triggers.push(json!({
            "type": "cpu",
            "metricType": "Utilization",
            "metadata": {"value": cpu.to_string()},
        }));
    }
    if let Some(per_replica) = auto
        .target_connections_per_replica
        .filter(|_| token.is_some())
    {
        let svc = &a.app.spec.service;
        triggers.push(json!({
            "type": "metrics-api",
            "metricType": "AverageValue",
            "metadata": {
                "url": format!("http://{}.{}.svc:{}/v1/nodes", a.name, a.namespace, svc.port),
                "valueLocation": "sockets",
                "targetValue": per_replica.to_string(),
                "authMode": "bearer",
            },
            "authenticationRef": {"name": a.name},
        }));
    }
    let target = target(a);
    let scaled = json!({
        "spec": {
            "scaleTargetRef": {
                "apiVersion": target.api_version,
                "kind": target.kind,
                "name": target.name,
            },
            "minReplicaCount": auto.min_replicas,
            "maxReplicaCount": auto.max_replicas,
            "advanced": {"horizontalPodAutoscalerConfig": {"behavior": behavior(auto)}},
            "triggers": triggers,
        }
    });
    let object = |resource: &ApiResource, data: serde_json::Value| {
        let mut obj = DynamicObject::new(&a.name, resource).data(data);
        obj.metadata = a.meta(a.name.clone(), COMPONENT);
        obj
    };
    let mut objects = vec![object(&scaled_object_resource(), scaled)];
    if let Some(token) = token {
        let auth = json!({
            "spec": {
                "secretTargetRef": [{"parameter": "token", "name": token.name, "key": token.key}]
            }
        });
        objects.push(object(&trigger_authentication_resource(), auth));
    }
    objects
}
