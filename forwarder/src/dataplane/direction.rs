//! The two directions of a tunnel, and what each side's failure means.
//!
//! Every plane moves bytes client → backend and backend → client and must
//! tell the access log whose reset ended a tunnel; this is the one place
//! that knows which side a direction reads and writes.

use super::CloseReason;

/// One direction of a tunnel, named after where its bytes go.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    /// Client → backend: reads the client socket, writes the backend's.
    ToBackend,
    /// Backend → client: reads the backend socket, writes the client's.
    ToClient,
}

impl Direction {
    /// Both directions, in the order the planes index them (0, 1).
    pub const BOTH: [Direction; 2] = [Direction::ToBackend, Direction::ToClient];

    /// The direction the other way.
    pub fn opposite(self) -> Direction {
        match self {
            Direction::ToBackend => Direction::ToClient,
            Direction::ToClient => Direction::ToBackend,
        }
    }

    /// 0 for to_backend, 1 for to_client (for per-direction arrays).
    pub fn index(self) -> usize {
        match self {
            Direction::ToBackend => 0,
            Direction::ToClient => 1,
        }
    }

    /// How the tunnel ends when the side this direction reads (its source)
    /// reset or failed: the client's reset for to_backend.
    pub fn source_failed(self) -> CloseReason {
        match self {
            Direction::ToBackend => CloseReason::ClientReset,
            Direction::ToClient => CloseReason::BackendReset,
        }
    }

    /// How the tunnel ends when the side this direction writes (its
    /// destination) reset or failed: the backend's reset for to_backend.
    pub fn destination_failed(self) -> CloseReason {
        self.opposite().source_failed()
    }

    /// The side this direction reads, as logs name it: "client" or "backend".
    pub fn source_name(self) -> &'static str {
        match self {
            Direction::ToBackend => "client",
            Direction::ToClient => "backend",
        }
    }

    /// The direction's label in logs and outcomes: "to_backend" or "to_client".
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::ToBackend => "to_backend",
            Direction::ToClient => "to_client",
        }
    }
}

impl std::fmt::Display for Direction {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_side_failing_names_that_side() {
        assert_eq!(Direction::ToBackend.source_failed(), CloseReason::ClientReset);
        assert_eq!(Direction::ToBackend.destination_failed(), CloseReason::BackendReset);
        assert_eq!(Direction::ToClient.source_failed(), CloseReason::BackendReset);
        assert_eq!(Direction::ToClient.destination_failed(), CloseReason::ClientReset);
        for d in Direction::BOTH {
            assert_eq!(d.opposite().opposite(), d);
            assert_eq!(Direction::BOTH[d.index()], d);
        }
    }
}
