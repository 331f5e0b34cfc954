//! Placeholder until the launcher lands.
fn main() {}
