//! The null engine: reads return zeros, everything else succeeds at once, and no request makes a
//! system call. For benchmarks of everything but the storage.

use std::os::fd::RawFd;

use super::{Completion, Engine, Op, StorageError};

/// See the module documentation.
#[derive(Debug, Default)]
pub(crate) struct NullEngine {
    done: Vec<Completion>,
}

impl NullEngine {
    pub fn new() -> Self {
        NullEngine::default()
    }
}

impl Engine for NullEngine {
    fn name(&self) -> &'static str {
        "null"
    }

    fn enqueue(&mut self, token: u64, op: Op) {
        let result = match &op {
            Op::Read { bufs, .. } => bufs.zero_guest(),
            _ => Ok(()),
        };
        self.done.push(Completion { token, result });
    }

    fn submit(&mut self) {}

    fn completion_fd(&self) -> Option<RawFd> {
        None
    }

    fn reap(&mut self, done: &mut Vec<Completion>) {
        done.append(&mut self.done);
    }

    fn wait(&mut self) -> Result<(), StorageError> {
        Ok(())
    }

    fn in_flight(&self) -> usize {
        self.done.len()
    }
}
