//! Training: the optimizer, its schedule, clipping and accumulation, and the loop that drives
//! them. It reports through [`Reporter`] and never writes run files itself.

pub mod data;
pub mod dataset;
pub mod eval;
pub mod memory;
pub mod metrics;
pub mod mining;
pub mod optim;
pub mod trainer;
