//! The synchronous engine: each operation is a system call on the worker thread, finished before
//! `enqueue` returns. The fallback when io_uring is unavailable.
#![allow(unsafe_code)]

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use nix::fcntl::{fallocate, FallocateFlags};

use super::{
    is_transient, is_unsupported, Completion, Engine, FallocateSupport, IoBuffers, Op,
    StorageError, ZeroBuffer, ZeroStep, PUNCH_HOLE,
};

/// See the module documentation.
#[derive(Debug)]
pub(crate) struct SyncEngine {
    file: Arc<File>,
    done: Vec<Completion>,
    support: FallocateSupport,
    zeroes: Option<ZeroBuffer>,
}

impl SyncEngine {
    pub fn new(file: Arc<File>) -> Self {
        SyncEngine {
            file,
            done: Vec::new(),
            support: FallocateSupport::default(),
            zeroes: None,
        }
    }

    /// Reads or writes all of `bufs` at `offset`, resuming short transfers.
    fn transfer(
        &self,
        op: &'static str,
        offset: u64,
        bufs: &mut IoBuffers,
        flags: Option<libc::c_int>,
    ) -> Result<(), StorageError> {
        let fd = self.file.as_raw_fd();
        while bufs.remaining() > 0 {
            let iov = bufs.pending();
            let pos = offset + bufs.done() as u64;
            // At most UIO_MAXIOV iovecs (IoBuffers bounces more), so the count fits.
            let count = iov.len() as libc::c_int;
            let ret = match flags {
                // SAFETY: `iov` holds `count` iovecs that point into guest memory kept mapped by
                // `bufs` (or into its bounce buffer), each valid for its length; the kernel
                // only reads them during the call.
                Some(flags) => unsafe {
                    libc::pwritev2(fd, iov.as_ptr(), count, pos as libc::off_t, flags)
                },
                // SAFETY: as above; the kernel writes at most `iov_len` bytes to each, all of
                // which are guest buffers the driver made device-writable (or the bounce buffer).
                None => unsafe { libc::preadv(fd, iov.as_ptr(), count, pos as libc::off_t) },
            };
            match ret {
                n if n > 0 => bufs.advance(n as usize),
                0 => {
                    return Err(StorageError::ShortTransfer {
                        op,
                        offset: pos,
                        remaining: bufs.remaining(),
                    })
                }
                _ => {
                    let source = io::Error::last_os_error();
                    if !is_transient(&source) {
                        return Err(StorageError::Io {
                            op,
                            offset: pos,
                            source,
                        });
                    }
                }
            }
        }
        bufs.finish()
    }

    fn fallocate(&self, mode: i32, offset: u64, len: u64) -> io::Result<()> {
        fallocate(
            &*self.file,
            FallocateFlags::from_bits_retain(mode),
            offset as libc::off_t,
            len as libc::off_t,
        )
        .map_err(io::Error::from)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64, unmap: bool) -> Result<(), StorageError> {
        let mut step = self.support.first_step(unmap);
        while let Some(mode) = step.mode() {
            match self.fallocate(mode, offset, len) {
                Ok(()) => return Ok(()),
                Err(e) if is_unsupported(&e) => step = self.support.unsupported(step),
                Err(source) => {
                    return Err(StorageError::Io {
                        op: "write zeroes",
                        offset,
                        source,
                    })
                }
            }
        }
        debug_assert_eq!(step, ZeroStep::Write);
        let zeroes = self.zeroes.get_or_insert_with(ZeroBuffer::new);
        let mut done = 0;
        while done < len {
            let n = (len - done).min(ZeroBuffer::LEN as u64) as usize;
            self.file
                .write_all_at(&zeroes.as_slice()[..n], offset + done)
                .map_err(|source| StorageError::Io {
                    op: "write zeroes",
                    offset: offset + done,
                    source,
                })?;
            done += n as u64;
        }
        Ok(())
    }

    fn run(&mut self, op: Op) -> Result<(), StorageError> {
        match op {
            Op::Read { offset, mut bufs } => self.transfer("read", offset, &mut bufs, None),
            Op::Write {
                offset,
                mut bufs,
                durable,
            } => {
                let flags = if durable { libc::RWF_DSYNC } else { 0 };
                self.transfer("write", offset, &mut bufs, Some(flags))
            }
            Op::Flush => self.file.sync_data().map_err(|source| StorageError::Io {
                op: "flush",
                offset: 0,
                source,
            }),
            Op::Discard { offset, len } => {
                if !self.support.punch_hole {
                    return Ok(());
                }
                match self.fallocate(PUNCH_HOLE, offset, len) {
                    Err(e) if is_unsupported(&e) => {
                        self.support.punch_hole = false;
                        Ok(())
                    }
                    r => r.map_err(|source| StorageError::Io {
                        op: "discard",
                        offset,
                        source,
                    }),
                }
            }
            Op::WriteZeroes { offset, len, unmap } => self.write_zeroes(offset, len, unmap),
        }
    }
}

impl Engine for SyncEngine {
    fn name(&self) -> &'static str {
        "sync"
    }

    fn enqueue(&mut self, token: u64, op: Op) {
        let result = self.run(op);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::temp_file;

    #[test]
    fn write_zeroes_falls_back_to_writing_zeros() {
        let file = temp_file(3 << 20, 0xaa);
        let mut e = SyncEngine::new(Arc::new(file.as_file().try_clone().unwrap()));
        e.support = FallocateSupport {
            punch_hole: false,
            zero_range: false,
        };
        let (offset, len) = (512u64, (3 << 20) - 1024);
        e.enqueue(
            7,
            Op::WriteZeroes {
                offset,
                len,
                unmap: false,
            },
        );
        let mut done = Vec::new();
        e.reap(&mut done);
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].token, 7);
        assert!(done[0].result.is_ok());
        let disk = std::fs::read(file.as_path()).unwrap();
        assert_eq!(disk[..512], [0xaa; 512]);
        assert!(disk[512..(3 << 20) - 512].iter().all(|&b| b == 0));
        assert_eq!(disk[(3 << 20) - 512..], [0xaa; 512]);
    }
}
