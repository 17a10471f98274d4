//! The status the operator writes, from what it observed (pure): every reason a condition can
//! carry, and when lastTransitionTime moves.

use std::collections::BTreeSet;

use chorus_operator::{
    autoscale::Report,
    conditions::{
        ConditionType::{
            self, AutoscalingReady, Degraded, Progressing, Ready, RedisReady, ServersAvailable,
        },
        EventReason, Reason,
    },
    crd::{AutoscalingEngine, AutoscalingStatus, RealtimeApp},
    status::{self, Observed, Problem},
};
use k8s_openapi::{
    api::apps::v1::{Deployment, StatefulSet},
    apimachinery::pkg::apis::meta::v1::Time,
    jiff::Timestamp,
};
use serde_json::{Value, json};

fn app(spec: Value) -> RealtimeApp {
    serde_json::from_value(json!({
        "apiVersion": "chorus.rs/v1alpha1", "kind": "RealtimeApp",
        "metadata": {"name": "chat", "namespace": "team", "generation": 1, "uid": "u"},
        "spec": spec,
    }))
    .expect("app")
}

/// A Deployment at `generation` whose controller reports the counts, for `observed`.
fn deployment(
    generation: i64,
    observed: i64,
    [replicas, ready, updated, available]: [i32; 4],
) -> Deployment {
    serde_json::from_value(json!({
        "metadata": {"name": "chat", "generation": generation},
        "status": {"observedGeneration": observed, "replicas": replicas, "readyReplicas": ready,
                   "updatedReplicas": updated, "availableReplicas": available},
    }))
    .expect("deployment")
}

fn redis(ready: i32) -> Option<Option<StatefulSet>> {
    Some(Some(
        serde_json::from_value(json!({"metadata": {"name": "chat-redis"},
                                      "status": {"replicas": 1, "readyReplicas": ready}}))
        .expect("statefulset"),
    ))
}

/// A Redis StatefulSet of `replicas` buses of which `ready` are ready.
fn buses(replicas: i32, ready: i32) -> Option<Option<StatefulSet>> {
    Some(Some(
        serde_json::from_value(json!({"metadata": {"name": "chat-redis"},
                                      "status": {"replicas": replicas, "readyReplicas": ready}}))
        .expect("statefulset"),
    ))
}

fn problem(reason: Reason, message: &str) -> Problem {
    Problem {
        reason,
        message: message.into(),
    }
}

struct Row {
    what: &'static str,
    spec: Value,
    seen: Observed,
    /// (type, status, reason) of the conditions the row is about.
    expect: Vec<(ConditionType, bool, Reason)>,
}

fn seen(deployment: Option<Deployment>, redis: Option<Option<StatefulSet>>) -> Observed {
    Observed {
        deployment,
        redis,
        redis_endpoint: "chat-redis.team.svc:6379".into(),
        ..Observed::default()
    }
}

fn with(problems: Vec<Problem>) -> Observed {
    Observed {
        problems,
        ..seen(Some(deployment(1, 1, [2, 2, 2, 2])), redis(1))
    }
}

fn rows() -> Vec<Row> {
    let up = || Some(deployment(1, 1, [2, 2, 2, 2]));
    let mut rows = vec![
        Row {
            what: "a new app: nothing runs yet",
            spec: json!({}),
            seen: seen(None, Some(None)),
            expect: vec![
                (Ready, false, Reason::RedisNotReady),
                (RedisReady, false, Reason::RedisNotReady),
                (ServersAvailable, false, Reason::DeploymentMissing),
                (Progressing, false, Reason::Waiting),
                (Degraded, false, Reason::AsExpected),
            ],
        },
        Row {
            what: "Redis ready, no Deployment yet",
            spec: json!({}),
            seen: seen(None, redis(1)),
            expect: vec![
                (Ready, false, Reason::DeploymentMissing),
                (RedisReady, true, Reason::RedisReady),
            ],
        },
        Row {
            what: "pods starting: none ready",
            spec: json!({}),
            seen: seen(Some(deployment(1, 1, [2, 0, 2, 0])), redis(1)),
            expect: vec![
                (Ready, false, Reason::NoReplicasAvailable),
                (ServersAvailable, false, Reason::NoReplicasAvailable),
                (Progressing, true, Reason::RollingOut),
            ],
        },
        Row {
            what: "everything up",
            spec: json!({}),
            seen: seen(up(), redis(1)),
            expect: vec![
                (Ready, true, Reason::Ready),
                (RedisReady, true, Reason::RedisReady),
                (ServersAvailable, true, Reason::ReplicasAvailable),
                (Progressing, false, Reason::RolloutComplete),
                (Degraded, false, Reason::AsExpected),
            ],
        },
        Row {
            what: "a new generation the Deployment controller has not acted on",
            spec: json!({}),
            seen: seen(Some(deployment(2, 1, [2, 2, 2, 2])), redis(1)),
            expect: vec![
                (Ready, true, Reason::Ready),
                (Progressing, true, Reason::RollingOut),
            ],
        },
        Row {
            what: "scaled to zero",
            spec: json!({"replicas": 0}),
            seen: seen(Some(deployment(1, 1, [0, 0, 0, 0])), redis(1)),
            expect: vec![
                (Ready, true, Reason::Ready),
                (ServersAvailable, true, Reason::ScaledToZero),
                (Progressing, false, Reason::RolloutComplete),
            ],
        },
        Row {
            what: "an external Redis",
            spec: json!({"redis": {"mode": "External", "external": {"host": "r"}}}),
            seen: seen(up(), None),
            expect: vec![
                (Ready, true, Reason::Ready),
                (RedisReady, true, Reason::ExternalRedis),
            ],
        },
        Row {
            what: "servers up, the managed Redis not",
            spec: json!({}),
            seen: seen(up(), redis(0)),
            expect: vec![
                (Ready, false, Reason::RedisNotReady),
                (RedisReady, false, Reason::RedisNotReady),
                (ServersAvailable, true, Reason::ReplicasAvailable),
            ],
        },
    ];
    // Three Redis buses: the app runs while one is up; Degraded says when some are down.
    let some_down = || {
        vec![
            (Ready, true, Reason::Ready),
            (RedisReady, true, Reason::SomeBusesDown),
            (Degraded, true, Reason::SomeBusesDown),
        ]
    };
    for (ready, what, expect) in [
        (
            3,
            "3 of 3 Redis buses ready",
            vec![
                (Ready, true, Reason::Ready),
                (RedisReady, true, Reason::RedisReady),
                (Degraded, false, Reason::AsExpected),
            ],
        ),
        (2, "2 of 3 Redis buses ready", some_down()),
        (1, "1 of 3 Redis buses ready", some_down()),
        (
            0,
            "0 of 3 Redis buses ready",
            vec![
                (Ready, false, Reason::RedisNotReady),
                (RedisReady, false, Reason::RedisNotReady),
                (Degraded, false, Reason::AsExpected),
            ],
        ),
    ] {
        rows.push(Row {
            what,
            spec: json!({"redis": {"replicas": 3}}),
            seen: seen(up(), buses(3, ready)),
            expect,
        });
    }
    // Each problem, though everything runs: Degraded says it, and so does Ready.
    for reason in [
        Reason::SecretNotFound,
        Reason::SecretKeyNotFound,
        Reason::InvalidSpec,
        Reason::NameInUse,
        Reason::ReadFailed,
        Reason::ApplyFailed,
        Reason::DeleteFailed,
    ] {
        rows.push(Row {
            what: "a problem",
            spec: json!({}),
            seen: with(vec![problem(reason, "what is wrong")]),
            expect: vec![
                (Ready, false, reason),
                (Degraded, true, reason),
                (ServersAvailable, true, Reason::ReplicasAvailable),
            ],
        });
    }
    // Autoscaling: off, or what the autoscaler reported; Ready does not depend on it.
    rows.push(Row {
        what: "autoscaling off",
        spec: json!({}),
        seen: seen(up(), redis(1)),
        expect: vec![
            (AutoscalingReady, true, Reason::Disabled),
            (Ready, true, Reason::Ready),
        ],
    });
    rows.push(Row {
        what: "autoscaling on, nothing reported yet",
        spec: json!({"autoscaling": {"enabled": true}}),
        seen: seen(up(), redis(1)),
        expect: vec![
            (AutoscalingReady, false, Reason::NoReadings),
            (Ready, true, Reason::Ready),
        ],
    });
    for (engine, ok, reason) in [
        (AutoscalingEngine::Operator, true, Reason::Active),
        (AutoscalingEngine::Operator, false, Reason::NoReadings),
        (AutoscalingEngine::HPA, false, Reason::EngineNotScaling),
        (AutoscalingEngine::KEDA, false, Reason::EngineMissing),
    ] {
        rows.push(Row {
            what: "the autoscaler's report",
            spec: json!({"autoscaling": {"enabled": true, "engine": engine.as_str()}}),
            seen: Observed {
                autoscaling: Some(Report {
                    status: AutoscalingStatus {
                        engine,
                        ..AutoscalingStatus::default()
                    },
                    ready: ok,
                    reason,
                    message: "as the engine says".into(),
                }),
                ..seen(up(), redis(1))
            },
            expect: vec![(AutoscalingReady, ok, reason), (Ready, true, Reason::Ready)],
        });
    }
    rows
}

#[test]
fn every_reason_comes_from_the_observed_state_it_describes() {
    let now = Time(Timestamp::UNIX_EPOCH);
    let mut covered = BTreeSet::new();
    for row in rows() {
        let st = status::status(&app(row.spec), &row.seen, now.clone());
        for (type_, ok, reason) in row.expect {
            let c = status::condition(&st, type_)
                .unwrap_or_else(|| panic!("{}: no {type_} condition", row.what));
            let got = (c.status.as_str(), c.reason.as_str());
            let want = (if ok { "True" } else { "False" }, reason.as_str());
            assert_eq!(got, want, "{}: {type_}: {}", row.what, c.message);
            covered.insert(reason);
        }
    }
    let all: BTreeSet<Reason> = Reason::ALL.iter().copied().collect();
    let missing: Vec<_> = all.difference(&covered).collect();
    assert!(missing.is_empty(), "reasons without a row: {missing:?}");
}

#[test]
fn problems_are_all_named_in_degraded_and_ready_takes_the_first() {
    let seen = with(vec![
        problem(Reason::SecretNotFound, "Secret team/jwt not found"),
        problem(
            Reason::SecretKeyNotFound,
            "Secret team/api has no key \"token\"",
        ),
    ]);
    let st = status::status(&app(json!({})), &seen, Time(Timestamp::UNIX_EPOCH));
    for type_ in [Ready, Degraded] {
        let c = status::condition(&st, type_).expect("condition");
        assert_eq!(c.reason, "SecretNotFound");
        assert_eq!(
            c.message,
            "Secret team/jwt not found; Secret team/api has no key \"token\""
        );
    }
}

#[test]
fn last_transition_time_moves_only_when_a_condition_flips() {
    let at = |s: i64| Time(Timestamp::from_second(s).expect("time"));
    let mut chat = app(json!({}));
    let first = status::status(&chat, &seen(None, Some(None)), at(100));
    assert!(
        first
            .conditions
            .iter()
            .all(|c| c.last_transition_time == at(100))
    );

    chat.status = Some(first);
    let second = status::status(
        &chat,
        &seen(Some(deployment(1, 1, [2, 2, 2, 2])), redis(1)),
        at(200),
    );
    let time = |type_| {
        status::condition(&second, type_)
            .expect("condition")
            .last_transition_time
            .clone()
    };
    assert_eq!(time(Ready), at(200), "Ready flipped to True");
    assert_eq!(time(RedisReady), at(200));
    assert_eq!(time(ServersAvailable), at(200));
    assert_eq!(time(Progressing), at(100), "still False");
    assert_eq!(time(Degraded), at(100), "still False");
}

#[test]
fn the_operator_guide_names_every_condition_and_reason_and_event() {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/operator.md"))
        .expect("docs/operator.md");
    let status_section = doc
        .split("\n## Status")
        .nth(1)
        .and_then(|s| s.split("\n## ").next())
        .expect("a Status section");
    let named = |name: &str| status_section.contains(&format!("`{name}`"));
    let missing: Vec<&str> = ConditionType::ALL
        .iter()
        .map(|t| t.as_str())
        .chain(Reason::ALL.iter().map(|r| r.as_str()))
        .chain(EventReason::ALL.iter().map(|r| r.as_str()))
        .filter(|n| !named(n))
        .collect();
    assert!(
        missing.is_empty(),
        "docs/operator.md, Status, does not name {missing:?}"
    );
}

#[test]
fn the_status_says_how_many_redis_buses_are_up() {
    let up = || Some(deployment(1, 1, [2, 2, 2, 2]));
    let spec = json!({"redis": {"replicas": 3}});
    let now = Time(Timestamp::UNIX_EPOCH);
    let messages = |ready: i32| {
        let st = status::status(
            &app(spec.clone()),
            &seen(up(), buses(3, ready)),
            now.clone(),
        );
        let redis = st.redis.clone().expect("status.redis");
        assert_eq!(
            (redis.buses, redis.ready_buses, redis.ready),
            (Some(3), Some(ready), ready >= 1),
            "{ready} of 3"
        );
        let message = |t| {
            status::condition(&st, t)
                .expect("condition")
                .message
                .clone()
        };
        (message(RedisReady), message(Degraded), message(Ready))
    };
    assert_eq!(
        messages(3),
        (
            "3 of 3 Redis buses ready".into(),
            "no problems found".into(),
            "2/2 server replicas ready, 3 of 3 Redis buses ready".into()
        )
    );
    assert_eq!(
        messages(2),
        (
            "2 of 3 Redis buses ready".into(),
            "1 of 3 Redis buses down".into(),
            "2/2 server replicas ready, 2 of 3 Redis buses ready".into()
        )
    );
    assert_eq!(messages(1).1, "2 of 3 Redis buses down");
    assert_eq!(messages(0).0, "0 of 3 Redis buses ready");

    // A problem and buses down: Degraded names both, the problem first.
    let mut with_problem = seen(up(), buses(3, 2));
    with_problem.problems = vec![problem(Reason::SecretNotFound, "Secret team/jwt not found")];
    let st = status::status(&app(spec.clone()), &with_problem, now.clone());
    let degraded = status::condition(&st, Degraded).expect("Degraded");
    assert_eq!(degraded.reason, "SecretNotFound");
    assert_eq!(
        degraded.message,
        "Secret team/jwt not found; 1 of 3 Redis buses down"
    );

    // A StatefulSet still scaling down from 3 counts no more buses than wanted.
    let st = status::status(&app(json!({})), &seen(up(), buses(3, 3)), now.clone());
    let redis = st.redis.expect("status.redis");
    assert_eq!((redis.buses, redis.ready_buses), (Some(1), Some(1)));
    // An external Redis is not counted.
    let external = json!({"redis": {"mode": "External", "external": {"host": "r"}}});
    let st = status::status(&app(external), &seen(up(), None), now);
    let redis = st.redis.expect("status.redis");
    assert_eq!(
        (redis.buses, redis.ready_buses, redis.ready),
        (None, None, true)
    );
}
