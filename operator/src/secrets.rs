//! The Secrets a RealtimeApp's pods read: read by name (never listed), a keyed checksum of
//! their values (a changed value rolls the pods) and a problem for each one, or key, that is
//! missing.
//!
//! The checksum lands in a pod-template annotation that anyone who may read Deployments
//! sees; a plain hash of a secret value there could be checked against guesses offline. It
//! is therefore an HMAC-SHA256 keyed with the app's own random key (the generated Secret
//! `<name>-checksum-key`), which only readers of that Secret have.

use std::collections::BTreeMap;

use hmac::{Hmac, Mac};
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use sha2::Sha256;

use crate::{
    conditions::Reason,
    crd::SecretKeyRef,
    error::{Error, ObjectName},
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

/// What [`check`] found.
#[derive(Debug, Default)]
pub struct Checked {
    /// HMAC-SHA256 (hex), keyed with the checksum key, of the values the refs point at.
    pub digest: String,
    /// The value of each ref found, by (Secret name, key).
    pub values: BTreeMap<(String, String), Vec<u8>>,
    /// A problem for each Secret or key missing (the checksum key's included).
    pub problems: Vec<Problem>,
}

/// The keyed digest of the values `refs` point at in `read`, the values, and a problem for
/// each missing one. `key` is the Secret key holding the checksum key.
pub fn check(
    read: &BTreeMap<String, Option<Secret>>,
    refs: &[SecretKeyRef],
    key: &SecretKeyRef,
    ns: &str,
) -> Checked {
    let mut checked = Checked::default();
    let mut parts: Vec<Vec<u8>> = Vec::new();
    for r in refs {
        match lookup(read, r, ns) {
            Ok(v) => {
                parts.push(format!("{}/{}", r.name, r.key).into_bytes());
                parts.push(v.clone());
                checked.values.insert((r.name.clone(), r.key.clone()), v);
            }
            Err(problem) => checked.problems.push(problem),
        }
    }
    match lookup(read, key, ns) {
        Ok(k) => checked.digest = keyed_digest(&k, parts.iter().map(Vec::as_slice)),
        Err(problem) => checked.problems.push(problem),
    }
    checked
}

fn lookup(
    read: &BTreeMap<String, Option<Secret>>,
    r: &SecretKeyRef,
    ns: &str,
) -> Result<Vec<u8>, Problem> {
    let Some(secret) = read.get(&r.name).and_then(Option::as_ref) else {
        return Err(Problem {
            reason: Reason::SecretNotFound,
            message: format!("Secret {ns}/{} not found", r.name),
        });
    };
    value(secret, &r.key).ok_or_else(|| Problem {
        reason: Reason::SecretKeyNotFound,
        message: format!("Secret {ns}/{} has no key {:?}", r.name, r.key),
    })
}

/// HMAC-SHA256 of the length-prefixed parts, hex.
pub fn keyed_digest<'p>(key: &[u8], parts: impl IntoIterator<Item = &'p [u8]>) -> String {
    // HMAC takes a key of any length (a longer one is hashed first): this cannot fail.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(key) else {
        unreachable!("HMAC-SHA256 accepts keys of every length")
    };
    for p in parts {
        mac.update(&(p.len() as u64).to_be_bytes());
        mac.update(p);
    }
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The value of `key` in `secret` (`data`, else `stringData` of an object not stored yet).
pub fn value(secret: &Secret, key: &str) -> Option<Vec<u8>> {
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
