//! The pure desired-state functions: every child, per flavor and option.

use std::collections::BTreeMap;

use chorus_operator::{
    crd::{RealtimeApp, SecretKeyRef},
    resources::{self, BuildError, CHECKSUM_ANNOTATION, Children, Inputs, OperatorConfig},
    secrets,
};
use k8s_openapi::{
    ByteString,
    api::core::v1::{EnvVar, PodSpec, Secret},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

fn app(spec: Value) -> RealtimeApp {
    serde_json::from_value(json!({
        "apiVersion": "chorus.rs/v1alpha1",
        "kind": "RealtimeApp",
        "metadata": {"name": "chat", "namespace": "team", "uid": "0b0e6a4c-1111-2222-3333-444455556666"},
        "spec": spec,
    }))
    .expect("a RealtimeApp")
}

fn config() -> OperatorConfig {
    OperatorConfig {
        server_image: "chorus-server:test".into(),
        redis_image: "redis:test".into(),
    }
}

fn build(spec: Value) -> Children {
    resources::build(&app(spec), &config(), &Inputs::default()).expect("builds")
}

fn env_of(children: &Children) -> Vec<EnvVar> {
    let d = children.deployment.as_ref().expect("deployment");
    let pod = d
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod");
    pod.containers[0].env.clone().unwrap_or_default()
}

fn value<'a>(env: &'a [EnvVar], name: &str) -> Option<&'a str> {
    env.iter()
        .find(|e| e.name == name)
        .and_then(|e| e.value.as_deref())
}

fn secret_ref(env: &[EnvVar], name: &str) -> Option<(String, String)> {
    let e = env.iter().find(|e| e.name == name)?;
    let r = e.value_from.as_ref()?.secret_key_ref.as_ref()?;
    Some((r.name.clone(), r.key.clone()))
}

fn pods(children: &Children) -> Vec<PodSpec> {
    let mut out = vec![];
    if let Some(d) = &children.deployment {
        out.extend(d.spec.as_ref().and_then(|s| s.template.spec.clone()));
    }
    if let Some(r) = &children.redis {
        out.extend(
            r.statefulset
                .spec
                .as_ref()
                .and_then(|s| s.template.spec.clone()),
        );
    }
    out
}

/// The `restricted` Pod Security Standard, as the admission plugin checks it.
fn assert_restricted(pod: &PodSpec) {
    let psc = pod.security_context.as_ref().expect("pod securityContext");
    assert_eq!(
        psc.seccomp_profile.as_ref().map(|s| s.type_.as_str()),
        Some("RuntimeDefault")
    );
    assert_eq!(psc.run_as_non_root, Some(true));
    assert_ne!(psc.run_as_user, Some(0));
    assert!(pod.host_network.is_none() && pod.host_pid.is_none() && pod.host_ipc.is_none());
    for c in &pod.containers {
        let sc = c
            .security_context
            .as_ref()
            .expect("container securityContext");
        assert_eq!(sc.allow_privilege_escalation, Some(false), "{}", c.name);
        assert_eq!(sc.privileged, None);
        let caps = sc.capabilities.as_ref().expect("capabilities");
        assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_owned()][..]));
        assert!(caps.add.is_none());
    }
    for v in pod.volumes.iter().flatten() {
        assert!(v.host_path.is_none());
    }
}

fn all_objects(children: &Children) -> Vec<Value> {
    children.objects()
}

#[test]
fn chorus_default_gets_every_child_with_labels_owner_and_restricted_pods() {
    let spec = json!({});
    let children = build(spec.clone());
    let objects = all_objects(&children);
    let kinds: Vec<&str> = objects
        .iter()
        .map(|o| o["kind"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(
        kinds,
        [
            "StatefulSet",
            "Service",
            "NetworkPolicy",
            "Deployment",
            "Service",
            "PodDisruptionBudget"
        ]
    );
    for o in &objects {
        let labels = &o["metadata"]["labels"];
        assert_eq!(
            labels["app.kubernetes.io/name"],
            json!("chorus-server"),
            "{o}"
        );
        assert_eq!(labels["app.kubernetes.io/instance"], json!("chat"));
        assert_eq!(
            labels["app.kubernetes.io/managed-by"],
            json!("chorus-operator")
        );
        assert!(
            labels["app.kubernetes.io/component"] == json!("server")
                || labels["app.kubernetes.io/component"] == json!("redis")
        );
        assert_eq!(o["metadata"]["namespace"], json!("team"));
        let owner = &o["metadata"]["ownerReferences"][0];
        assert_eq!(owner["kind"], json!("RealtimeApp"));
        assert_eq!(owner["name"], json!("chat"));
        assert_eq!(owner["controller"], json!(true));
    }
    for pod in pods(&children) {
        assert_restricted(&pod);
    }
    let generated = resources::generated(&app(spec), &config()).expect("generated");
    let pw = generated.redis_password.expect("redis password secret");
    assert_eq!(pw.metadata.name.as_deref(), Some("chat-redis"));
    let token = generated.api_token.expect("api token secret");
    assert_eq!(token.metadata.name.as_deref(), Some("chat-api-token"));
    let password = pw
        .string_data
        .as_ref()
        .and_then(|d| d.get("password"))
        .expect("password");
    assert!(password.len() >= 32 && password.chars().all(|c| c.is_ascii_alphanumeric()));
    // Secrets never appear in the pod specs.
    let token_value = token
        .string_data
        .as_ref()
        .and_then(|d| d.get("token"))
        .expect("token");
    let jwt = generated.jwt.expect("JWT secret");
    assert_eq!(jwt.metadata.name.as_deref(), Some("chat-jwt"));
    let jwt_value = jwt
        .string_data
        .as_ref()
        .and_then(|d| d.get("secret"))
        .expect("secret");
    assert!(jwt_value.len() >= 64 && jwt_value.chars().all(|c| c.is_ascii_alphanumeric()));
    let everything = serde_json::to_string(&objects).expect("json");
    for value in [password, token_value, jwt_value] {
        assert!(!everything.contains(value.as_str()));
    }
}

#[test]
fn chorus_env_and_probes() {
    let children = build(json!({}));
    let env = env_of(&children);
    let names: Vec<&str> = env.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "REDIS_HOST",
            "REDIS_PORT",
            "REDIS_DB",
            "REDIS_PASSWORD",
            "REDIS_URL",
            "POD_NAME",
            "POD_NAMESPACE",
            "PORT",
            "API_TOKEN",
            "JWT_SECRET",
            "REDIS_CHANNEL_PREFIX",
            "DRAIN_SECONDS",
            "REBALANCE_AFFINITY_SECONDS"
        ]
    );
    assert_eq!(value(&env, "REDIS_HOST"), Some("chat-redis.team.svc"));
    assert_eq!(
        secret_ref(&env, "REDIS_URL"),
        Some(("chat-redis-url".into(), "url".into()))
    );
    assert_eq!(
        secret_ref(&env, "REDIS_PASSWORD"),
        Some(("chat-redis".into(), "password".into()))
    );
    assert_eq!(
        secret_ref(&env, "API_TOKEN"),
        Some(("chat-api-token".into(), "token".into()))
    );
    // Clients need a JWT unless the app says otherwise.
    assert_eq!(
        secret_ref(&env, "JWT_SECRET"),
        Some(("chat-jwt".into(), "secret".into()))
    );
    assert_eq!(value(&env, "REDIS_CHANNEL_PREFIX"), Some("team.chat"));
    assert_eq!(value(&env, "PORT"), Some("3000"));
    // No list, no limit: the server's defaults.
    for name in [
        "PUBLIC_ROOMS",
        "CORS_ORIGINS",
        "MAX_CONNECTIONS",
        "MAX_ROOMS_PER_SOCKET",
        "SOCKET_RATE",
        "MAX_PAYLOAD",
    ] {
        assert!(env.iter().all(|e| e.name != name), "{name} injected");
    }
    let d = children.deployment.as_ref().expect("deployment");
    let c = &d
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod")
        .containers[0];
    assert_eq!(c.image.as_deref(), Some("chorus-server:test"));
    let path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|h| h.path.clone())
    };
    assert_eq!(path(&c.liveness_probe).as_deref(), Some("/healthz"));
    assert_eq!(path(&c.readiness_probe).as_deref(), Some("/readyz"));
    let downward = env
        .iter()
        .find(|e| e.name == "POD_NAME")
        .and_then(|e| e.value_from.as_ref())
        .and_then(|v| v.field_ref.as_ref());
    assert_eq!(
        downward.map(|f| f.field_path.as_str()),
        Some("metadata.name")
    );
}

#[test]
fn auth_settings_and_limits_reach_the_chorus_environment() {
    let spec = json!({
        "auth": {"publicRooms": ["lobby", "news:*"], "corsOrigins": ["https://a.example", "https://b.example"]},
        "limits": {"maxConnections": 5000, "socketRate": 20, "maxPayload": 65536},
    });
    let env = env_of(&build(spec.clone()));
    assert_eq!(value(&env, "PUBLIC_ROOMS"), Some("lobby,news:*"));
    assert_eq!(
        value(&env, "CORS_ORIGINS"),
        Some("https://a.example,https://b.example")
    );
    assert_eq!(value(&env, "MAX_CONNECTIONS"), Some("5000"));
    assert_eq!(value(&env, "SOCKET_RATE"), Some("20"));
    assert_eq!(value(&env, "MAX_PAYLOAD"), Some("65536"));
    assert!(
        env.iter().all(|e| e.name != "MAX_ROOMS_PER_SOCKET"),
        "an omitted limit is the server's default"
    );
    assert_eq!(
        secret_ref(&env, "JWT_SECRET"),
        Some(("chat-jwt".into(), "secret".into())),
        "public rooms do not turn JWTs off"
    );

    // Anonymous: no JWT_SECRET, and no JWT Secret generated.
    let spec = json!({"auth": {"anonymous": true}});
    let env = env_of(&build(spec.clone()));
    assert!(env.iter().all(|e| e.name != "JWT_SECRET"));
    assert!(
        secret_ref(&env, "API_TOKEN").is_some(),
        "the API keeps its token"
    );
    let generated = resources::generated(&app(spec), &config()).expect("generated");
    assert!(generated.jwt.is_none() && generated.api_token.is_some());

    // A referenced key: used as it is, nothing generated.
    let spec = json!({"auth": {"jwtSecretRef": {"name": "keys", "key": "hs256"}}});
    let env = env_of(&build(spec.clone()));
    assert_eq!(
        secret_ref(&env, "JWT_SECRET"),
        Some(("keys".into(), "hs256".into()))
    );
    let generated = resources::generated(&app(spec), &config()).expect("generated");
    assert!(generated.jwt.is_none());
}

#[test]
fn chorus_servers_behind_client_ip_affinity_are_told_its_window() {
    let env = env_of(&build(json!({})));
    assert_eq!(value(&env, "REBALANCE_AFFINITY_SECONDS"), Some("60"));
    let env = env_of(&build(json!({"service": {"sessionAffinity": "None"}})));
    assert_eq!(value(&env, "REBALANCE_AFFINITY_SECONDS"), None);
}

#[test]
fn history_reaches_the_chorus_environment_with_its_defaults() {
    let env = env_of(&build(json!({"history": {"size": 500}})));
    assert_eq!(value(&env, "HISTORY_SIZE"), Some("500"));
    assert_eq!(value(&env, "HISTORY_TTL_SECONDS"), Some("300"));
    let env = env_of(&build(json!({"history": {"size": 0, "ttlSeconds": 60}})));
    assert_eq!(value(&env, "HISTORY_SIZE"), Some("0"), "0 turns it off");
    assert_eq!(value(&env, "HISTORY_TTL_SECONDS"), Some("60"));
    let env = env_of(&build(json!({})));
    assert!(
        env.iter().all(|e| !e.name.starts_with("HISTORY_")),
        "omitted: the server's defaults"
    );
}

#[test]
fn sails_gets_the_sails_sockets_settings() {
    let children = build(json!({"flavor": "sails", "image": "acme/sails:1"}));
    let env = env_of(&children);
    assert_eq!(
        value(&env, "sails_sockets__adapter"),
        Some("@sailshq/socket.io-redis")
    );
    assert_eq!(
        value(&env, "sails_sockets__host"),
        Some("chat-redis.team.svc")
    );
    assert_eq!(value(&env, "sails_sockets__port"), Some("6379"));
    assert_eq!(value(&env, "sails_sockets__db"), Some("0"));
    assert_eq!(
        secret_ref(&env, "sails_sockets__pass"),
        Some(("chat-redis".into(), "password".into()))
    );
    assert_eq!(value(&env, "sails_sockets__key"), Some("team.chat"));
    assert_eq!(value(&env, "sails_port"), Some("1337"));
    assert_eq!(value(&env, "PORT"), Some("1337"));
    assert_eq!(
        secret_ref(&env, "REDIS_URL"),
        Some(("chat-redis-url".into(), "url".into()))
    );
    assert!(
        secret_ref(&env, "API_TOKEN").is_none()
            && secret_ref(&env, "JWT_SECRET").is_none()
            && value(&env, "REDIS_CHANNEL_PREFIX").is_none()
    );
    let objects = all_objects(&children);
    assert!(
        objects
            .iter()
            .all(|o| o["metadata"]["labels"]["app.kubernetes.io/name"] == json!("sails"))
    );
    let generated = resources::generated(&app(json!({"flavor": "sails", "image": "x"})), &config())
        .expect("ok");
    assert!(
        generated.api_token.is_none() && generated.jwt.is_none(),
        "no API token or JWT key for sails"
    );
}

#[test]
fn socketio_gets_the_common_variables_only() {
    let children = build(json!({"flavor": "socketio", "image": "acme/io:1", "port": 8080}));
    let env = env_of(&children);
    let names: Vec<&str> = env.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "REDIS_HOST",
            "REDIS_PORT",
            "REDIS_DB",
            "REDIS_PASSWORD",
            "REDIS_URL",
            "POD_NAME",
            "POD_NAMESPACE",
            "PORT"
        ]
    );
    assert_eq!(value(&env, "PORT"), Some("8080"));
    let d = children.deployment.as_ref().expect("deployment");
    let c = &d
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .expect("pod")
        .containers[0];
    assert_eq!(c.ports.as_ref().map(|p| p[0].container_port), Some(8080));
}

#[test]
fn images_are_required_for_sails_and_socketio() {
    for flavor in ["sails", "socketio"] {
        let err = resources::build(
            &app(json!({"flavor": flavor})),
            &config(),
            &Inputs::default(),
        )
        .err();
        assert!(matches!(err, Some(BuildError::MissingImage(f)) if f == flavor));
    }
}

#[test]
fn external_redis_with_tls_password_and_jwt() {
    let spec = json!({
        "redis": {"mode": "External", "external": {"host": "redis.shared.svc", "port": 6380, "db": 2, "tls": true,
            "passwordSecretRef": {"name": "shared-redis", "key": "pw"}}},
        "auth": {"apiTokenSecretRef": {"name": "mine", "key": "t"}, "jwtSecretRef": {"name": "jwt", "key": "k"}},
    });
    let children = build(spec.clone());
    assert!(children.redis.is_none(), "no managed Redis objects");
    let env = env_of(&children);
    assert_eq!(
        secret_ref(&env, "REDIS_URL"),
        Some(("chat-redis-url".into(), "url".into()))
    );
    let url = redis_url(&spec, Some(b"pw"));
    assert_eq!(url, "rediss://:pw@redis.shared.svc:6380/2");
    assert_eq!(
        secret_ref(&env, "REDIS_PASSWORD"),
        Some(("shared-redis".into(), "pw".into()))
    );
    assert_eq!(
        secret_ref(&env, "API_TOKEN"),
        Some(("mine".into(), "t".into()))
    );
    assert_eq!(
        secret_ref(&env, "JWT_SECRET"),
        Some(("jwt".into(), "k".into()))
    );
    let generated = resources::generated(&app(spec), &config()).expect("ok");
    assert!(
        generated.redis_password.is_none()
            && generated.api_token.is_none()
            && generated.jwt.is_none()
    );

    let spec = json!({"redis": {"mode": "External", "external": {"host": "r"}}});
    let env = env_of(&build(spec.clone()));
    assert_eq!(redis_url(&spec, None), "redis://r:6379/0");
    assert!(env.iter().all(|e| e.name != "REDIS_PASSWORD"));
}

/// The URL of the `<name>-redis-url` Secret for `spec` and this password.
fn redis_url(spec: &Value, password: Option<&[u8]>) -> String {
    let secret = resources::redis_url_secret(&app(spec.clone()), &config(), password)
        .expect("REDIS_URL Secret");
    assert_eq!(secret.metadata.name.as_deref(), Some("chat-redis-url"));
    assert!(secret.string_data.is_none(), "data only: what SSA tracks");
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get("url"))
        .expect("key url")
        .0
        .clone();
    String::from_utf8(bytes).expect("a URL is text")
}

#[test]
fn a_redis_password_with_url_characters_round_trips_through_the_url() {
    let spec = json!({"redis": {"mode": "External", "external": {"host": "redis.shared.svc", "port": 6380, "db": 2}}});
    for password in [
        "p@ss/w#rd:1%2?x",
        "@",
        "/",
        "#",
        ":",
        "%",
        "?",
        "%40",
        "a b+c&d=e",
        "ünïcödé",
        "-._~AZaz09",
    ] {
        let url = redis_url(&spec, Some(password.as_bytes()));
        // As a client parses it: the password ends where it should, host, port and db intact.
        let parsed = url::Url::parse(&url).unwrap_or_else(|e| panic!("{url}: {e}"));
        assert_eq!(parsed.scheme(), "redis");
        assert_eq!(parsed.username(), "");
        assert_eq!(parsed.host_str(), Some("redis.shared.svc"), "{url}");
        assert_eq!(parsed.port(), Some(6380), "{url}");
        assert_eq!(parsed.path(), "/2", "{url}");
        assert!(
            parsed.query().is_none() && parsed.fragment().is_none(),
            "{url}"
        );
        let encoded = parsed.password().expect("a password");
        let decoded = percent_encoding::percent_decode_str(encoded)
            .decode_utf8()
            .expect("utf-8");
        assert_eq!(decoded, password, "{url}");
    }
    // Unreserved characters stay as they are; the rest is encoded.
    assert_eq!(
        redis_url(&spec, Some(b"a-b.c_d~e@f")),
        "redis://:a-b.c_d~e%40f@redis.shared.svc:6380/2"
    );
}

#[test]
fn user_env_comes_last_and_wins() {
    let children = build(json!({"env": [
        {"name": "REDIS_CHANNEL_PREFIX", "value": "custom"},
        {"name": "EXTRA", "value": "1"},
    ]}));
    let env = env_of(&children);
    assert_eq!(
        env.iter()
            .filter(|e| e.name == "REDIS_CHANNEL_PREFIX")
            .count(),
        1
    );
    let tail: Vec<(&str, Option<&str>)> = env[env.len() - 2..]
        .iter()
        .map(|e| (e.name.as_str(), e.value.as_deref()))
        .collect();
    assert_eq!(
        tail,
        [
            ("REDIS_CHANNEL_PREFIX", Some("custom")),
            ("EXTRA", Some("1"))
        ]
    );
}

#[test]
fn scaling_objects_follow_the_spec() {
    let auto = build(
        json!({"autoscaling": {"enabled": true, "engine": "HPA", "minReplicas": 3, "maxReplicas": 9, "targetCPUUtilizationPercentage": 55}}),
    );
    let hpa = serde_json::to_value(auto.hpa.as_ref().expect("hpa")).expect("json");
    assert_eq!(hpa["apiVersion"], json!("autoscaling/v2"));
    assert_eq!(
        hpa["spec"]["scaleTargetRef"],
        json!({"apiVersion": "chorus.rs/v1alpha1", "kind": "RealtimeApp", "name": "chat"})
    );
    assert_eq!(hpa["spec"]["minReplicas"], json!(3));
    assert_eq!(hpa["spec"]["maxReplicas"], json!(9));
    assert_eq!(
        hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"],
        json!(55)
    );

    assert!(build(json!({})).hpa.is_none());
    // The Operator engine (the default) needs no object; KEDA gets its own.
    let operator = build(json!({"autoscaling": {"enabled": true}}));
    assert!(operator.hpa.is_none() && operator.keda.is_empty());
    let keda = build(
        json!({"autoscaling": {"enabled": true, "engine": "KEDA", "targetConnectionsPerReplica": 500}}),
    );
    let kinds: Vec<String> = keda
        .keda
        .iter()
        .filter_map(|o| o.types.as_ref().map(|t| t.kind.clone()))
        .collect();
    assert_eq!(kinds, ["ScaledObject", "TriggerAuthentication"]);
    assert!(keda.hpa.is_none());
    for (replicas, pdb) in [(0, false), (1, false), (2, true), (5, true)] {
        let c = build(json!({"replicas": replicas, "disruptionBudget": {"maxUnavailable": 2}}));
        assert_eq!(c.pdb.is_some(), pdb, "replicas {replicas}");
        let d = c
            .deployment
            .as_ref()
            .and_then(|d| d.spec.as_ref())
            .expect("spec");
        assert_eq!(d.replicas, Some(replicas));
        if let Some(p) = c.pdb {
            let p = serde_json::to_value(p).expect("json");
            assert_eq!(p["spec"]["maxUnavailable"], json!(2));
            assert_eq!(
                p["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"],
                json!("server")
            );
        }
    }
}

#[test]
fn network_policy_and_service_options() {
    let off = build(json!({"networkPolicy": {"enabled": false}}));
    assert!(
        off.redis
            .as_ref()
            .is_some_and(|r| r.network_policy.is_none())
    );
    let on = build(json!({}));
    let np = serde_json::to_value(
        on.redis
            .as_ref()
            .and_then(|r| r.network_policy.as_ref())
            .expect("np"),
    )
    .expect("json");
    assert_eq!(
        np["spec"]["podSelector"]["matchLabels"]["app.kubernetes.io/component"],
        json!("redis")
    );
    assert_eq!(
        np["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"],
        json!({"app.kubernetes.io/component": "server", "app.kubernetes.io/instance": "chat"})
    );
    assert_eq!(np["spec"]["ingress"][0]["ports"][0]["port"], json!(6379));

    let svc = serde_json::to_value(on.service.as_ref().expect("svc")).expect("json");
    assert_eq!(svc["spec"]["sessionAffinity"], json!("ClientIP"));
    assert_eq!(
        svc["spec"]["sessionAffinityConfig"],
        json!({"clientIP": {"timeoutSeconds": 60}}),
        "a short window, so that clients shed by rebalancing land elsewhere"
    );
    assert_eq!(svc["spec"]["type"], json!("ClusterIP"));
    assert_eq!(svc["spec"]["ports"][0]["port"], json!(80));
    let lb = build(
        json!({"service": {"type": "LoadBalancer", "port": 443, "sessionAffinity": "None", "annotations": {"a": "b"}}}),
    );
    let svc = serde_json::to_value(lb.service.as_ref().expect("svc")).expect("json");
    assert_eq!(svc["spec"]["type"], json!("LoadBalancer"));
    assert_eq!(svc["spec"]["sessionAffinity"], json!("None"));
    assert_eq!(svc["spec"].get("sessionAffinityConfig"), None);
    assert_eq!(svc["spec"]["ports"][0]["port"], json!(443));
    assert_eq!(svc["metadata"]["annotations"], json!({"a": "b"}));

    let sts = serde_json::to_value(&on.redis.as_ref().expect("redis").statefulset).expect("json");
    assert_eq!(sts["spec"]["replicas"], json!(1));
    let redis = &sts["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(redis["image"], json!("redis:test"));
    assert_eq!(
        redis["args"],
        json!([
            "--requirepass",
            "$(REDIS_PASSWORD)",
            "--save",
            "",
            "--appendonly",
            "no",
            "--maxmemory",
            "214748320",
            "--maxmemory-policy",
            "noeviction"
        ])
    );
}

/// The Redis container of a managed Redis: (resources, args).
fn redis_container(spec: Value) -> (Value, Vec<String>) {
    let c = build(spec);
    let sts = serde_json::to_value(&c.redis.expect("managed redis").statefulset).expect("json");
    let container = &sts["spec"]["template"]["spec"]["containers"][0];
    let args = serde_json::from_value(container["args"].clone()).expect("args");
    (container["resources"].clone(), args)
}

fn maxmemory_of(args: &[String]) -> Option<u64> {
    let i = args.iter().position(|a| a == "--maxmemory")?;
    args.get(i + 1)?.parse().ok()
}

#[test]
fn managed_redis_has_a_memory_limit_and_maxmemory_under_it() {
    let (resources, args) = redis_container(json!({}));
    assert_eq!(
        resources,
        json!({"requests": {"cpu": "50m", "memory": "64Mi"}, "limits": {"memory": "256Mi"}})
    );
    let max = maxmemory_of(&args).expect("--maxmemory");
    assert!(
        (200 * 1024 * 1024..256 * 1024 * 1024).contains(&max),
        "{max}: about 80 % of 256Mi"
    );
    let policy = args.iter().position(|a| a == "--maxmemory-policy");
    assert_eq!(
        policy.and_then(|i| args.get(i + 1)).map(String::as_str),
        Some("noeviction")
    );

    // Given resources replace the defaults; maxmemory follows their memory limit.
    for (limit, bytes) in [
        ("1Gi", 1u64 << 30),
        ("512M", 512_000_000),
        ("1.5Gi", 3 << 29),
        ("2e9", 2_000_000_000),
        ("1073741824", 1 << 30),
    ] {
        let given = json!({"requests": {"memory": "100Mi"}, "limits": {"memory": limit}});
        let (resources, args) = redis_container(json!({"redis": {"resources": given.clone()}}));
        assert_eq!(resources, given);
        let max = maxmemory_of(&args).expect("--maxmemory");
        assert_eq!(max, bytes / 100 * 80, "{limit}");
    }
    // Without a memory limit there is nothing to stay under: no maxmemory.
    let (_, args) =
        redis_container(json!({"redis": {"resources": {"requests": {"memory": "1Gi"}}}}));
    assert!(
        !args.iter().any(|a| a.starts_with("--maxmemory")),
        "{args:?}"
    );

    // What the API server would refuse, render refuses with the field's name.
    let err = resources::build(
        &app(json!({"redis": {"resources": {"limits": {"memory": "lots"}}}})),
        &config(),
        &Inputs::default(),
    )
    .err()
    .map(|e| e.to_string());
    assert_eq!(
        err.as_deref(),
        Some("spec.redis.resources.limits.memory: not a quantity: \"lots\"")
    );
}

fn deployment_spec(spec: Value) -> Value {
    let c = build(spec);
    serde_json::to_value(c.deployment.expect("deployment")).expect("json")["spec"].clone()
}

#[test]
fn server_pods_roll_one_extra_at_a_time_and_outlive_their_drain() {
    let d = deployment_spec(json!({}));
    assert_eq!(
        d["strategy"],
        json!({"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}})
    );
    // chorus-server may hold 100,000 sockets by default: closing them at 1,000 a second in
    // the last four fifths of the drain takes 125 s; then up to 5 s to close the rest.
    let drain = |d: &Value| {
        d["template"]["spec"]["containers"][0]["env"]
            .as_array()
            .and_then(|env| env.iter().find(|e| e["name"] == json!("DRAIN_SECONDS")))
            .map(|e| e["value"].clone())
    };
    assert_eq!(drain(&d), Some(json!("125")));
    assert_eq!(
        d["template"]["spec"]["terminationGracePeriodSeconds"],
        json!(140)
    );
    // The drain follows limits.maxConnections, never under 5 s.
    let small = deployment_spec(json!({"limits": {"maxConnections": 2000}}));
    assert_eq!(drain(&small), Some(json!("5")));
    assert_eq!(
        small["template"]["spec"]["terminationGracePeriodSeconds"],
        json!(20)
    );
    let big = deployment_spec(json!({"limits": {"maxConnections": 50001}}));
    assert_eq!(drain(&big), Some(json!("63")), "ceil(50001 / 800)");
    let longer = deployment_spec(json!({"env": [{"name": "DRAIN_SECONDS", "value": "30"}]}));
    assert_eq!(
        longer["template"]["spec"]["terminationGracePeriodSeconds"],
        json!(45)
    );
    let sails = deployment_spec(json!({"flavor": "sails", "image": "s"}));
    assert_eq!(
        sails["template"]["spec"]["terminationGracePeriodSeconds"],
        json!(30)
    );
    assert_eq!(sails["strategy"], d["strategy"]);
}

fn checksum(spec: Value, secrets: &str) -> String {
    let inputs = Inputs {
        secrets_digest: secrets.into(),
    };
    let c = resources::build(&app(spec), &config(), &inputs).expect("builds");
    let d = c.deployment.expect("deployment");
    d.spec
        .and_then(|s| s.template.metadata)
        .and_then(|m| m.annotations)
        .and_then(|a| a.get(CHECKSUM_ANNOTATION).cloned())
        .expect("checksum annotation")
}

#[test]
fn checksum_moves_with_injected_configuration_only() {
    let base = checksum(json!({}), "s1");
    assert_eq!(base, checksum(json!({}), "s1"), "stable");
    // Not configuration: replica count, resources, image, service.
    assert_eq!(base, checksum(json!({"replicas": 7}), "s1"));
    assert_eq!(
        base,
        checksum(json!({"image": "chorus-server:other"}), "s1")
    );
    assert_eq!(base, checksum(json!({"service": {"port": 8080}}), "s1"));
    assert_eq!(
        base,
        checksum(json!({"resources": {"limits": {"memory": "1Gi"}}}), "s1")
    );
    // Configuration: env, port, referenced secret values, auth refs, Redis location.
    assert_ne!(
        base,
        checksum(json!({"env": [{"name": "X", "value": "1"}]}), "s1")
    );
    assert_ne!(base, checksum(json!({"port": 4000}), "s1"));
    assert_ne!(base, checksum(json!({}), "s2"));
    assert_ne!(
        base,
        checksum(
            json!({"auth": {"jwtSecretRef": {"name": "j", "key": "k"}}}),
            "s1"
        )
    );
    assert_ne!(
        base,
        checksum(
            json!({"redis": {"mode": "External", "external": {"host": "h"}}}),
            "s1"
        )
    );
}

#[test]
fn render_without_uid_omits_owner_references() {
    let mut a = app(json!({}));
    a.metadata.uid = None;
    let c = resources::build(&a, &config(), &Inputs::default()).expect("builds");
    assert!(
        c.objects()
            .iter()
            .all(|o| o["metadata"].get("ownerReferences").is_none())
    );
}

fn secret_with(name: &str, key: &str, value: &str) -> Option<Secret> {
    Some(Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            key.to_owned(),
            ByteString(value.as_bytes().to_vec()),
        )])),
        ..Secret::default()
    })
}

#[test]
fn the_secrets_checksum_is_keyed_not_a_plain_hash_of_the_values() {
    let password = SecretKeyRef {
        name: "chat-redis".into(),
        key: "password".into(),
    };
    let key = SecretKeyRef {
        name: "chat-checksum-key".into(),
        key: "key".into(),
    };
    let read = |value: &str, k: &str| {
        BTreeMap::from([
            (
                password.name.clone(),
                secret_with(&password.name, "password", value),
            ),
            (key.name.clone(), secret_with(&key.name, "key", k)),
        ])
    };
    let refs = [password.clone()];
    let checked = secrets::check(&read("hunter2", "k1"), &refs, &key, "team");
    assert!(checked.problems.is_empty(), "{:?}", checked.problems);
    let digest = checked.digest;
    assert_eq!(digest.len(), 64, "{digest}");
    // What an offline guesser would compare a guess against: plain hashes of the value.
    let sha256 = |parts: &[&[u8]]| {
        let mut h = Sha256::new();
        for p in parts {
            h.update(p);
        }
        format!("{:x}", h.finalize())
    };
    for plain in [
        sha256(&[b"hunter2"]),
        sha256(&[b"chat-redis/password", b"hunter2"]),
        resources::digest([b"hunter2".as_slice()]),
        resources::digest([b"chat-redis/password".as_slice(), b"hunter2".as_slice()]),
    ] {
        assert_ne!(digest, plain, "the checksum is a plain hash of the value");
    }
    // The key decides it: same inputs, same digest; another key, another digest.
    let again = secrets::check(&read("hunter2", "k1"), &refs, &key, "team").digest;
    assert_eq!(digest, again);
    let other_key = secrets::check(&read("hunter2", "k2"), &refs, &key, "team").digest;
    assert_ne!(digest, other_key);
    // And a changed value still changes it.
    let other_value = secrets::check(&read("hunter3", "k1"), &refs, &key, "team").digest;
    assert_ne!(digest, other_value);
    assert_eq!(
        secrets::check(&read("hunter2", "k1"), &refs, &key, "team")
            .values
            .get(&(password.name.clone(), password.key.clone()))
            .map(Vec::as_slice),
        Some(b"hunter2".as_slice())
    );

    // Without its key there is no checksum, and the status says which Secret is missing.
    let mut no_key = read("hunter2", "k1");
    no_key.insert(key.name.clone(), None);
    let checked = secrets::check(&no_key, &refs, &key, "team");
    assert_eq!(
        checked
            .problems
            .iter()
            .map(|p| p.message.as_str())
            .collect::<Vec<_>>(),
        ["Secret team/chat-checksum-key not found"]
    );
}

fn server_container(spec: Value) -> Value {
    deployment_spec(spec)["template"]["spec"]["containers"][0].clone()
}

#[test]
fn chorus_server_gets_resource_requests_unless_given_and_user_images_get_none() {
    // Requests only: the scheduler counts the pods, and an HPA has a CPU request to measure.
    let defaults = json!({"requests": {"cpu": "100m", "memory": "128Mi"}});
    assert_eq!(server_container(json!({}))["resources"], defaults);
    assert_eq!(
        server_container(json!({"autoscaling": {"enabled": true}}))["resources"]["requests"]["cpu"],
        json!("100m")
    );
    // Given resources replace the defaults whole.
    let given = json!({"requests": {"memory": "1Gi"}, "limits": {"memory": "2Gi"}});
    assert_eq!(
        server_container(json!({"resources": given.clone()}))["resources"],
        given
    );
    // Sails and Socket.IO apps are the user's images: nothing is assumed for them.
    for flavor in ["sails", "socketio"] {
        let c = server_container(json!({"flavor": flavor, "image": "x"}));
        assert_eq!(c.get("resources"), None, "{flavor}");
    }
}

#[test]
fn chorus_server_and_redis_run_as_uids_above_10000() {
    let children = build(json!({}));
    let uids: Vec<Option<i64>> = pods(&children)
        .iter()
        .map(|p| p.security_context.as_ref().and_then(|s| s.run_as_user))
        .collect();
    assert_eq!(uids, [Some(65532), Some(10999)], "server, then redis");
    for pod in pods(&children) {
        let sc = pod.security_context.as_ref().expect("securityContext");
        // The same group owns the emptyDir Redis writes to.
        assert_eq!(sc.fs_group, sc.run_as_user);
        assert_restricted(&pod);
    }
    // Node apps keep the `node` user of the official images, which owns their files.
    let sails = build(json!({"flavor": "sails", "image": "x"}));
    let server = &pods(&sails)[0];
    assert_eq!(
        server.security_context.as_ref().and_then(|s| s.run_as_user),
        Some(1000)
    );
}

/// The managed Redis objects as JSON: (StatefulSet, Service, PodDisruptionBudget).
fn redis_objects(spec: Value) -> (Value, Value, Option<Value>) {
    let r = build(spec).redis.expect("managed redis");
    (
        serde_json::to_value(&r.statefulset).expect("json"),
        serde_json::to_value(&r.service).expect("json"),
        r.pdb.map(|p| serde_json::to_value(p).expect("json")),
    )
}

#[test]
fn one_redis_bus_renders_exactly_as_before() {
    // `replicas: 1` is the default: the same objects, and a single ClusterIP Service.
    let default = build(json!({}));
    let one = build(json!({"redis": {"replicas": 1}}));
    assert_eq!(default.objects(), one.objects());
    let (sts, svc, pdb) = redis_objects(json!({"redis": {"replicas": 1}}));
    assert_eq!(sts["spec"]["replicas"], json!(1));
    for absent in [
        &sts["metadata"]["annotations"],
        &sts["spec"]["podManagementPolicy"],
        &sts["spec"]["template"]["spec"]["affinity"],
        &sts["spec"]["template"]["spec"]["topologySpreadConstraints"],
        &svc["metadata"]["annotations"],
        &svc["spec"]["clusterIP"],
    ] {
        assert_eq!(absent, &Value::Null);
    }
    assert!(pdb.is_none(), "no Redis PDB for one bus");
    let env = env_of(&default);
    assert_eq!(value(&env, "REDIS_HOST"), Some("chat-redis.team.svc"));
    // The REDIS_URL of one bus is the single URL it always was.
    assert_eq!(
        redis_url(&json!({}), Some(b"pw")),
        "redis://:pw@chat-redis.team.svc:6379/0"
    );
}

#[test]
fn several_redis_buses_are_independent_spread_pods_behind_a_headless_service() {
    for n in [2, 3] {
        let spec = json!({"redis": {"replicas": n}});
        let (sts, svc, pdb) = redis_objects(spec.clone());
        let s = &sts["spec"];
        assert_eq!(s["replicas"], json!(n));
        assert_eq!(s["podManagementPolicy"], json!("Parallel"));
        assert_eq!(s["serviceName"], json!("chat-redis"));
        assert_eq!(svc["metadata"]["name"], json!("chat-redis"));
        assert_eq!(svc["spec"]["clusterIP"], json!("None"), "headless");
        assert_eq!(svc["spec"]["ports"][0]["port"], json!(6379));
        let redis_pods =
            json!({"app.kubernetes.io/component": "redis", "app.kubernetes.io/instance": "chat"});
        assert_eq!(svc["spec"]["selector"], redis_pods);
        // Independent: nothing makes one a replica of another.
        let args = s["template"]["spec"]["containers"][0]["args"].to_string();
        assert!(
            !args.contains("replicaof") && !args.contains("slaveof"),
            "{args}"
        );
        // Spread: preferred, so fewer nodes than buses still run them all.
        let pod = &s["template"]["spec"];
        let anti = &pod["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
            [0];
        assert_eq!(
            anti["podAffinityTerm"]["topologyKey"],
            json!("kubernetes.io/hostname")
        );
        assert_eq!(
            anti["podAffinityTerm"]["labelSelector"]["matchLabels"],
            redis_pods
        );
        assert!(
            pod["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
                .is_null()
        );
        let spread = &pod["topologySpreadConstraints"][0];
        assert_eq!(spread["whenUnsatisfiable"], json!("ScheduleAnyway"));
        assert_eq!(spread["labelSelector"]["matchLabels"], redis_pods);
        // At most one bus down through a voluntary disruption.
        let pdb = pdb.expect("a Redis PodDisruptionBudget");
        assert_eq!(pdb["metadata"]["name"], json!("chat-redis"));
        assert_eq!(pdb["spec"]["maxUnavailable"], json!(1));
        assert_eq!(pdb["spec"]["selector"]["matchLabels"], redis_pods);
        // Every object is in the apply order, the server PDB too.
        let names: Vec<(String, String)> = build(spec)
            .objects()
            .iter()
            .map(|o| {
                (
                    o["kind"].as_str().unwrap_or("").to_owned(),
                    o["metadata"]["name"].as_str().unwrap_or("").to_owned(),
                )
            })
            .collect();
        for wanted in [
            ("PodDisruptionBudget", "chat-redis"),
            ("PodDisruptionBudget", "chat"),
            ("Service", "chat-redis"),
        ] {
            assert!(
                names.contains(&(wanted.0.into(), wanted.1.into())),
                "{wanted:?} in {names:?}"
            );
        }
    }
}

#[test]
fn redis_url_lists_every_bus_with_the_password_percent_encoded() {
    let password = "p@ss/w#rd:1%2?x";
    for n in [2usize, 3] {
        let url = redis_url(
            &json!({"redis": {"replicas": n}}),
            Some(password.as_bytes()),
        );
        let urls: Vec<&str> = url.split(',').collect();
        assert_eq!(urls.len(), n, "{url}");
        for (i, one) in urls.iter().enumerate() {
            let parsed = url::Url::parse(one).unwrap_or_else(|e| panic!("{one}: {e}"));
            assert_eq!(parsed.scheme(), "redis");
            let host = format!("chat-redis-{i}.chat-redis.team.svc");
            assert_eq!(
                parsed.host_str(),
                Some(host.as_str()),
                "in pod order: {url}"
            );
            assert_eq!(parsed.port(), Some(6379));
            assert_eq!(parsed.path(), "/0");
            let decoded =
                percent_encoding::percent_decode_str(parsed.password().expect("password"))
                    .decode_utf8()
                    .expect("utf-8");
            assert_eq!(decoded, password, "{one}");
        }
    }
    assert_eq!(
        redis_url(&json!({"redis": {"replicas": 2}}), Some(b"a@b")),
        "redis://:a%40b@chat-redis-0.chat-redis.team.svc:6379/0,redis://:a%40b@chat-redis-1.chat-redis.team.svc:6379/0"
    );
    // The pods read it from the Secret; REDIS_HOST names the Service of them all.
    let env = env_of(&build(json!({"redis": {"replicas": 3}})));
    assert_eq!(
        secret_ref(&env, "REDIS_URL"),
        Some(("chat-redis-url".into(), "url".into()))
    );
    assert_eq!(value(&env, "REDIS_HOST"), Some("chat-redis.team.svc"));
    // The bus list is configuration: changing it rolls the server pods.
    let one = checksum(json!({}), "s1");
    let two = checksum(json!({"redis": {"replicas": 2}}), "s1");
    let three = checksum(json!({"redis": {"replicas": 3}}), "s1");
    assert!(one != two && two != three && one != three);
}

#[test]
fn chorus_redis_refuses_writes_when_full_and_the_adapters_evict() {
    let policy = |spec: Value| {
        let (_, args) = redis_container(spec);
        let i = args
            .iter()
            .position(|a| a == "--maxmemory-policy")
            .expect("policy");
        args[i + 1].clone()
    };
    // An evicted history stream would make a resume claim messages it no longer has.
    assert_eq!(policy(json!({})), "noeviction");
    assert_eq!(policy(json!({"redis": {"replicas": 3}})), "noeviction");
    for flavor in ["sails", "socketio"] {
        assert_eq!(
            policy(json!({"flavor": flavor, "image": "x"})),
            "allkeys-lru"
        );
    }
}

#[test]
fn redis_bus_counts_the_crd_refuses_are_refused_by_the_build_too() {
    // What an older CRD without the bounds and CEL rules lets through.
    for (spec, message) in [
        (
            json!({"redis": {"replicas": 0}}),
            "spec.redis.replicas must be between 1 and 3, not 0",
        ),
        (
            json!({"redis": {"replicas": 4}}),
            "spec.redis.replicas must be between 1 and 3, not 4",
        ),
        (
            json!({"flavor": "sails", "image": "i", "redis": {"replicas": 2}}),
            "spec.redis.replicas above 1 needs flavor chorus: the sails Redis adapter speaks to one Redis",
        ),
        (
            json!({"flavor": "socketio", "image": "i", "redis": {"replicas": 2}}),
            "spec.redis.replicas above 1 needs flavor chorus: the socketio Redis adapter speaks to one Redis",
        ),
        (
            json!({"redis": {"mode": "External", "external": {"host": "r"}, "replicas": 2}}),
            "spec.redis.replicas above 1 applies to a managed Redis only (spec.redis.mode Managed)",
        ),
    ] {
        let err = resources::build(&app(spec.clone()), &config(), &Inputs::default())
            .err()
            .map(|e| e.to_string());
        assert_eq!(err.as_deref(), Some(message), "{spec}");
    }
}
