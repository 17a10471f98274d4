//! What failed in a reconcile: the step, the object, and the API's answer, as events, logs
//! and the Degraded condition show it (`applying Deployment team/chat: ...`).

use std::fmt;

use kube::{Resource, ResourceExt};

use crate::conditions::Reason;

/// A Kubernetes object as messages name it: `Deployment team/chat`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectName {
    pub kind: String,
    pub namespace: String,
    pub name: String,
}

impl ObjectName {
    pub fn new(kind: &str, namespace: &str, name: &str) -> Self {
        Self {
            kind: kind.to_owned(),
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        }
    }

    /// The name of `obj`, a typed object (its kind from its type).
    pub fn of<K: Resource<DynamicType = ()>>(obj: &K) -> Self {
        Self::new(
            &K::kind(&()),
            &obj.namespace().unwrap_or_default(),
            &obj.name_any(),
        )
    }
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
    }
}

/// A failed request of a reconcile. Messages carry the API server's answer, never an
/// object's content, so no Secret value reaches an event, a log or the status.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {object}: {}", api_message(.source))]
    Read {
        object: ObjectName,
        source: kube::Error,
    },
    #[error("listing the {kind} objects of {app}: {}", api_message(.source))]
    List {
        kind: String,
        app: ObjectName,
        source: kube::Error,
    },
    #[error("creating {object}: {}", api_message(.source))]
    Create {
        object: ObjectName,
        source: kube::Error,
    },
    #[error("applying {object}: {}", api_message(.source))]
    Apply {
        object: ObjectName,
        source: kube::Error,
    },
    #[error("deleting {object}: {}", api_message(.source))]
    Delete {
        object: ObjectName,
        source: kube::Error,
    },
    #[error("writing the status of {object}: {}", api_message(.source))]
    Status {
        object: ObjectName,
        source: kube::Error,
    },
}

/// Every reason [`Error::reason`] gives.
pub const FAILURE_REASONS: [Reason; 3] = [
    Reason::ReadFailed,
    Reason::ApplyFailed,
    Reason::DeleteFailed,
];

impl Error {
    /// The reason of the Degraded condition and the label of the failure metric (one of
    /// [`FAILURE_REASONS`]).
    pub fn reason(&self) -> Reason {
        match self {
            Self::Read { .. } | Self::List { .. } => Reason::ReadFailed,
            Self::Create { .. } | Self::Apply { .. } | Self::Status { .. } => Reason::ApplyFailed,
            Self::Delete { .. } => Reason::DeleteFailed,
        }
    }
}

/// The API server's answer, short: `message (code Reason)`; other errors as kube words them.
fn api_message(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(status) => {
            format!("{} ({} {})", status.message, status.code, status.reason)
        }
        other => other.to_string(),
    }
}
