//! Opening the backing file or block device and learning its size.
#![allow(unsafe_code)]

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::Path;

use vmm_sys_util::ioctl::ioctl_with_mut_ref;
use vmm_sys_util::ioctl_ior_nr;

use crate::request::SECTOR_SIZE;
use crate::BlkError;

// The size of a block device in bytes: `_IOR(0x12, 114, size_t)` in <linux/fs.h>.
ioctl_ior_nr!(BLKGETSIZE64, 0x12, 114, libc::size_t);

/// An open backing file and what the device needs to know about it.
#[derive(Debug)]
pub(crate) struct Backing {
    /// The open file.
    pub file: File,
    /// Its size in bytes (a multiple of 512).
    pub size: u64,
    /// The alignment `O_DIRECT` needs of buffers, lengths and offsets (1 when buffered).
    pub dio_align: usize,
}

/// Opens `path` (read-only if `read_only`, with `O_DIRECT` if `direct`), checks that it is a
/// regular file whose size is a multiple of 512 or a block device, and learns its size.
pub(crate) fn open(path: &Path, read_only: bool, direct: bool) -> Result<Backing, BlkError> {
    let mut options = OpenOptions::new();
    options.read(true).write(!read_only);
    if direct {
        options.custom_flags(libc::O_DIRECT);
    }
    let file = options.open(path).map_err(|source| BlkError::Open {
        path: path.to_owned(),
        source,
    })?;
    let meta = file.metadata().map_err(|source| BlkError::Open {
        path: path.to_owned(),
        source,
    })?;
    let ft = meta.file_type();
    let (size, logical) = if ft.is_block_device() {
        let mut size: u64 = 0;
        // SAFETY: `file` is an open block device and BLKGETSIZE64 writes one u64 (the kernel's
        // size_t on 64-bit targets, which is what the request number encodes) to `size`, which
        // lives for the whole call. The result is checked.
        let ret = unsafe { ioctl_with_mut_ref(&file, BLKGETSIZE64(), &mut size) };
        if ret < 0 {
            return Err(BlkError::Open {
                path: path.to_owned(),
                source: std::io::Error::last_os_error(),
            });
        }
        let mut logical: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one int to `logical`, which lives for the whole call. The
        // result is checked.
        let ret = unsafe { ioctl_with_mut_ref(&file, libc::BLKSSZGET as _, &mut logical) };
        let logical = if ret < 0 {
            512
        } else {
            logical.max(512) as usize
        };
        (size, logical)
    } else if ft.is_file() {
        // Most file systems accept 512-byte aligned direct I/O; one that needs more fails those
        // requests with an I/O error and needs a larger `block_size`.
        (meta.len(), 512)
    } else {
        return Err(BlkError::NotBlockOrFile {
            path: path.to_owned(),
        });
    };
    if size % SECTOR_SIZE != 0 {
        return Err(BlkError::UnalignedSize { size });
    }
    log::debug!(
        "virtio-blk: opened {} fd {} ({size} bytes{})",
        path.display(),
        file.as_raw_fd(),
        if direct { ", O_DIRECT" } else { "" }
    );
    Ok(Backing {
        file,
        size,
        dio_align: if direct { logical } else { 1 },
    })
}
