//! The thread that owns a loaded model: MLX arrays are created, used and
//! freed there and never cross to another thread. Its owner must join it
//! before the process exits: MLX tears its global state down at exit, and
//! arrays freed on another thread at that moment corrupt the heap.

use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// A cloneable handle on such a thread; `join` waits for it once.
#[derive(Clone)]
pub struct ModelThread {
    handle: Arc<Mutex<Option<JoinHandle<()>>>>,
    name: &'static str,
}

impl ModelThread {
    pub fn new(handle: JoinHandle<()>, name: &'static str) -> Self {
        Self {
            handle: Arc::new(Mutex::new(Some(handle))),
            name,
        }
    }

    /// Waits until the thread has ended (after it was told to stop).
    pub fn join(&self) {
        let handle = self.handle.lock().ok().and_then(|mut h| h.take());
        if let Some(handle) = handle
            && handle.join().is_err()
        {
            tracing::error!("the {} thread panicked", self.name);
        }
    }
}
