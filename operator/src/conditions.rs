//! What the operator says about a RealtimeApp: its condition types, every reason a condition
//! can carry, and the reasons of its events, in one place (docs/operator.md, "Status", lists
//! the same).

/// An enum of unit variants whose names are what the API shows, with `ALL` and `as_str`.
macro_rules! names {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident),* $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub enum $name {
            $($(#[$vdoc])* $variant),*
        }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [Self] = &[$(Self::$variant),*];

            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => stringify!($variant)),*
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

names!(
    /// The condition types, in the order the status lists them.
    ConditionType {
        /// Redis ready, servers available, and no problem.
        Ready,
        RedisReady,
        ServersAvailable,
        /// A rollout is under way.
        Progressing,
        /// Something needs a person.
        Degraded,
        /// The autoscaler works (True also while autoscaling is off).
        AutoscalingReady,
    }
);

names!(
    /// Why a condition has its status.
    Reason {
        /// Ready is True.
        Ready,
        /// RedisReady: the managed Redis pod is ready (every bus, with several).
        RedisReady,
        /// RedisReady (still True) and Degraded: some of several Redis buses are down, the
        /// app runs on the others.
        SomeBusesDown,
        /// RedisReady: an external Redis, not probed.
        ExternalRedis,
        /// RedisReady is False (and so is Ready, when nothing worse is wrong).
        RedisNotReady,
        /// ServersAvailable: at least one server replica ready and available.
        ReplicasAvailable,
        /// ServersAvailable: 0 replicas wanted.
        ScaledToZero,
        /// ServersAvailable is False.
        NoReplicasAvailable,
        /// ServersAvailable is False: no server Deployment (yet).
        DeploymentMissing,
        /// Progressing is True.
        RollingOut,
        /// Progressing is False: every replica up to date.
        RolloutComplete,
        /// Progressing is False: nothing to roll out yet.
        Waiting,
        /// Degraded is False.
        AsExpected,
        /// A problem: a Secret the pods read does not exist.
        SecretNotFound,
        /// A problem: a Secret the pods read lacks the key.
        SecretKeyNotFound,
        /// A problem: a spec the API server should have refused (an older CRD).
        InvalidSpec,
        /// A problem: a child's name is taken by an object this app does not own.
        NameInUse,
        /// A reconcile failed reading from the API.
        ReadFailed,
        /// A reconcile failed writing to the API (apply, create, status).
        ApplyFailed,
        /// A reconcile failed deleting a child no longer wanted.
        DeleteFailed,
        /// AutoscalingReady: autoscaling is off, spec.replicas is set by hand.
        Disabled,
        /// AutoscalingReady: the autoscaler reads its signals and sets the replicas.
        Active,
        /// AutoscalingReady is False: the Operator engine could read none of its signals.
        NoReadings,
        /// AutoscalingReady is False: the engine's API (KEDA) is not installed.
        EngineMissing,
        /// AutoscalingReady is False: the HPA says it cannot scale (its message follows).
        EngineNotScaling,
    }
);

names!(
    /// The reason of an event on a RealtimeApp.
    EventReason {
        /// A generated Secret was created.
        SecretCreated,
        /// A child was created.
        Created,
        /// A child was changed.
        Updated,
        /// A child no longer wanted was deleted.
        Deleted,
        /// Ready turned True.
        Ready,
        /// Ready turned False.
        NotReady,
        /// A reconcile failed; the note says which step on which object.
        ReconcileFailed,
    }
);
