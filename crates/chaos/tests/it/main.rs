//! Integration tests of trellis-chaos.

mod proxy;
mod supervisor;
