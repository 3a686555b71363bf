//! Shared pieces of Outboard's fuzz targets (`fuzz_targets/`): the input cursor, a small guest
//! (memory, rings, interrupt sink), the vhost-user session script, and the seed builders that
//! `examples/gen_corpus.rs` writes to `corpus/`.

pub mod corpus;
pub mod guest;
pub mod input;
pub mod session;
