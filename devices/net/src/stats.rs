//! Packet and command counters of one device, updated by its workers without locks.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($(#[$doc:meta] $name:ident,)*) => {
        /// The live counters.
        #[derive(Debug, Default)]
        pub(crate) struct NetStats {
            $(pub $name: AtomicU64,)*
        }

        /// A snapshot of a device's counters.
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        pub struct NetStatsSnapshot {
            $(#[$doc] pub $name: u64,)*
        }

        impl NetStats {
            /// Reads every counter.
            pub fn snapshot(&self) -> NetStatsSnapshot {
                NetStatsSnapshot {
                    $($name: self.$name.load(Ordering::Relaxed),)*
                }
            }
        }

        impl std::fmt::Display for NetStatsSnapshot {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                let mut first = true;
                $(
                    if self.$name != 0 {
                        if !first {
                            f.write_str(" ")?;
                        }
                        first = false;
                        write!(f, "{}={}", stringify!($name), self.$name)?;
                    }
                )*
                if first {
                    f.write_str("idle")?;
                }
                Ok(())
            }
        }
    };
}

counters! {
    /// Frames the driver transmitted and the backend took.
    tx_packets,
    /// Bytes of those frames (without the virtio header).
    tx_bytes,
    /// Frames larger than the MTU (or than 64 KiB with GSO), dropped.
    tx_oversize,
    /// Transmit chains that were not a valid packet (broken chain, runt, bad header), dropped.
    tx_malformed,
    /// Frames the backend could not send.
    tx_backend_dropped,
    /// Frames placed in receive buffers.
    rx_packets,
    /// Bytes of those frames (without the virtio header).
    rx_bytes,
    /// Frames the receive filter refused.
    rx_filtered,
    /// Frames that did not fit the driver's receive buffers, dropped.
    rx_too_big,
    /// Frames held for the driver and dropped when the device stopped or the pair was disabled.
    rx_dropped,
    /// Frames from the backend with an invalid virtio header, dropped.
    rx_malformed,
    /// Receive chains that were not usable buffers, returned empty.
    rx_bad_buffers,
    /// GSO frames the device segmented because the driver does not take them.
    rx_segmented,
    /// Backend errors while receiving.
    rx_backend_errors,
    /// Control commands answered VIRTIO_NET_OK.
    ctrl_ok,
    /// Control commands answered VIRTIO_NET_ERR.
    ctrl_err,
    /// Control chains that could not be answered (no room for the ack).
    ctrl_unanswerable,
}

/// Adds `n` to a counter.
pub(crate) fn add(counter: &AtomicU64, n: u64) {
    counter.fetch_add(n, Ordering::Relaxed);
}

/// Adds one to a counter.
pub(crate) fn inc(counter: &AtomicU64) {
    add(counter, 1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshots_print_only_what_happened() {
        let s = NetStats::default();
        assert_eq!(s.snapshot().to_string(), "idle");
        inc(&s.tx_packets);
        add(&s.tx_bytes, 60);
        inc(&s.ctrl_err);
        assert_eq!(
            s.snapshot().to_string(),
            "tx_packets=1 tx_bytes=60 ctrl_err=1"
        );
        assert_eq!(s.snapshot().tx_bytes, 60);
    }
}
