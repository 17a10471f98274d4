//! The writes of one reconcile to one app's children: generated Secrets created once,
//! server-side apply of what changed (field manager `chorus-operator`, forced), deletion of
//! what is no longer wanted. Each failure names its step and object.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use kube::{
    Api, ResourceExt,
    api::{DeleteParams, Patch, PatchParams, PostParams},
    runtime::events::EventType,
};

use crate::{
    cache::Cached,
    crd::RealtimeApp,
    error::{Error, ObjectName},
    reconcile::Context,
    resources::{MANAGER, digest},
};

/// The hash of what the operator last applied to a child; equal hash, nothing to apply.
pub const APPLIED_ANNOTATION: &str = "chorus.rs/applied-hash";

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

    pub fn api<K: Cached>(&self) -> Api<K> {
        Api::namespaced(self.ctx.client.clone(), &self.namespace)
    }

    fn object<K: Cached>(&self, name: &str) -> ObjectName {
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

    /// Creates a generated Secret unless it exists; never updates it, so a value is never
    /// rotated by accident.
    pub async fn create_once(&self, secret: Secret) -> Result<(), Error> {
        let name = secret.name_any();
        if self.live::<Secret>(&name).await?.is_some() {
            return Ok(());
        }
        match self
            .api::<Secret>()
            .create(&PostParams::default(), &secret)
            .await
        {
            Ok(_) => {
                self.ctx.metrics.writes.inc();
                self.event("SecretCreated", format!("created Secret {name}"))
                    .await;
                Ok(())
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(()), // created meanwhile
            Err(source) => Err(Error::Create {
                object: self.object::<Secret>(&name),
                source,
            }),
        }
    }

    /// Applies `obj` unless the live object already carries the same applied hash. Returns
    /// the live object, for its status (from the caches it has metadata and status only).
    pub async fn apply<K: Cached>(&self, mut obj: K) -> Result<K, Error> {
        let name = obj.name_any();
        let hash = digest([serde_json::to_vec(&obj).unwrap_or_default().as_slice()]);
        obj.meta_mut()
            .annotations
            .get_or_insert_with(BTreeMap::new)
            .insert(APPLIED_ANNOTATION.into(), hash.clone());
        let live = self.live::<K>(&name).await?;
        if let Some(live) = live.as_ref()
            && live.annotations().get(APPLIED_ANNOTATION) == Some(&hash)
        {
            return Ok(live.clone());
        }
        let applied = self
            .api::<K>()
            .patch(
                &name,
                &PatchParams::apply(MANAGER).force(),
                &Patch::Apply(&obj),
            )
            .await
            .map_err(|source| Error::Apply {
                object: self.object::<K>(&name),
                source,
            })?;
        self.ctx.metrics.writes.inc();
        let verb = if live.is_some() { "Updated" } else { "Created" };
        self.event(verb, format!("{verb} {} {name}", K::kind(&())))
            .await;
        Ok(applied)
    }

    /// Deletes a child this app owns and no longer wants.
    pub async fn delete_owned<K: Cached>(&self, name: &str) -> Result<(), Error> {
        let Some(live) = self.live::<K>(name).await? else {
            return Ok(());
        };
        let uid = self.app.uid().unwrap_or_default();
        if !live.owner_references().iter().any(|o| o.uid == uid) {
            return Ok(()); // someone else's object of the same name: not ours to delete
        }
        match self.api::<K>().delete(name, &DeleteParams::default()).await {
            Ok(_) => {
                self.ctx.metrics.writes.inc();
                self.event("Deleted", format!("deleted {} {name}", K::kind(&())))
                    .await;
                Ok(())
            }
            Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
            Err(source) => Err(Error::Delete {
                object: self.object::<K>(name),
                source,
            }),
        }
    }

    async fn event(&self, reason: &str, note: String) {
        self.ctx
            .event(self.app, EventType::Normal, reason, note)
            .await;
    }
}
