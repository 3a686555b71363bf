//! Feature bits the framework owns, and negotiation.

/// Descriptors may refer to indirect descriptor tables.
pub const VIRTIO_F_INDIRECT_DESC: u32 = 28;
/// The `used_event`/`avail_event` notification suppression mechanism.
pub const VIRTIO_F_RING_EVENT_IDX: u32 = 29;
/// VIRTIO 1.0 or later.
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// The device sits behind an IOMMU (addresses are IOVAs).
pub const VIRTIO_F_ACCESS_PLATFORM: u32 = 33;
/// Packed virtqueue layout.
pub const VIRTIO_F_RING_PACKED: u32 = 34;
/// Buffers are used in the order they are made available.
pub const VIRTIO_F_IN_ORDER: u32 = 35;

/// The mask for one feature bit.
pub const fn bit(feature: u32) -> u64 {
    1 << feature
}

/// The transport-independent features every device gets from the framework.
pub const FRAMEWORK_FEATURES: u64 =
    bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_RING_EVENT_IDX) | bit(VIRTIO_F_INDIRECT_DESC);

/// Why the driver's features were refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FeatureError {
    /// The driver acknowledged a feature that was not offered.
    #[error(
        "driver acknowledged features {unoffered:#x} that were not offered (offered {offered:#x})"
    )]
    NotOffered {
        /// The offending bits.
        unoffered: u64,
        /// What was offered.
        offered: u64,
    },
    /// A modern device requires VIRTIO_F_VERSION_1.
    #[error("driver did not acknowledge VIRTIO_F_VERSION_1")]
    NoVersion1,
}

/// Checks the driver's features against the offer: acknowledged ⊆ offered, and VERSION_1.
pub fn negotiate(offered: u64, acked: u64) -> Result<u64, FeatureError> {
    let unoffered = acked & !offered;
    if unoffered != 0 {
        return Err(FeatureError::NotOffered { unoffered, offered });
    }
    if acked & bit(VIRTIO_F_VERSION_1) == 0 {
        return Err(FeatureError::NoVersion1);
    }
    Ok(acked)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acked_must_be_offered_and_modern() {
        let offered = FRAMEWORK_FEATURES | 1 << 5;
        assert_eq!(
            negotiate(offered, bit(VIRTIO_F_VERSION_1) | 1 << 5),
            Ok(bit(32) | 1 << 5)
        );
        assert_eq!(
            negotiate(offered, bit(VIRTIO_F_VERSION_1) | 1 << 6),
            Err(FeatureError::NotOffered {
                unoffered: 1 << 6,
                offered
            })
        );
        assert_eq!(negotiate(offered, 1 << 5), Err(FeatureError::NoVersion1));
    }
}
