//! Platform-specific code: the Linux TAP driver's ioctls.

pub(crate) mod tap;
