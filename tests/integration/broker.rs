//! Broker tests (being written).
