//! Pause points for tests that interleave requests at their Redis steps (not part of the API).
//!
//! A test installs one hook per process with [`install`]; the session layer then awaits it before
//! each Redis step of a session (and after a save, so that a test can hold a request between its
//! write and its response). Without a hook, each pause point is one atomic load.

use std::future::Future;
use std::pin::Pin;
use std::sync::OnceLock;

/// A Redis step of the session layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Step {
    /// Before a session is read (`HGETALL`).
    Load,
    /// Before a save is sent (a write, an increment, a cycle).
    Save,
    /// After a save was answered, before the request goes on.
    Saved,
    /// Before a logout deletes a session.
    Destroy,
    /// Before "log out everywhere" deletes the sessions it read from the owner's index.
    DestroyOwner,
}

/// The future a hook returns.
pub type Paused = Pin<Box<dyn Future<Output = ()> + Send>>;

type Hook = Box<dyn Fn(Step) -> Paused + Send + Sync>;

static HOOK: OnceLock<Hook> = OnceLock::new();

/// Installs the process's hook; `false` if one was installed before (it stays).
pub fn install(hook: impl Fn(Step) -> Paused + Send + Sync + 'static) -> bool {
    HOOK.set(Box::new(hook)).is_ok()
}

/// Awaits the hook, if one is installed.
pub(crate) async fn at(step: Step) {
    if let Some(hook) = HOOK.get() {
        hook(step).await;
    }
}
