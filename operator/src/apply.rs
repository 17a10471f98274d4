//! The writes of one reconcile to one app's children: generated Secrets created once,
//! server-side apply of what changed (field manager `chorus-operator`, forced), deletion of
//! what is no longer wanted. Each failure names its step and object.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::{
    apps::v1::StatefulSet,
    autoscaling::v2::HorizontalPodAutoscaler,
    core::v1::{Secret, Service},
    networking::v1::NetworkPolicy,
    policy::v1::PodDisruptionBudget,
};
use kube::{
    Api, ResourceExt,
    api::{
        ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams,
        Preconditions,
    },
    runtime::events::EventType,
};

use crate::{
    cache::Cached,
    conditions::{EventReason, Reason},
    crd::RealtimeApp,
    error::{Error, ObjectName},
    reconcile::Context,
    resources::{
        Child, Children, IMMUTABLE_ANNOTATION, MANAGER, children_selector, digest, is_owned_by,
    },
    secrets,
    status::Problem,
};

/// The hash of what the operator last applied to a child; equal hash, nothing to apply.
pub const APPLIED_ANNOTATION: &str = "chorus.rs/applied-hash";

/// Which values a child has in the fields it cannot change in place (None: the defaults).
fn immutable_fields<K: ResourceExt>(obj: &K) -> Option<&String> {
    obj.annotations().get(IMMUTABLE_ANNOTATION)
}

/// Writes the children of `app`, in its namespace.
pub struct Applier<'a> {
    pub app: &'a RealtimeApp,
    pub ctx: &'a Context,
    pub namespace: String,
}

impl<'a> Applier<'a> {
    pub fn new(app: &'a RealtimeApp, ctx: &'a Context) -> Self {
        Self {
            app,
            ctx,
            namespace: app.namespace().unwrap_or_else(|| "default".into()),
        }
    }

    pub fn api<K: Child>(&self) -> Api<K> {
        Api::namespaced(self.ctx.client.clone(), &self.namespace)
    }

    fn object<K: Child>(&self, name: &str) -> ObjectName {
        ObjectName::new(&K::kind(&()), &self.namespace, name)
    }

    /// The live child `name`, from the controller's caches when there are any.
    pub async fn live<K: Cached>(&self, name: &str) -> Result<Option<K>, Error> {
        self.ctx
            .live(&self.api(), &self.namespace, name)
            .await
            .map_err(|source| Error::Read {
                object: self.object::<K>(name),
                source,
            })
    }

    /// Creates a generated Secret (the caller found it missing) and returns it as stored;
    /// one created meanwhile is read instead. It is never updated, so a value is never
    /// rotated by accident; None if it vanished again.
    pub async fn create_secret(&self, secret: Secret) -> Result<Option<Secret>, Error> {
        let name = secret.name_any();
        let api = self.api::<Secret>();
        match api.create(&PostParams::default(), &secret).await {
            Ok(created) => {
                self.ctx.metrics.writes.inc();
                self.event(EventReason::SecretCreated, format!("created Secret {name}"))
                    .await;
                Ok(Some(created))
            }
            Err(kube::Error::Api(e)) if e.code == 409 => {
                api.get_opt(&name).await.map_err(|source| Error::Read {
                    object: self.object::<Secret>(&name),
                    source,
                })
            }
            Err(source) => Err(Error::Create {
                object: self.object::<Secret>(&name),
                source,
            }),
        }
    }

    /// Writes a Secret the operator derives (the REDIS_URL one) when the value of `key` in
    /// the `live` one differs, by server-side apply. No hash annotation: the values are
    /// compared directly, so nothing derived from the secret value is written beside it.
    /// Returns false, with a problem in `problems`, when a Secret of that name that this
    /// app does not own is in the way: it is left as it is.
    pub async fn apply_secret(
        &self,
        secret: Secret,
        live: Option<&Secret>,
        key: &str,
        problems: &mut Vec<Problem>,
    ) -> Result<bool, Error> {
        let name = secret.name_any();
        if let Some(live) = live {
            if !self.owns(live, &name, problems) {
                return Ok(false);
            }
            let current = secrets::value(live, key);
            if current.is_some() && current == secrets::value(&secret, key) {
                return Ok(true);
            }
        }
        self.write(&name, &secret, live.is_some()).await?;
        Ok(true)
    }

    /// Whether this app owns `live`; if not, a NameInUse problem says so.
    fn owns<K: Child>(&self, live: &K, name: &str, problems: &mut Vec<Problem>) -> bool {
        if is_owned_by(live, &self.uid()) {
            return true;
        }
        problems.push(Problem {
            reason: Reason::NameInUse,
            message: format!(
                "{} exists and is not owned by this RealtimeApp: rename the app or remove it",
                self.object::<K>(name)
            ),
        });
        false
    }

    /// Server-side applies `obj`, counts the write and records a Created or Updated event.
    async fn write<K: Child>(&self, name: &str, obj: &K, exists: bool) -> Result<K, Error> {
        let applied = self
            .api::<K>()
            .patch(
                name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(obj),
            )
            .await
            .map_err(|source| Error::Apply {
                object: self.object::<K>(name),
                source,
            })?;
        self.ctx.metrics.writes.inc();
        let reason = if exists {
            EventReason::Updated
        } else {
            EventReason::Created
        };
        self.event(reason, format!("{reason} {} {name}", K::kind(&())))
            .await;
        Ok(applied)
    }

    /// The live child `name` if this app owns it; another's object of that name is none of
    /// its business.
    pub async fn live_owned<K: Cached>(&self, name: &str) -> Result<Option<K>, Error> {
        let live = self.live::<K>(name).await?;
        Ok(live.filter(|obj| is_owned_by(obj, &self.uid())))
    }

    /// Applies `obj` unless the live object already carries the same applied hash. Returns
    /// the live object, for its status (from the caches it has metadata and status only);
    /// None, and a problem in `problems`, when an object of that name that this app does
    /// not own is in the way: it is left as it is.
    pub async fn apply<K: Cached>(
        &self,
        mut obj: K,
        problems: &mut Vec<Problem>,
    ) -> Result<Option<K>, Error> {
        let name = obj.name_any();
        let hash = digest([serde_json::to_vec(&obj).unwrap_or_default().as_slice()]);
        obj.meta_mut()
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(APPLIED_ANNOTATION.into(), hash.clone());
        let mut live = self.live::<K>(&name).await?;
        if let Some(current) = live.as_ref() {
            if !self.owns(current, &name, problems) {
                return Ok(None);
            }
            if current.annotations().get(APPLIED_ANNOTATION) == Some(&hash) {
                return Ok(Some(current.clone()));
            }
            if immutable_fields(current) != immutable_fields(&obj) {
                live = self.replace(&name, &obj).await?;
            }
        }
        let applied = self.write(&name, &obj, live.is_some()).await?;
        Ok(Some(applied))
    }

    /// Deletes the child `name` when its fields that cannot change in place differ from
    /// `obj`'s, so that the apply after it creates it anew (the API server would refuse the
    /// change). Read from the API, not the caches: a cache that has not yet seen an earlier
    /// replacement must not have the new object deleted. Returns what is left: None once
    /// deleted, else the live object (already as wanted).
    async fn replace<K: Cached>(&self, name: &str, obj: &K) -> Result<Option<K>, Error> {
        let live = self
            .api::<K>()
            .get_opt(name)
            .await
            .map_err(|source| Error::Read {
                object: self.object::<K>(name),
                source,
            })?;
        match live {
            Some(live) if immutable_fields(&live) != immutable_fields(obj) => {
                self.delete::<K>(name, live.uid()).await?;
                Ok(None)
            }
            other => Ok(other),
        }
    }

    /// The one pass that deletes what this app owns and no longer wants: every child of the
    /// kinds that can stop being wanted, owned by this app and not among `wanted`'s. (The
    /// server Deployment is always wanted; the generated Secrets are never deleted: the
    /// garbage collector takes them with the app. So RBAC need not allow deleting either.)
    pub async fn delete_unwanted(&self, wanted: &Children) -> Result<(), Error> {
        let wanted = wanted.names();
        self.delete_unwanted_of::<NetworkPolicy>(&wanted).await?;
        self.delete_unwanted_of::<StatefulSet>(&wanted).await?;
        self.delete_unwanted_of::<Service>(&wanted).await?;
        self.delete_unwanted_of::<HorizontalPodAutoscaler>(&wanted)
            .await?;
        self.delete_unwanted_of::<PodDisruptionBudget>(&wanted)
            .await
    }

    async fn delete_unwanted_of<K: Cached>(
        &self,
        wanted: &BTreeSet<(String, String)>,
    ) -> Result<(), Error> {
        let kind = K::kind(&()).into_owned();
        let owned = self
            .ctx
            .owned::<K>(&self.api(), &self.namespace, self.app)
            .await
            .map_err(|source| Error::List {
                kind: kind.clone(),
                app: ObjectName::of(self.app),
                source,
            })?;
        for obj in owned {
            let name = obj.name_any();
            if !wanted.contains(&(kind.clone(), name.clone())) {
                self.delete::<K>(&name, obj.uid()).await?;
            }
        }
        Ok(())
    }

    /// Deletes the child `name`, provided it is still the object `uid` (not one re-created
    /// meanwhile by someone else).
    async fn delete<K: Cached>(&self, name: &str, uid: Option<String>) -> Result<(), Error> {
        self.delete_in(&self.api::<K>(), &K::kind(&()), name, uid)
            .await
    }

    /// [`Applier::delete`] through `api`, for typed and dynamic kinds alike.
    async fn delete_in<K>(
        &self,
        api: &Api<K>,
        kind: &str,
        name: &str,
        uid: Option<String>,
    ) -> Result<(), Error>
    where
        K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        let params = DeleteParams {
            preconditions: Some(Preconditions {
                uid,
                resource_version: None,
            }),
            ..DeleteParams::default()
        };
        match api.delete(name, &params).await {
            Ok(_) => {
                self.ctx.metrics.writes.inc();
                self.event(EventReason::Deleted, format!("deleted {kind} {name}"))
                    .await;
                Ok(())
            }
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(source) => Err(Error::Delete {
                object: ObjectName::new(kind, &self.namespace, name),
                source,
            }),
        }
    }

    /// Whether the API serves `resource` (KEDA's kinds exist only where KEDA is installed).
    pub async fn serves(&self, resource: &ApiResource) -> Result<bool, Error> {
        match self
            .ctx
            .client
            .list_api_group_resources(&resource.api_version)
            .await
        {
            Ok(list) => Ok(list.resources.iter().any(|r| r.name == resource.plural)),
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(false),
            Err(source) => Err(Error::Read {
                object: ObjectName::new("APIResourceList", "", &resource.api_version),
                source,
            }),
        }
    }

    fn dynamic_api(&self, resource: &ApiResource) -> Api<DynamicObject> {
        Api::namespaced_with(self.ctx.client.clone(), &self.namespace, resource)
    }

    /// [`Applier::apply`] for an object of a kind the operator has no type or cache for
    /// (KEDA's): read from the API, applied when its hash changed, never over an object
    /// this app does not own.
    pub async fn apply_dynamic(
        &self,
        mut obj: DynamicObject,
        resource: &ApiResource,
        problems: &mut Vec<Problem>,
    ) -> Result<(), Error> {
        let name = obj.name_any();
        let object = ObjectName::new(&resource.kind, &self.namespace, &name);
        let hash = digest([serde_json::to_vec(&obj).unwrap_or_default().as_slice()]);
        obj.metadata
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(APPLIED_ANNOTATION.into(), hash.clone());
        let api = self.dynamic_api(resource);
        let live = api.get_opt(&name).await.map_err(|source| Error::Read {
            object: object.clone(),
            source,
        })?;
        if let Some(current) = &live {
            if !is_owned_by(current, &self.uid()) {
                problems.push(Problem {
                    reason: Reason::NameInUse,
                    message: format!(
                        "{object} exists and is not owned by this RealtimeApp: rename the app or remove it"
                    ),
                });
                return Ok(());
            }
            if current.annotations().get(APPLIED_ANNOTATION) == Some(&hash) {
                return Ok(());
            }
        }
        api.patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&obj),
        )
        .await
        .map_err(|source| Error::Apply { object, source })?;
        self.ctx.metrics.writes.inc();
        let reason = if live.is_some() {
            EventReason::Updated
        } else {
            EventReason::Created
        };
        self.event(reason, format!("{reason} {} {name}", resource.kind))
            .await;
        Ok(())
    }

    /// The orphan pass for a kind without a cache: deletes what this app owns of it and no
    /// longer wants. Nothing to do where the API does not serve the kind.
    pub async fn delete_unwanted_dynamic(
        &self,
        wanted: &Children,
        resource: &ApiResource,
    ) -> Result<(), Error> {
        let wanted = wanted.names();
        let api = self.dynamic_api(resource);
        let params = ListParams::default().labels(&children_selector(&self.app.name_any()));
        let owned = match api.list(&params).await {
            Ok(list) => list.items,
            Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
            Err(source) => {
                return Err(Error::List {
                    kind: resource.kind.clone(),
                    app: ObjectName::of(self.app),
                    source,
                });
            }
        };
        for obj in owned.into_iter().filter(|o| is_owned_by(o, &self.uid())) {
            let name = obj.name_any();
            if wanted.contains(&(resource.kind.clone(), name.clone())) {
                continue;
            }
            self.delete_in(&api, &resource.kind, &name, obj.uid())
                .await?;
        }
        Ok(())
    }

    fn uid(&self) -> String {
        self.app.uid().unwrap_or_default()
    }

    async fn event(&self, reason: EventReason, note: String) {
        self.ctx
            .event(self.app, EventType::Normal, reason, note)
            .await;
    }
}
