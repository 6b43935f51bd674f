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

/// Cancellation, the one shape it takes: an error carrying the reason, raised at a boundary
/// (before an epoch, a micro-batch, a dev list) and carried by `?` up to the run, which records
/// `cancelled` with the reason (found with `downcast_ref`). Nothing else means "cancelled".
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("cancelled: {0}")]
pub struct Cancelled(pub String);

/// `Err(Cancelled)` once the reporter says cancellation was requested.
pub fn check_cancel(rep: &mut dyn trainer::Reporter) -> anyhow::Result<()> {
    match rep.cancel_requested() {
        Some(reason) => Err(Cancelled(reason).into()),
        None => Ok(()),
    }
}
