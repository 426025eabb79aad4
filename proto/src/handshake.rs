//! Handshake (being written).
