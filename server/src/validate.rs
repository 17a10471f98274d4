//! Input rules shared by the socket events and the HTTP API.

use socketioxide::socket::Sid;

use crate::error::Failure;

pub const MAX_ROOM_BYTES: usize = 200;

/// Event names Socket.IO clients treat specially; emitting them would confuse clients.
const RESERVED_EVENTS: &[&str] = &[
    "connect",
    "connect_error",
    "disconnect",
    "disconnecting",
    "error",
    "newListener",
    "removeListener",
    "ping",
    "pong",
];

/// Room names: 1 to 200 bytes, no control characters.
pub fn room(name: &str) -> Result<(), Failure> {
    if name.is_empty() || name.len() > MAX_ROOM_BYTES {
        return Err(Failure::invalid(format!(
            "room names are 1 to {MAX_ROOM_BYTES} bytes (got {})",
            name.len()
        )));
    }
    if name.chars().any(char::is_control) {
        return Err(Failure::invalid(
            "room names may not contain control characters",
        ));
    }
    Ok(())
}

/// Event names: non-empty, not reserved, not starting with `chorus:`.
pub fn event(name: &str) -> Result<(), Failure> {
    if name.is_empty() {
        return Err(Failure::invalid("the event name is empty"));
    }
    if name.starts_with("chorus:") || RESERVED_EVENTS.contains(&name) {
        return Err(Failure::invalid(format!(
            "the event name {name:?} is reserved"
        )));
    }
    Ok(())
}

/// A socket id as the server hands them out.
pub fn socket_id(id: &str) -> Result<Sid, Failure> {
    id.parse::<Sid>()
        .map_err(|_| Failure::invalid(format!("{id:?} is not a socket id")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rooms() {
        assert!(room("chat:1").is_ok());
        assert!(room(&"r".repeat(200)).is_ok());
        assert!(room("").is_err());
        assert!(room(&"r".repeat(201)).is_err());
        assert!(room("a\nb").is_err());
        assert!(room("ünïcødé").is_ok());
    }

    #[test]
    fn events() {
        assert!(event("message").is_ok());
        assert!(event("").is_err());
        assert!(event("chorus:x").is_err());
        assert!(event("disconnect").is_err());
        assert!(event("connect").is_err());
    }

    #[test]
    fn socket_ids() {
        let sid = Sid::new();
        assert_eq!(socket_id(&sid.to_string()).ok(), Some(sid));
        assert!(socket_id("nope").is_err());
    }
}
