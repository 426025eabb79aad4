//! Frame codec (being written).
