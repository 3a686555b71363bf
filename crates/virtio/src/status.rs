//! The device-status state machine (VIRTIO 1.2, section 2.1).

/// The driver has noticed the device.
pub const ACKNOWLEDGE: u8 = 1;
/// The driver knows how to drive the device.
pub const DRIVER: u8 = 2;
/// The driver is set up and ready to drive the device.
pub const DRIVER_OK: u8 = 4;
/// The driver has acknowledged the features it understands.
pub const FEATURES_OK: u8 = 8;
/// The device has hit an error it cannot recover from without a reset.
pub const DEVICE_NEEDS_RESET: u8 = 0x40;
/// The driver has given up on the device.
pub const FAILED: u8 = 0x80;

const DRIVER_BITS: u8 = ACKNOWLEDGE | DRIVER | DRIVER_OK | FEATURES_OK | FAILED;

/// What a status write means for the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusChange {
    /// Writing zero: reset the device.
    Reset,
    /// FEATURES_OK was set: the features are final.
    FeaturesOk,
    /// DRIVER_OK was set: start the device.
    DriverOk,
    /// FAILED was set.
    Failed,
    /// Nothing the device must act on.
    None,
}

/// A status write the device refuses.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StatusError {
    /// Bits the driver may not write (DEVICE_NEEDS_RESET and reserved bits).
    #[error("status {new:#x} sets bits the driver may not write")]
    ReservedBits {
        /// The status written.
        new: u8,
    },
    /// A bit set earlier was cleared without a reset.
    #[error("status {new:#x} clears bits of {old:#x} without a reset")]
    ClearedBits {
        /// The current status.
        old: u8,
        /// The status written.
        new: u8,
    },
    /// A step was skipped (FEATURES_OK before DRIVER, DRIVER_OK before FEATURES_OK, …).
    #[error("status {new:#x} skips a step of the initialisation sequence")]
    OutOfOrder {
        /// The status written.
        new: u8,
    },
}

/// Validates a driver's status write against the current status and says what it means.
///
/// `features_final` tells whether the transport has already fixed the features by other means
/// (vhost-user's SET_FEATURES). The VMM then writes status on the driver's behalf and does not
/// replay every step: FEATURES_OK may come alone and DRIVER_OK without it. QEMU 7.2 writes
/// FEATURES_OK right after SET_FEATURES, then ACKNOWLEDGE|DRIVER|DRIVER_OK when it starts the
/// device.
pub fn transition(old: u8, new: u8, features_final: bool) -> Result<StatusChange, StatusError> {
    if new == 0 {
        return Ok(StatusChange::Reset);
    }
    if new & !DRIVER_BITS != 0 {
        return Err(StatusError::ReservedBits { new });
    }
    let old_driver = old & DRIVER_BITS;
    if new & old_driver != old_driver {
        return Err(StatusError::ClearedBits { old, new });
    }
    let added = new & !old_driver;
    if added & FAILED != 0 {
        return Ok(StatusChange::Failed);
    }
    let has = |b: u8| new & b != 0;
    if (has(DRIVER) && !has(ACKNOWLEDGE)) || (has(FEATURES_OK) && !has(DRIVER) && !features_final) {
        return Err(StatusError::OutOfOrder { new });
    }
    if has(DRIVER_OK) && !(has(FEATURES_OK) || (features_final && has(DRIVER))) {
        return Err(StatusError::OutOfOrder { new });
    }
    Ok(if added & DRIVER_OK != 0 {
        StatusChange::DriverOk
    } else if added & FEATURES_OK != 0 {
        StatusChange::FeaturesOk
    } else {
        StatusChange::None
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_sequence_is_accepted() {
        let mut s = 0;
        for (step, want) in [
            (ACKNOWLEDGE, StatusChange::None),
            (DRIVER, StatusChange::None),
            (FEATURES_OK, StatusChange::FeaturesOk),
            (DRIVER_OK, StatusChange::DriverOk),
        ] {
            assert_eq!(transition(s, s | step, false), Ok(want));
            s |= step;
        }
        assert_eq!(transition(s, 0, false), Ok(StatusChange::Reset));
        assert_eq!(transition(s, s | FAILED, false), Ok(StatusChange::Failed));
    }

    #[test]
    fn skipped_and_cleared_steps_are_refused() {
        assert!(transition(0, DRIVER, false).is_err());
        assert!(transition(0, ACKNOWLEDGE | FEATURES_OK, false).is_err());
        assert!(transition(0, ACKNOWLEDGE | DRIVER | DRIVER_OK, false).is_err());
        assert!(transition(ACKNOWLEDGE | DRIVER, ACKNOWLEDGE, false).is_err());
        assert!(transition(0, DEVICE_NEEDS_RESET | ACKNOWLEDGE, false).is_err());
    }

    #[test]
    fn features_fixed_by_the_transport_imply_features_ok() {
        assert_eq!(
            transition(0, ACKNOWLEDGE | DRIVER | DRIVER_OK, true),
            Ok(StatusChange::DriverOk)
        );
        // QEMU 7.2's sequence.
        assert_eq!(
            transition(0, FEATURES_OK, true),
            Ok(StatusChange::FeaturesOk)
        );
        assert_eq!(
            transition(
                FEATURES_OK,
                FEATURES_OK | ACKNOWLEDGE | DRIVER | DRIVER_OK,
                true
            ),
            Ok(StatusChange::DriverOk)
        );
        assert!(transition(0, FEATURES_OK, false).is_err());
        // The device's own NEEDS_RESET bit does not count as a bit the driver cleared.
        assert_eq!(
            transition(
                ACKNOWLEDGE | DEVICE_NEEDS_RESET,
                ACKNOWLEDGE | DRIVER,
                false
            ),
            Ok(StatusChange::None)
        );
    }
}
