//! The contract every [`Host`](crate::Host) implementation must keep, as a reusable test suite.
