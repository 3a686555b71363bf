//! Helpers of the `blk` benchmark (`benches/blk.rs`): the backends under test, the load
//! generator, the host facts the report records, and the report itself.

pub mod backend;
pub mod host;
pub mod load;
pub mod options;
pub mod report;
