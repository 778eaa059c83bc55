//! Tile formats, packing and CPU kernels for hybrid dense / 2:4 sparse weights.
//!
//! Every optimized kernel in this crate has a plain scalar twin in [`reference`] and a test
//! that the two agree on random inputs, ragged shapes included.

pub mod reference;
