//! Integration tests of trellis-chaos.

mod supervisor;
