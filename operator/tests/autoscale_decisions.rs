//! The Operator engine's decisions from sequences of readings: scale-up at once, the
//! scale-down window, the scale-down rate, the bounds, a missing reading, a replica that does
//! not answer, and CPU with connections.

use std::time::{Duration, Instant};

use chorus_operator::{
    autoscale::decide::{Autoscaler, Connections, Policy, Reading, Why},
    crd::AutoscalingSpec,
};
use serde_json::json;

fn policy(spec: serde_json::Value) -> Policy {
    let mut base = json!({"enabled": true, "minReplicas": 2, "maxReplicas": 10,
                          "targetConnectionsPerReplica": 1000, "targetCPUUtilizationPercentage": null,
                          "scaleDown": {"stabilizationWindowSeconds": 300, "maxReplicasPerMinute": 1}});
    if let (Some(b), Some(s)) = (base.as_object_mut(), spec.as_object()) {
        for (k, v) in s {
            b.insert(k.clone(), v.clone());
        }
    }
    let spec: AutoscalingSpec = serde_json::from_value(base).expect("an autoscaling spec");
    Policy::of(&spec)
}

fn sockets(total: u64) -> Reading {
    Reading {
        connections: Some(Connections {
            total,
            complete: true,
        }),
        cpu_percent: None,
    }
}

/// Feeds `readings` one every 15 s from `start`, applying each decision to the replicas the
/// way the scale subresource would; returns (seconds, replicas, why) of every decision.
fn run(
    policy: &Policy,
    mut replicas: i32,
    readings: &[Reading],
    a: &mut Autoscaler,
    start: Instant,
) -> Vec<(u64, i32, Why)> {
    readings
        .iter()
        .enumerate()
        .map(|(i, r)| {
            let at = 15 * i as u64;
            let d = a.decide(policy, replicas, r, start + Duration::from_secs(at));
            replicas = d.desired;
            (at, replicas, d.why)
        })
        .collect()
}

#[test]
fn a_scale_up_happens_at_once_and_follows_the_connections() {
    let p = policy(json!({}));
    let start = Instant::now();
    let mut a = Autoscaler::new(start);
    let out = run(
        &p,
        2,
        &[sockets(1500), sockets(4200), sockets(9999)],
        &mut a,
        start,
    );
    assert_eq!(out[0].1, 2, "1500 sockets fit in 2 replicas of 1000");
    assert_eq!((out[1].1, out[1].2), (5, Why::ScaleUp), "ceil(4200 / 1000)");
    assert_eq!(out[2].1, 10);
}

#[test]
fn replicas_stay_within_min_and_max() {
    let p = policy(json!({"minReplicas": 3, "maxReplicas": 6}));
    let start = Instant::now();
    let mut a = Autoscaler::new(start);
    assert_eq!(
        a.decide(&p, 2, &sockets(0), start).desired,
        3,
        "below min: up to min"
    );
    assert_eq!(
        a.decide(&p, 3, &sockets(1_000_000), start).desired,
        6,
        "capped at max"
    );
    let d = a.decide(&p, 9, &sockets(1_000_000), start);
    assert_eq!(
        (d.desired, d.why),
        (6, Why::Bounds),
        "above max: down to max at once"
    );
}

#[test]
fn a_scale_down_waits_for_the_window_and_removes_one_replica_a_minute() {
    let p = policy(
        json!({"scaleDown": {"stabilizationWindowSeconds": 120, "maxReplicasPerMinute": 1}}),
    );
    let start = Instant::now();
    let mut a = Autoscaler::new(start);
    // 6 replicas busy, then load drops to what 2 replicas hold.
    let mut readings = vec![sockets(6000)];
    readings.extend(std::iter::repeat_n(sockets(1500), 40));
    let out = run(&p, 6, &readings, &mut a, start);
    let first_down = out.iter().find(|(_, n, _)| *n < 6).expect("a scale-down");
    assert!(
        first_down.0 > 120,
        "no scale-down while the window still holds the 6-replica answer: {out:?}"
    );
    assert!(
        out.iter()
            .filter(|(t, _, _)| *t <= 120)
            .all(|(_, n, why)| *n == 6 && *why != Why::ScaleDown),
        "{out:?}"
    );
    // One replica at a time, a minute apart.
    let downs: Vec<(u64, i32)> = out
        .windows(2)
        .filter(|w| w[1].1 < w[0].1)
        .map(|w| (w[1].0, w[0].1 - w[1].1))
        .collect();
    assert!(downs.iter().all(|(_, n)| *n == 1), "{downs:?}");
    assert!(
        downs.windows(2).all(|w| w[1].0 - w[0].0 >= 60),
        "removals a minute apart: {downs:?}"
    );
    assert_eq!(
        out.last().map(|o| o.1),
        Some(2),
        "ends at what the load needs"
    );
}

#[test]
fn a_short_dip_inside_the_window_removes_nothing() {
    let p = policy(
        json!({"scaleDown": {"stabilizationWindowSeconds": 300, "maxReplicasPerMinute": 5}}),
    );
    let start = Instant::now();
    let mut a = Autoscaler::new(start);
    let mut readings = vec![sockets(5000); 21]; // 5 minutes at 5 replicas' load
    readings.extend([sockets(1000), sockets(1000), sockets(5000)]);
    let out = run(&p, 5, &readings, &mut a, start);
    assert!(out.iter().all(|(_, n, _)| *n == 5), "{out:?}");
}

#[test]
fn a_new_autoscaler_does_not_scale_down_before_it_watched_a_whole_window() {
    let p = policy(
        json!({"scaleDown": {"stabilizationWindowSeconds": 60, "maxReplicasPerMinute": 10}}),
    );
    let start = Instant::now();
    let mut a = Autoscaler::new(start);
    let d = a.decide(&p, 8, &sockets(100), start);
    assert_eq!((d.desired, d.why), (8, Why::Window));
    let d = a.decide(&p, 8, &sockets(100), start + Duration::from_secs(61));
    assert_eq!(d.desired, 2, "after a whole window of low answers");
}

#[test]
fn a_missing_reading_holds_the_replicas_and_a_silent_replica_blocks_scale_down() {
    let p =
        policy(json!({"scaleDown": {"stabilizationWindowSeconds": 0, "maxReplicasPerMinute": 10}}));
    let start = Instant::now();
    let mut a = Autoscaler::new(start);
    let d = a.decide(&p, 4, &Reading::default(), start);
    assert_eq!(
        (d.desired, d.why),
        (4, Why::Steady),
        "nothing read: nothing changes"
    );
    // One replica did not answer: its sockets are missing from the total.
    let partial = Reading {
        connections: Some(Connections {
            total: 500,
            complete: false,
        }),
        cpu_percent: None,
    };
    let d = a.decide(&p, 4, &partial, start);
    assert_eq!((d.desired, d.why), (4, Why::Incomplete));
    // ... but a partial count that already asks for more is a lower bound: scale up.
    let partial_high = Reading {
        connections: Some(Connections {
            total: 6500,
            complete: false,
        }),
        cpu_percent: None,
    };
    assert_eq!(a.decide(&p, 4, &partial_high, start).desired, 7);
    // Complete again: down at once (no window, ten a minute).
    let later = start + Duration::from_secs(15);
    assert_eq!(a.decide(&p, 7, &sockets(500), later).desired, 2);
}

#[test]
fn with_cpu_and_connections_the_larger_answer_wins() {
    let p = policy(json!({"targetCPUUtilizationPercentage": 50,
                          "scaleDown": {"stabilizationWindowSeconds": 0, "maxReplicasPerMinute": 10}}));
    let start = Instant::now();
    let mut a = Autoscaler::new(start);
    let r = |total, cpu| Reading {
        connections: Some(Connections {
            total,
            complete: true,
        }),
        cpu_percent: Some(cpu),
    };
    // CPU at 100 % of a 50 % target on 3 replicas asks for 6; connections for 2.
    assert_eq!(a.decide(&p, 3, &r(2000, 100.0), start).desired, 6);
    // Connections ask for 8; CPU within the tolerance keeps 6.
    assert_eq!(a.decide(&p, 6, &r(8000, 52.0), start).desired, 8);
    // CPU not read: connections alone may not scale down (a signal is missing).
    let no_cpu = Reading {
        connections: Some(Connections {
            total: 1000,
            complete: true,
        }),
        cpu_percent: None,
    };
    let d = a.decide(&p, 8, &no_cpu, start);
    assert_eq!((d.desired, d.why), (8, Why::Incomplete));
}
