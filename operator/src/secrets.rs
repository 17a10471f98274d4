//! The Secrets a RealtimeApp's pods read: read by name (never listed), the digest of their
//! values (a changed value rolls the pods) and a problem for each one, or key, that is
//! missing.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Secret;
use kube::Api;

use crate::{
    conditions::Reason,
    crd::SecretKeyRef,
    error::{Error, ObjectName},
    resources::digest,
    status::Problem,
};

/// Each Secret `refs` names, read once: None for one that does not exist.
pub async fn read(
    api: &Api<Secret>,
    refs: &[SecretKeyRef],
    ns: &str,
) -> Result<BTreeMap<String, Option<Secret>>, Error> {
    let mut read = BTreeMap::new();
    for r in refs {
        if read.contains_key(&r.name) {
            continue;
        }
        let secret = api.get_opt(&r.name).await.map_err(|source| Error::Read {
            object: ObjectName::new("Secret", ns, &r.name),
            source,
        })?;
        read.insert(r.name.clone(), secret);
    }
    Ok(read)
}

/// The digest of the values `refs` point at in `read`, and a problem for each missing one.
pub fn check(
    read: &BTreeMap<String, Option<Secret>>,
    refs: &[SecretKeyRef],
    ns: &str,
) -> (String, Vec<Problem>) {
    let mut problems = Vec::new();
    let mut parts: Vec<Vec<u8>> = Vec::new();
    for r in refs {
        let Some(secret) = read.get(&r.name).and_then(Option::as_ref) else {
            problems.push(Problem {
                reason: Reason::SecretNotFound,
                message: format!("Secret {ns}/{} not found", r.name),
            });
            continue;
        };
        match value(secret, &r.key) {
            Some(v) => {
                parts.push(format!("{}/{}", r.name, r.key).into_bytes());
                parts.push(v);
            }
            None => problems.push(Problem {
                reason: Reason::SecretKeyNotFound,
                message: format!("Secret {ns}/{} has no key {:?}", r.name, r.key),
            }),
        }
    }
    (digest(parts.iter().map(Vec::as_slice)), problems)
}

fn value(secret: &Secret, key: &str) -> Option<Vec<u8>> {
    secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.clone())
        .or_else(|| {
            secret
                .string_data
                .as_ref()
                .and_then(|d| d.get(key))
                .map(|s| s.clone().into_bytes())
        })
}
