//! Runs redb calls so that a panic inside redb becomes an error.
//!
//! redb trusts its file: a truncated or scribbled database makes it fail
//! assertions (`page_manager.rs`) or reach `unreachable!()` while walking a
//! B-tree (`btree_iters.rs`). Unchecked, that panic kills the task, and the
//! daemon dies with "task N panicked" without naming the file. Every redb
//! call of the store runs inside [`catching`], which turns the panic into
//! its message and location for a `StoreError` that names the file and
//! says what to do.
//!
//! The default panic hook would still print a "thread panicked" report for
//! a panic that is caught and handled: a process-wide hook, installed once,
//! stays quiet for panics inside [`catching`] (recording their location
//! instead) and hands every other panic to the hook that was there before.

use std::{
    any::Any,
    cell::{Cell, RefCell},
    panic::{self, AssertUnwindSafe},
    sync::Once,
};

thread_local! {
    /// Whether this thread is inside [`catching`].
    static CATCHING: Cell<bool> = const { Cell::new(false) };
    /// Where the last caught panic of this thread happened.
    static LOCATION: RefCell<Option<String>> = const { RefCell::new(None) };
}

fn install_hook() {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if CATCHING.with(Cell::get) {
                let at = info.location().map(|l| {
                    // From the crate's directory on: the registry path
                    // before it says nothing.
                    let file = l.file();
                    let short = file.find("redb-").map_or(file, |i| &file[i..]);
                    format!("{short}:{}", l.line())
                });
                LOCATION.with(|c| *c.borrow_mut() = at);
            } else {
                previous(info);
            }
        }));
    });
}

/// Runs `f`, returning the panic's message and location if it panics.
///
/// `f` is treated as unwind safe: after a panic the store does not trust
/// the database handle's state and reports the file as damaged.
pub(super) fn catching<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    install_hook();
    let outer = CATCHING.with(|c| c.replace(true));
    let result = panic::catch_unwind(AssertUnwindSafe(f));
    CATCHING.with(|c| c.set(outer));
    result.map_err(|payload| {
        let at = LOCATION.with(|c| c.borrow_mut().take());
        let msg = message(payload.as_ref());
        match at {
            Some(at) => format!("redb panicked at {at}: {msg}"),
            None => format!("redb panicked: {msg}"),
        }
    })
}

fn message(payload: &(dyn Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_owned()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "a panic without a message".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_becomes_its_message_and_location() {
        let err = catching(|| -> u8 { panic!("page 7 is bad") }).unwrap_err();
        assert!(err.contains("page 7 is bad"), "{err}");
        assert!(err.contains("guard.rs:"), "{err}");
        assert_eq!(catching(|| 5), Ok(5));
    }

    #[test]
    fn nested_calls_keep_the_outer_guard() {
        let r = catching(|| {
            let inner = catching(|| -> u8 { panic!("inner") });
            assert!(inner.is_err());
            // Still caught by the outer guard, not reported by the hook.
            panic!("outer")
        });
        assert!(r.unwrap_err().contains("outer"));
    }
}
