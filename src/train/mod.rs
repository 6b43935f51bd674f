//! Training: the optimizer, its schedule, clipping and accumulation, and the loop that drives
//! them. It reports through [`Reporter`] and never writes run files itself.

pub mod data;
pub mod dataset;
pub mod eval;
pub mod hard_negatives;
pub mod memory;
pub mod metrics;
pub mod mining;
pub mod optim;
pub mod promotion;
pub mod significance;
pub mod trainer;

use crate::store::StopRequest;

/// A stop, the one shape it takes inside training: an error carrying the request, raised at a
/// boundary (before an epoch, a micro-batch, a dev list) and carried by `?` up to the run, which
/// records the state the request asks for (found with `downcast_ref`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("stopped: {0}")]
pub struct Cancelled(pub StopRequest);

/// `Err(Cancelled)` once the reporter says a stop was requested.
pub fn check_cancel(rep: &mut dyn trainer::Reporter) -> anyhow::Result<()> {
    match rep.stop_requested() {
        Some(req) => Err(Cancelled(req).into()),
        None => Ok(()),
    }
}
