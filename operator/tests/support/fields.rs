//! Field ownership, as server-side apply keeps it (managedFields): which manager set which
//! field of an object, so that a field an applier stops sending is removed, and one another
//! manager set is kept.
//!
//! Simplified where the operator does not depend on more: a field is a path to a leaf (a
//! scalar, a list, or an empty map); lists are atomic (the real server merges lists with
//! keys, such as containers by name, item by item); applies are taken as forced (no
//! conflict errors); the status subresource is not tracked.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

pub type Field = Vec<String>;

/// Metadata the server sets: no manager owns it.
const SERVER_SET: [&str; 5] = [
    "resourceVersion",
    "uid",
    "generation",
    "creationTimestamp",
    "managedFields",
];

/// The fields of `obj` (status excluded: it belongs to the subresource).
pub fn fields(obj: &Value) -> BTreeSet<Field> {
    let mut out = BTreeSet::new();
    if let Some(map) = obj.as_object() {
        for (k, v) in map {
            if k == "status" {
                continue;
            }
            if k == "metadata" {
                for (mk, mv) in v.as_object().into_iter().flatten() {
                    if !SERVER_SET.contains(&mk.as_str()) {
                        collect(mv, vec![k.clone(), mk.clone()], &mut out);
                    }
                }
                continue;
            }
            collect(v, vec![k.clone()], &mut out);
        }
    }
    out
}

fn collect(v: &Value, path: Field, out: &mut BTreeSet<Field>) {
    match v.as_object() {
        Some(map) if !map.is_empty() => {
            for (k, child) in map {
                let mut p = path.clone();
                p.push(k.clone());
                collect(child, p, out);
            }
        }
        _ => {
            out.insert(path);
        }
    }
}

fn value_at<'v>(obj: &'v Value, field: &[String]) -> Option<&'v Value> {
    field.iter().try_fold(obj, |v, k| v.get(k))
}

/// Removes `field` from `obj`, and the maps it leaves empty.
fn remove(obj: &mut Value, field: &[String]) {
    let Some((last, parents)) = field.split_last() else {
        return;
    };
    if let Some(parent) = parents.iter().try_fold(&mut *obj, |v, k| v.get_mut(k))
        && let Some(map) = parent.as_object_mut()
    {
        map.remove(last);
        if map.is_empty() && !parents.is_empty() {
            remove(obj, parents);
        }
    }
}

/// The managers of one object: `<manager>/Apply` or `<manager>/Update`, and their fields.
#[derive(Debug, Clone, Default)]
pub struct Managers(BTreeMap<String, BTreeSet<Field>>);

impl Managers {
    /// Server-side apply of `applied` by `manager` onto `live` (None: a create). Fields the
    /// manager applied before and no longer sends are removed unless another manager owns
    /// them; then the applied fields are merged in and the manager owns exactly those.
    /// Another manager loses a field whose value the apply changes (a forced apply).
    pub fn apply(&mut self, manager: &str, live: Option<&Value>, applied: &Value) -> Value {
        let key = format!("{manager}/Apply");
        let sent = fields(applied);
        let mut out = live.cloned().unwrap_or(Value::Null);
        if live.is_some() {
            let before = self.0.get(&key).cloned().unwrap_or_default();
            let others: BTreeSet<&Field> = self
                .0
                .iter()
                .filter(|(m, _)| **m != key)
                .flat_map(|(_, f)| f)
                .collect();
            for field in before.difference(&sent) {
                if !others.contains(field) {
                    remove(&mut out, field);
                }
            }
        }
        self.take(&key, &out, applied, &sent);
        super::store::merge(&mut out, applied);
        self.0.insert(key, sent);
        out
    }

    /// Any other write by `manager` (create, update, patch): it owns the fields whose value
    /// it set or changed.
    pub fn update(&mut self, manager: &str, before: Option<&Value>, after: &Value) {
        let key = format!("{manager}/Update");
        let changed: BTreeSet<Field> = fields(after)
            .into_iter()
            .filter(|f| before.and_then(|b| value_at(b, f)) != value_at(after, f))
            .collect();
        if changed.is_empty() {
            return;
        }
        let before = before.cloned().unwrap_or(Value::Null);
        self.take(&key, &before, after, &changed);
        self.0.entry(key).or_default().extend(changed);
    }

    /// Other managers lose the fields among `fields` whose value goes from `old` to `new`.
    fn take(&mut self, key: &str, old: &Value, new: &Value, fields: &BTreeSet<Field>) {
        for (_, owned) in self.0.iter_mut().filter(|(m, _)| m.as_str() != key) {
            owned.retain(|f| !(fields.contains(f) && value_at(old, f) != value_at(new, f)));
        }
    }
}
