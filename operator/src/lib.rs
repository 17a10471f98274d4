//! chorus-operator: reconciles `RealtimeApp` resources.
//!
//! Not built yet: the RealtimeApp CRD, desired-state functions and the controller
//! arrive with the operator issue. The crate exists so the workspace has its final shape.
