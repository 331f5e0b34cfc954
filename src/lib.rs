//! herd
#[cfg(feature = "launcher")]
pub mod launcher;
