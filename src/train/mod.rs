//! Training: the optimizer, its schedule, gradient clipping and accumulation.

pub mod optim;
