//! Requests at the trust boundary: a descriptor chain the driver made becomes a validated
//! [`BlkRequest`] before any device logic runs (VIRTIO 1.2, section 5.2.6).
//!
//! Framing is free: the 16-byte header is the first 16 device-readable bytes, whatever the
//! descriptors; the status is the last byte of the last device-writable descriptor; the data is
//! what lies between. Everything the driver wrote is checked: descriptor direction, lengths,
//! sector ranges (overflow-safe), segment limits, discard and write-zeroes ranges and flags, and
//! that every buffer lies in guest memory. virtio-queue stops iterating a chain that loops, leaves
//! the descriptor table or an indirect table, or grows past 4 GiB; such a chain ends with a
//! descriptor that still points to a next one, and is refused here as broken.

mod chain;
mod error;

use outboard_virtio::chain::DescriptorWalk;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use vm_memory::GuestAddress;

use crate::config::{MAX_SEGMENTS, SERIAL_LEN};
use chain::{check_in_memory, read_bytes, skip_front, sum_len, without_status, ChainLayout};
use outboard_virtio::GuestMemoryMmap;

pub use chain::locate_status;
pub use error::RequestError;

/// The unit of `sector` fields and of the capacity, whatever the block size.
pub const SECTOR_SIZE: u64 = 512;
/// The size of the request header (`struct virtio_blk_outhdr`).
const HEADER_LEN: u64 = 16;
/// The size of one discard or write-zeroes range (`struct virtio_blk_discard_write_zeroes`).
const RANGE_LEN: usize = 16;
/// How many descriptors of each direction are kept while walking a chain; a chain with more is
/// refused (the data segments alone may not exceed [`MAX_SEGMENTS`]).
const KEEP_DESCRIPTORS: usize = MAX_SEGMENTS as usize + 4;

/// One guest buffer (or the part of one that carries data).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    /// Guest-physical address of the first byte.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
}

/// One range of a discard or write-zeroes request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SectorRange {
    /// The first sector.
    pub sector: u64,
    /// The number of sectors.
    pub num_sectors: u32,
    /// Write zeroes only: the driver allows the range to be deallocated.
    pub unmap: bool,
}

/// Limits of the discard or write-zeroes command as negotiated.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RangeLimit {
    /// The most sectors one range may cover.
    pub max_sectors: u32,
    /// The most ranges one request may carry.
    pub max_segments: u32,
}

/// What requests are checked against: the device's size and the limits the driver negotiated.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestLimits {
    /// The capacity in 512-byte sectors.
    pub capacity: u64,
    /// Writes are refused.
    pub read_only: bool,
    /// The most data segments of a read or write.
    pub seg_max: u32,
    /// The largest data segment of a read or write, in bytes.
    pub size_max: u32,
    /// The discard command, if negotiated.
    pub discard: Option<RangeLimit>,
    /// The write-zeroes command, if negotiated.
    pub write_zeroes: Option<RangeLimit>,
}

/// What a request asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// `VIRTIO_BLK_T_IN`: read sectors into device-writable `data`.
    Read {
        /// The first sector.
        sector: u64,
        /// Where the data goes.
        data: Vec<Segment>,
    },
    /// `VIRTIO_BLK_T_OUT`: write device-readable `data` to sectors.
    Write {
        /// The first sector.
        sector: u64,
        /// Where the data comes from.
        data: Vec<Segment>,
    },
    /// `VIRTIO_BLK_T_FLUSH`: make every completed write durable.
    Flush,
    /// `VIRTIO_BLK_T_GET_ID`: write the 20-byte serial number into `data`.
    GetId {
        /// Where the serial goes (at least 20 bytes).
        data: Vec<Segment>,
    },
    /// `VIRTIO_BLK_T_DISCARD`: the ranges may be deallocated.
    Discard {
        /// The ranges.
        ranges: Vec<SectorRange>,
    },
    /// `VIRTIO_BLK_T_WRITE_ZEROES`: the ranges must read back as zeros.
    WriteZeroes {
        /// The ranges.
        ranges: Vec<SectorRange>,
    },
}

/// A validated request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlkRequest {
    head: u16,
    kind: RequestKind,
    status: GuestAddress,
}

fn check_sectors(sector: u64, sectors: u64, capacity: u64) -> Result<(), RequestError> {
    match sector.checked_add(sectors) {
        Some(end) if end <= capacity => Ok(()),
        _ => Err(RequestError::OutOfRange {
            sector,
            sectors,
            capacity,
        }),
    }
}

/// Checks the data of a read or write.
fn check_data(
    mem: &GuestMemoryMmap,
    data: &[Segment],
    sector: u64,
    limits: &RequestLimits,
) -> Result<(), RequestError> {
    let len = sum_len(data);
    if len % SECTOR_SIZE != 0 {
        return Err(RequestError::UnalignedLength { len });
    }
    if data.len() > limits.seg_max as usize {
        return Err(RequestError::TooManySegments {
            segments: data.len(),
            max: limits.seg_max,
        });
    }
    if let Some(s) = data.iter().find(|s| s.len > limits.size_max) {
        return Err(RequestError::SegmentTooLarge {
            len: s.len,
            max: limits.size_max,
        });
    }
    check_sectors(sector, len / SECTOR_SIZE, limits.capacity)?;
    check_in_memory(mem, data)
}

impl BlkRequest {
    /// Validates the chain `chain` against `limits`. On error the request is answered with
    /// [`RequestError::status`] at [`locate_status`], if there is one.
    pub fn parse<C: DescriptorWalk>(
        chain: C,
        mem: &GuestMemoryMmap,
        limits: &RequestLimits,
    ) -> Result<Self, RequestError> {
        let head = chain.head_index();
        let l = ChainLayout::walk(chain);
        let status = l.status(mem)?;
        if l.broken {
            return Err(RequestError::BrokenChain {
                descriptors: l.descriptors,
            });
        }
        if let Some(index) = l.misordered {
            return Err(RequestError::ReadableAfterWritable { index });
        }
        if l.readable_len < HEADER_LEN {
            return Err(RequestError::ShortHeader {
                readable: l.readable_len,
            });
        }
        let mut header = [0u8; HEADER_LEN as usize];
        read_bytes(mem, &l.readable, 0, &mut header)?;
        let [t0, t1, t2, t3, _, _, _, _, s @ ..] = header;
        let request_type = u32::from_le_bytes([t0, t1, t2, t3]);
        let sector = u64::from_le_bytes(s);
        let too_many = l.readable_count.max(l.writable_count);
        if too_many > KEEP_DESCRIPTORS {
            return Err(RequestError::TooManySegments {
                segments: too_many,
                max: limits.seg_max,
            });
        }
        let only_header = || match l.readable_len - HEADER_LEN {
            0 => Ok(()),
            len => Err(RequestError::UnexpectedReadable { request_type, len }),
        };
        let only_status = || match l.writable_len - 1 {
            0 => Ok(()),
            len => Err(RequestError::UnexpectedWritable { request_type, len }),
        };
        let read_only = || match limits.read_only {
            true => Err(RequestError::ReadOnly { request_type }),
            false => Ok(()),
        };
        let kind = match request_type {
            VIRTIO_BLK_T_IN => {
                only_header()?;
                let data = without_status(&l.writable);
                check_data(mem, &data, sector, limits)?;
                RequestKind::Read { sector, data }
            }
            VIRTIO_BLK_T_OUT => {
                read_only()?;
                only_status()?;
                let data = skip_front(&l.readable, HEADER_LEN)?;
                check_data(mem, &data, sector, limits)?;
                RequestKind::Write { sector, data }
            }
            VIRTIO_BLK_T_FLUSH => {
                only_header()?;
                only_status()?;
                RequestKind::Flush
            }
            VIRTIO_BLK_T_GET_ID => {
                only_header()?;
                let data = without_status(&l.writable);
                let len = sum_len(&data);
                if len < SERIAL_LEN as u64 {
                    return Err(RequestError::GetIdBufferTooSmall { len });
                }
                check_in_memory(mem, &data)?;
                RequestKind::GetId { data }
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
                let discard = request_type == VIRTIO_BLK_T_DISCARD;
                let limit = if discard {
                    limits.discard
                } else {
                    limits.write_zeroes
                };
                let limit = limit.ok_or(RequestError::Unsupported { request_type })?;
                read_only()?;
                only_status()?;
                let ranges = read_ranges(mem, &l, request_type, limit, limits.capacity)?;
                if discard {
                    RequestKind::Discard { ranges }
                } else {
                    RequestKind::WriteZeroes { ranges }
                }
            }
            _ => return Err(RequestError::Unsupported { request_type }),
        };
        Ok(BlkRequest { head, kind, status })
    }

    /// The index of the chain's head descriptor (the used entry's id).
    pub fn head(&self) -> u16 {
        self.head
    }

    /// What the request asks for.
    pub fn kind(&self) -> &RequestKind {
        &self.kind
    }

    /// Where the status byte goes.
    pub fn status_addr(&self) -> GuestAddress {
        self.status
    }

    /// Takes the request apart: head, kind, status address.
    pub fn into_parts(self) -> (u16, RequestKind, GuestAddress) {
        (self.head, self.kind, self.status)
    }
}

/// The little-endian fields of one `struct virtio_blk_discard_write_zeroes`: sector,
/// num_sectors, flags.
fn range_fields(chunk: &[u8]) -> (u64, u32, u32) {
    let mut b = [0u8; RANGE_LEN];
    b.copy_from_slice(chunk);
    let [s0, s1, s2, s3, s4, s5, s6, s7, n0, n1, n2, n3, f0, f1, f2, f3] = b;
    (
        u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]),
        u32::from_le_bytes([n0, n1, n2, n3]),
        u32::from_le_bytes([f0, f1, f2, f3]),
    )
}

/// Reads and checks the ranges of a discard or write-zeroes request.
fn read_ranges(
    mem: &GuestMemoryMmap,
    l: &ChainLayout,
    request_type: u32,
    limit: RangeLimit,
    capacity: u64,
) -> Result<Vec<SectorRange>, RequestError> {
    let len = l.readable_len - HEADER_LEN;
    if len == 0 || len % RANGE_LEN as u64 != 0 {
        return Err(RequestError::BadRangePayload { len });
    }
    let count = (len / RANGE_LEN as u64) as usize;
    if count > limit.max_segments as usize {
        return Err(RequestError::TooManyRanges {
            count,
            max: limit.max_segments,
        });
    }
    let mut raw = vec![0u8; count * RANGE_LEN];
    read_bytes(mem, &l.readable, HEADER_LEN, &mut raw)?;
    let allowed = if request_type == VIRTIO_BLK_T_WRITE_ZEROES {
        VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
    } else {
        0
    };
    let ranges: Vec<SectorRange> = raw
        .chunks_exact(RANGE_LEN)
        .map(range_fields)
        .map(|(sector, num_sectors, flags)| {
            if flags & !allowed != 0 {
                return Err(RequestError::UnsupportedFlags {
                    request_type,
                    flags,
                });
            }
            Ok(SectorRange {
                sector,
                num_sectors,
                unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
            })
        })
        .collect::<Result<_, _>>()?;
    for r in &ranges {
        if r.num_sectors > limit.max_sectors {
            return Err(RequestError::RangeTooLarge {
                num_sectors: r.num_sectors,
                max: limit.max_sectors,
            });
        }
        check_sectors(r.sector, u64::from(r.num_sectors), capacity)?;
    }
    Ok(ranges)
}

#[cfg(test)]
mod tests {
    use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::Bytes;

    use super::*;

    pub(crate) const W: u16 = VRING_DESC_F_WRITE as u16;
    pub(crate) const LIMITS: RequestLimits = RequestLimits {
        capacity: 2048,
        read_only: false,
        seg_max: 4,
        size_max: 8192,
        discard: Some(RangeLimit {
            max_sectors: 64,
            max_segments: 2,
        }),
        write_zeroes: Some(RangeLimit {
            max_sectors: 64,
            max_segments: 2,
        }),
    };

    pub(crate) fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap()
    }

    pub(crate) fn header(mem: &GuestMemoryMmap, addr: u64, request_type: u32, sector: u64) {
        mem.write_obj(request_type.to_le(), GuestAddress(addr))
            .unwrap();
        mem.write_obj(sector.to_le(), GuestAddress(addr + 8))
            .unwrap();
    }

    fn range_at(mem: &GuestMemoryMmap, addr: u64, sector: u64, n: u32, flags: u32) {
        mem.write_obj(sector.to_le(), GuestAddress(addr)).unwrap();
        mem.write_obj(n.to_le(), GuestAddress(addr + 8)).unwrap();
        mem.write_obj(flags.to_le(), GuestAddress(addr + 12))
            .unwrap();
    }

    /// Parses the chain of `(addr, len, flags)` descriptors (NEXT is added).
    fn parse_with(
        mem: &GuestMemoryMmap,
        descs: &[(u64, u32, u16)],
        limits: &RequestLimits,
    ) -> Result<BlkRequest, RequestError> {
        let q = MockSplitQueue::new(mem, 16);
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .map(|&(a, l, f)| RawDescriptor::from(SplitDescriptor::new(a, l, f, 0)))
            .collect();
        let chain = q.build_desc_chain(&raw).unwrap();
        BlkRequest::parse(chain, mem, limits)
    }

    pub(crate) fn parse(
        mem: &GuestMemoryMmap,
        descs: &[(u64, u32, u16)],
    ) -> Result<BlkRequest, RequestError> {
        parse_with(mem, descs, &LIMITS)
    }

    #[test]
    fn framing_is_free_header_data_and_status_may_share_descriptors() {
        let mem = memory();
        // A write whose header and data share one descriptor, and whose data spills into a
        // second one.
        header(&mem, 0x1_0000, VIRTIO_BLK_T_OUT, 7);
        let r = parse(
            &mem,
            &[
                (0x1_0000, 16 + 512, 0),
                (0x2_0000, 512, 0),
                (0x3_0000, 1, W),
            ],
        )
        .unwrap();
        assert_eq!(r.status_addr(), GuestAddress(0x3_0000));
        let want = vec![
            Segment {
                addr: GuestAddress(0x1_0010),
                len: 512,
            },
            Segment {
                addr: GuestAddress(0x2_0000),
                len: 512,
            },
        ];
        assert_eq!(
            r.kind(),
            &RequestKind::Write {
                sector: 7,
                data: want
            }
        );
        // A read whose status byte is the last byte of its data descriptor, and whose header is
        // split over two descriptors.
        header(&mem, 0x1_0000, VIRTIO_BLK_T_IN, 9);
        let r = parse(
            &mem,
            &[(0x1_0000, 10, 0), (0x1_000a, 6, 0), (0x4_0000, 1025, W)],
        )
        .unwrap();
        assert_eq!(r.status_addr(), GuestAddress(0x4_0400));
        let want = vec![Segment {
            addr: GuestAddress(0x4_0000),
            len: 1024,
        }];
        assert_eq!(
            r.kind(),
            &RequestKind::Read {
                sector: 9,
                data: want
            }
        );
    }

    #[test]
    fn limits_on_segments_and_sizes_are_enforced() {
        let mem = memory();
        header(&mem, 0x1_0000, VIRTIO_BLK_T_IN, 0);
        let five: Vec<_> = std::iter::once((0x1_0000, 16, 0))
            .chain((0..5).map(|i| (0x2_0000 + i * 0x1000, 512, W)))
            .chain(std::iter::once((0x3_0000, 1, W)))
            .collect();
        let e = parse(&mem, &five).unwrap_err();
        assert!(
            matches!(
                e,
                RequestError::TooManySegments {
                    segments: 5,
                    max: 4
                }
            ),
            "{e}"
        );
        let e = parse(
            &mem,
            &[(0x1_0000, 16, 0), (0x2_0000, 8704, W), (0x3_0000, 1, W)],
        )
        .unwrap_err();
        assert!(
            matches!(e, RequestError::SegmentTooLarge { len: 8704, .. }),
            "{e}"
        );
        // Not negotiated, the same limits do not bind.
        let open = RequestLimits {
            seg_max: MAX_SEGMENTS,
            size_max: u32::MAX,
            ..LIMITS
        };
        assert!(parse_with(&mem, &five, &open).is_ok());
    }

    #[test]
    fn sector_ranges_are_checked_without_overflow() {
        let mem = memory();
        for (sector, ok) in [
            (2046, true),
            (2047, false),
            (u64::MAX - 1, false),
            (u64::MAX, false),
        ] {
            header(&mem, 0x1_0000, VIRTIO_BLK_T_IN, sector);
            let r = parse(
                &mem,
                &[(0x1_0000, 16, 0), (0x2_0000, 1024, W), (0x3_0000, 1, W)],
            );
            match r {
                Ok(_) => assert!(ok, "sector {sector} accepted"),
                Err(e) => {
                    assert!(!ok, "sector {sector} refused: {e}");
                    assert!(matches!(e, RequestError::OutOfRange { .. }), "{e}");
                    assert_eq!(e.status(), VIRTIO_BLK_S_IOERR as u8);
                }
            }
        }
    }

    #[test]
    fn discard_and_write_zeroes_ranges_are_validated() {
        let mem = memory();
        let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
        let run = |request_type, ranges: &[(u64, u32, u32)]| {
            header(&mem, 0x1_0000, request_type, 0);
            for (i, &(s, n, f)) in ranges.iter().enumerate() {
                range_at(&mem, 0x2_0000 + 16 * i as u64, s, n, f);
            }
            let len = 16 * ranges.len() as u32;
            parse(
                &mem,
                &[(0x1_0000, 16, 0), (0x2_0000, len, 0), (0x3_0000, 1, W)],
            )
        };
        let r = run(VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 8, unmap), (100, 64, 0)]).unwrap();
        let want = vec![
            SectorRange {
                sector: 0,
                num_sectors: 8,
                unmap: true,
            },
            SectorRange {
                sector: 100,
                num_sectors: 64,
                unmap: false,
            },
        ];
        assert_eq!(r.kind(), &RequestKind::WriteZeroes { ranges: want });
        let e = run(VIRTIO_BLK_T_DISCARD, &[(0, 8, unmap)]).unwrap_err();
        assert!(
            matches!(e, RequestError::UnsupportedFlags { flags: 1, .. }),
            "{e}"
        );
        assert_eq!(e.status(), VIRTIO_BLK_S_UNSUPP as u8);
        let e = run(VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 8, 4)]).unwrap_err();
        assert_eq!(e.status(), VIRTIO_BLK_S_UNSUPP as u8);
        let e = run(VIRTIO_BLK_T_DISCARD, &[(0, 1, 0), (1, 1, 0), (2, 1, 0)]).unwrap_err();
        assert!(
            matches!(e, RequestError::TooManyRanges { count: 3, max: 2 }),
            "{e}"
        );
        let e = run(VIRTIO_BLK_T_DISCARD, &[(0, 65, 0)]).unwrap_err();
        assert!(
            matches!(
                e,
                RequestError::RangeTooLarge {
                    num_sectors: 65,
                    ..
                }
            ),
            "{e}"
        );
        let e = run(VIRTIO_BLK_T_DISCARD, &[(2040, 9, 0)]).unwrap_err();
        assert!(matches!(e, RequestError::OutOfRange { .. }), "{e}");
        let e = run(VIRTIO_BLK_T_DISCARD, &[(u64::MAX, 1, 0)]).unwrap_err();
        assert!(matches!(e, RequestError::OutOfRange { .. }), "{e}");
        let e = run(VIRTIO_BLK_T_DISCARD, &[]).unwrap_err();
        assert!(matches!(e, RequestError::BadRangePayload { len: 0 }), "{e}");
        header(&mem, 0x1_0000, VIRTIO_BLK_T_DISCARD, 0);
        let e = parse(
            &mem,
            &[(0x1_0000, 16, 0), (0x2_0000, 20, 0), (0x3_0000, 1, W)],
        );
        assert!(
            matches!(e, Err(RequestError::BadRangePayload { len: 20 })),
            "{e:?}"
        );
        let none = RequestLimits {
            discard: None,
            ..LIMITS
        };
        let e = parse_with(
            &mem,
            &[(0x1_0000, 16, 0), (0x2_0000, 16, 0), (0x3_0000, 1, W)],
            &none,
        );
        assert!(matches!(e, Err(RequestError::Unsupported { .. })), "{e:?}");
    }

    #[test]
    fn direction_and_shape_errors_are_io_errors() {
        let mem = memory();
        header(&mem, 0x1_0000, VIRTIO_BLK_T_FLUSH, 0);
        type Case<'a> = (&'a [(u64, u32, u16)], fn(&RequestError) -> bool);
        let cases: [Case; 5] = [
            // The header in a writable descriptor.
            (&[(0x1_0000, 16, W), (0x3_0000, 1, W)], |e| {
                matches!(e, RequestError::ShortHeader { readable: 0 })
            }),
            // A readable descriptor after a writable one.
            (
                &[
                    (0x1_0000, 16, 0),
                    (0x2_0000, 8, W),
                    (0x2_1000, 8, 0),
                    (0x3_0000, 1, W),
                ],
                |e| matches!(e, RequestError::ReadableAfterWritable { index: 2 }),
            ),
            // A flush with data either way.
            (
                &[(0x1_0000, 16, 0), (0x2_0000, 512, 0), (0x3_0000, 1, W)],
                |e| matches!(e, RequestError::UnexpectedReadable { len: 512, .. }),
            ),
            (
                &[(0x1_0000, 16, 0), (0x2_0000, 512, W), (0x3_0000, 1, W)],
                |e| matches!(e, RequestError::UnexpectedWritable { len: 512, .. }),
            ),
            // A header that runs out of guest memory.
            (&[(0x20_0000 - 8, 16, 0), (0x3_0000, 1, W)], |e| {
                matches!(e, RequestError::GuestMemory { .. })
            }),
        ];
        for (i, (descs, expected)) in cases.iter().enumerate() {
            let e = parse(&mem, descs).unwrap_err();
            assert!(expected(&e), "case {i}: {e}");
            assert_eq!(e.status(), VIRTIO_BLK_S_IOERR as u8, "case {i}");
        }
    }

    #[test]
    fn writes_to_a_read_only_device_and_small_get_id_buffers_are_refused() {
        let mem = memory();
        let ro = RequestLimits {
            read_only: true,
            ..LIMITS
        };
        header(&mem, 0x1_0000, VIRTIO_BLK_T_OUT, 0);
        let e = parse_with(
            &mem,
            &[(0x1_0000, 16, 0), (0x2_0000, 512, 0), (0x3_0000, 1, W)],
            &ro,
        );
        assert!(matches!(e, Err(RequestError::ReadOnly { .. })), "{e:?}");
        header(&mem, 0x1_0000, VIRTIO_BLK_T_GET_ID, 0);
        let e = parse(
            &mem,
            &[(0x1_0000, 16, 0), (0x2_0000, 19, W), (0x3_0000, 1, W)],
        );
        assert!(
            matches!(e, Err(RequestError::GetIdBufferTooSmall { len: 19 })),
            "{e:?}"
        );
        let r = parse(&mem, &[(0x1_0000, 16, 0), (0x2_0000, 21, W)]).unwrap();
        let want = vec![Segment {
            addr: GuestAddress(0x2_0000),
            len: 20,
        }];
        assert_eq!(r.kind(), &RequestKind::GetId { data: want });
    }

    #[test]
    fn random_chains_never_panic_and_accepted_requests_are_sound() {
        let mem = memory();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut rand = move || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        let types = [
            VIRTIO_BLK_T_IN,
            VIRTIO_BLK_T_OUT,
            VIRTIO_BLK_T_FLUSH,
            VIRTIO_BLK_T_GET_ID,
            VIRTIO_BLK_T_DISCARD,
            VIRTIO_BLK_T_WRITE_ZEROES,
            3,
        ];
        let mut accepted = 0;
        for _ in 0..2000 {
            let q = MockSplitQueue::new(&mem, 16);
            let n = 1 + rand() % 6;
            let raw: Vec<RawDescriptor> = (0..n)
                .map(|i| {
                    // Mostly sane buffers, sometimes hostile ones.
                    let addr = match rand() % 8 {
                        0 => rand(),
                        1 => 0x20_0000 - rand() % 0x800,
                        _ => 0x1_0000 + (rand() % 0x100) * 0x1000,
                    };
                    let len = match rand() % 8 {
                        0 => rand() as u32,
                        _ if i == 0 => 16,
                        _ if i + 1 == n => 1,
                        _ => (rand() % 4 * 512 + rand() % 2) as u32,
                    };
                    let mut flags = match rand() % 8 {
                        0 => (rand() % 4) as u16 & W,
                        _ if i == 0 => 0,
                        _ if i + 1 == n => W,
                        _ => (rand() % 2) as u16 * W,
                    };
                    if i + 1 < n && rand() % 8 != 0 {
                        flags |= VRING_DESC_F_NEXT as u16;
                    }
                    let next = if rand() % 8 == 0 {
                        rand() as u16 % 20
                    } else {
                        i as u16 + 1
                    };
                    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
                })
                .collect();
            let first = SplitDescriptor::from(raw[0]).addr().0;
            let t = types[(rand() % types.len() as u64) as usize];
            if mem.write_obj(t, GuestAddress(first)).is_ok() {
                let _ = mem.write_obj(rand() % 2100, GuestAddress(first.wrapping_add(8)));
            }
            let chain = q.build_multiple_desc_chains(&raw).unwrap();
            let status = locate_status(chain.clone(), &mem);
            let Ok(r) = BlkRequest::parse(chain, &mem, &LIMITS) else {
                continue;
            };
            accepted += 1;
            assert_eq!(Some(r.status_addr()), status);
            match r.kind() {
                RequestKind::Read { sector, data } | RequestKind::Write { sector, data } => {
                    let len = sum_len(data);
                    assert_eq!(len % SECTOR_SIZE, 0);
                    assert!(sector + len / SECTOR_SIZE <= LIMITS.capacity);
                    assert!(data.len() <= LIMITS.seg_max as usize);
                    assert!(check_in_memory(&mem, data).is_ok());
                }
                RequestKind::GetId { data } => assert!(check_in_memory(&mem, data).is_ok()),
                RequestKind::Discard { ranges } | RequestKind::WriteZeroes { ranges } => {
                    for r in ranges {
                        assert!(r.sector + u64::from(r.num_sectors) <= LIMITS.capacity);
                    }
                }
                RequestKind::Flush => {}
            }
        }
        assert!(
            accepted > 20,
            "only {accepted} random chains were valid requests"
        );
    }
}
