//! One broken spec per CEL rule of the CRD, with the message the rule must answer.

pub const INVALID: &[(&str, &str)] = &[
    (
        r#"{"flavor": "sails"}"#,
        "spec.image is required when spec.flavor is sails or socketio",
    ),
    (
        r#"{"flavor": "socketio", "image": ""}"#,
        "spec.image is required when spec.flavor is sails or socketio",
    ),
    (
        r#"{"flavor": "sails", "image": "i", "auth": {}}"#,
        "spec.auth applies to flavor chorus only",
    ),
    (
        r#"{"flavor": "socketio", "image": "i", "limits": {"socketRate": 5}}"#,
        "spec.limits applies to flavor chorus only",
    ),
    (
        r#"{"auth": {"anonymous": true, "jwtSecretRef": {"name": "k", "key": "k"}}}"#,
        "spec.auth.jwtSecretRef and spec.auth.anonymous: true exclude each other",
    ),
    (
        r#"{"redis": {"mode": "External"}}"#,
        "spec.redis.external.host is required when spec.redis.mode is External",
    ),
    (
        r#"{"redis": {"mode": "External", "external": {"host": ""}}}"#,
        "spec.redis.external.host is required when spec.redis.mode is External",
    ),
    (
        r#"{"flavor": "sails", "image": "i", "redis": {"replicas": 2}}"#,
        "spec.redis.replicas above 1 needs flavor chorus: the sails and socketio Redis adapters speak to one Redis",
    ),
    (
        r#"{"flavor": "socketio", "image": "i", "redis": {"replicas": 3}}"#,
        "spec.redis.replicas above 1 needs flavor chorus: the sails and socketio Redis adapters speak to one Redis",
    ),
    (
        r#"{"redis": {"mode": "External", "external": {"host": "r"}, "replicas": 2}}"#,
        "spec.redis.replicas above 1 applies to a managed Redis only (spec.redis.mode Managed)",
    ),
    (
        r#"{"autoscaling": {"minReplicas": 5, "maxReplicas": 3}}"#,
        "spec.autoscaling.minReplicas must not exceed spec.autoscaling.maxReplicas",
    ),
    (
        r#"{"flavor": "sails", "image": "i", "autoscaling": {"targetConnectionsPerReplica": 5}}"#,
        "spec.autoscaling.targetConnectionsPerReplica applies to flavor chorus only: only chorus-server reports its connections",
    ),
    (
        r#"{"autoscaling": {"enabled": true, "targetCPUUtilizationPercentage": 0}}"#,
        "spec.autoscaling needs targetConnectionsPerReplica or targetCPUUtilizationPercentage: with neither there is nothing to scale on",
    ),
];
