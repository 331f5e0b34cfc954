//! herd
