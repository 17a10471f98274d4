//! Watch caches of the children the operator manages.
//!
//! The controller watches its children anyway (to reconcile an app when one of them
//! changes); keeping what those watches see in stores lets a reconcile read the live
//! children from memory: a periodic resync of an app that needs nothing then reads only the
//! Secrets whose values it needs, instead of making one GET per child.
//!
//! Secrets are not watched: that would need `list` and `watch` on every Secret of the
//! namespaces (RBAC cannot narrow those by label), and a reconcile reads the Secrets its
//! pods use by name anyway, generated ones included.

use std::{
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use futures::FutureExt;

use k8s_openapi::api::{
    apps::v1::{Deployment, StatefulSet},
    autoscaling::v2::HorizontalPodAutoscaler,
    core::v1::Service,
    networking::v1::NetworkPolicy,
    policy::v1::PodDisruptionBudget,
};
use kube::{
    Api, Client, ResourceExt,
    runtime::{
        Controller, WatchStreamExt,
        reflector::{self, ObjectRef, Store},
        watcher,
    },
};

use crate::{
    crd::RealtimeApp,
    resources::{Child, is_owned_by},
};

/// How long a reconcile waits for a watch's first list before reading from the API.
pub const LIST_WAIT: Duration = Duration::from_secs(10);

/// One store per kind of child.
pub struct Caches {
    deployments: Kept<Deployment>,
    statefulsets: Kept<StatefulSet>,
    services: Kept<Service>,
    hpas: Kept<HorizontalPodAutoscaler>,
    pdbs: Kept<PodDisruptionBudget>,
    network_policies: Kept<NetworkPolicy>,
}

/// A store, and whether a reconcile has waited [`LIST_WAIT`] for its first list in vain:
/// later reconciles then only look whether it has listed since, so a refused watch slows
/// one reconcile down, not every one (and not a graceful shutdown).
pub struct Kept<K: Cached> {
    store: Store<K>,
    waited_in_vain: AtomicBool,
}

/// A kind of child that has a store in [`Caches`].
pub trait Cached: Child {
    fn kept(caches: &Caches) -> &Kept<Self>;

    /// What the store keeps of an object: its metadata and status, which is all a reconcile
    /// reads of a live child (it compares the applied-hash annotation, the owner, and the
    /// rollout status), not its spec or managed fields.
    fn trim(obj: &mut Self);
}

macro_rules! cached {
    ($($kind:ty => $field:ident),* $(,)?) => {
        $(impl Cached for $kind {
            fn kept(caches: &Caches) -> &Kept<Self> {
                &caches.$field
            }

            fn trim(obj: &mut Self) {
                obj.managed_fields_mut().clear();
                obj.spec = None;
            }
        })*
    };
}
cached!(
    Deployment => deployments,
    StatefulSet => statefulsets,
    Service => services,
    HorizontalPodAutoscaler => hpas,
    PodDisruptionBudget => pdbs,
    NetworkPolicy => network_policies,
);

impl Caches {
    /// Adds the watch of each kind of child to `controller` as a trigger, and keeps what
    /// the watches see in the returned caches. `namespace`: None watches every namespace;
    /// `config` selects the children.
    pub fn attach(
        controller: Controller<RealtimeApp>,
        client: &Client,
        namespace: Option<&str>,
        config: &watcher::Config,
    ) -> (Controller<RealtimeApp>, Self) {
        let source = Source {
            client,
            namespace,
            config,
        };
        let (controller, deployments) = source.own(controller);
        let (controller, statefulsets) = source.own(controller);
        let (controller, services) = source.own(controller);
        let (controller, hpas) = source.own(controller);
        let (controller, pdbs) = source.own(controller);
        let (controller, network_policies) = source.own(controller);
        let caches = Self {
            deployments,
            statefulsets,
            services,
            hpas,
            pdbs,
            network_policies,
        };
        (controller, caches)
    }

    /// The cached child `name` in `namespace`, once its store has had its first full list
    /// (before that, "not in the store" would not mean "absent"). None when the watch has
    /// not listed within [`LIST_WAIT`] (say, RBAC refuses it) or has ended: the caller then
    /// reads from the API, whose error then says what is wrong.
    pub async fn get<K: Cached>(&self, namespace: &str, name: &str) -> Option<Option<K>> {
        let store = Self::listed::<K>(self).await?;
        let key = ObjectRef::new(name).within(namespace);
        Some(store.get(&key).map(|obj| K::clone(&obj)))
    }

    /// The cached children of kind `K` in `namespace` whose owner is the object `owner_uid`;
    /// None as for [`Caches::get`].
    pub async fn owned<K: Cached>(&self, namespace: &str, owner_uid: &str) -> Option<Vec<K>> {
        let store = Self::listed::<K>(self).await?;
        let owned = store
            .state()
            .into_iter()
            .filter(|obj| {
                obj.namespace().as_deref() == Some(namespace) && is_owned_by(&**obj, owner_uid)
            })
            .map(|obj| K::clone(&obj))
            .collect();
        Some(owned)
    }

    /// `K`'s store once its watch has listed.
    async fn listed<K: Cached>(&self) -> Option<&Store<K>> {
        let kept = K::kept(self);
        let ready = kept.store.wait_until_ready();
        let listed = if kept.waited_in_vain.load(Ordering::Relaxed) {
            ready.now_or_never()
        } else {
            tokio::time::timeout(LIST_WAIT, ready).await.ok()
        };
        match listed {
            Some(Ok(())) => Some(&kept.store),
            _ => {
                kept.waited_in_vain.store(true, Ordering::Relaxed);
                None
            }
        }
    }
}

/// The [`Api`] of a namespaced kind (a child, or the RealtimeApps themselves), in one
/// namespace or in all, as the operator runs.
pub fn api<K: Child>(client: &Client, namespace: Option<&str>) -> Api<K> {
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

struct Source<'a> {
    client: &'a Client,
    namespace: Option<&'a str>,
    config: &'a watcher::Config,
}

impl Source<'_> {
    /// Watches one kind for `controller` (its changes trigger the owner's reconcile) and
    /// returns the store that the watch fills as the controller polls it.
    fn own<K: Cached>(
        &self,
        controller: Controller<RealtimeApp>,
    ) -> (Controller<RealtimeApp>, Kept<K>) {
        let (reader, writer) = reflector::store();
        let events = watcher(api::<K>(self.client, self.namespace), self.config.clone())
            .default_backoff()
            .modify(K::trim);
        let feed = reflector::reflector(writer, events).touched_objects();
        let kept = Kept {
            store: reader,
            waited_in_vain: AtomicBool::new(false),
        };
        (controller.owns_stream(feed), kept)
    }
}
