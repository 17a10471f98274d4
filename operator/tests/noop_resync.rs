//! A fleet of apps (every example shape, several namespaces) converged by the real
//! controller; then reconciling every app again with nothing changed writes nothing, and
//! through the controller reads no child from the API.
//! (reconcile.rs checks the same for one app reconciled by hand; benches/scale.rs measures
//! it for 500.)

mod support;

use std::time::Duration;

use support::{
    FakeApi, fleet,
    running::{Running, config},
};

const APPS: usize = 20;

#[tokio::test]
async fn after_convergence_a_full_noop_reconcile_pass_writes_nothing() {
    let api = FakeApi::default();
    let apps = fleet::create(&api, APPS, 3);
    let running = Running::start(&api, config(0, false));
    let kubelet = fleet::spawn_kubelet(api.clone());

    fleet::wait_ready(&api, APPS, Duration::from_secs(30), |_, _| {})
        .await
        .expect("every app Ready");
    assert!(
        fleet::quiesce(&api, Duration::from_millis(300), Duration::from_secs(10)).await,
        "the controller settles once every app is Ready"
    );
    let initial = api.client_requests();
    assert!(fleet::writes(&initial) > 0, "{initial:?}");

    // Through the controller: every app's metadata changes, its spec does not.
    let before = api.client_requests();
    fleet::touch_all(&api, &apps, "1");
    assert!(fleet::quiesce(&api, Duration::from_millis(300), Duration::from_secs(10)).await);
    let touched = fleet::since(&before, &api.client_requests());
    assert!(
        touched.get("GET secrets").copied().unwrap_or(0) >= APPS as u64,
        "each touched app was reconciled (read the Secrets its pods use): {touched:?}"
    );
    assert_eq!(fleet::writes(&touched), 0, "{touched:?}");
    // The children themselves come from the controller's watch caches.
    let child_gets: Vec<_> = touched
        .iter()
        .filter(|(key, _)| key.starts_with("GET ") && *key != "GET secrets")
        .collect();
    assert!(child_gets.is_empty(), "{touched:?}");

    // The reconcile function on every app.
    let ctx = fleet::context(&api);
    let before = api.client_requests();
    let (ok, errors) = fleet::reconcile_all(&api, &ctx, &apps, 4).await;
    assert_eq!((ok, errors), (APPS, vec![]));
    let direct = fleet::since(&before, &api.client_requests());
    assert_eq!(fleet::writes(&direct), 0, "{direct:?}");
    assert_eq!(fleet::ready(&api), APPS);

    kubelet.abort();
    running.stop().await;
}
