//! `/metrics`: serve's counters in the Prometheus text format, through `prometheus-client`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub endpoint: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub endpoint: String,
    pub r#type: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub corpus: String,
    pub result: String,
}

pub struct Telemetry {
    registry: Registry,
    pub requests: Family<RequestLabels, Counter>,
    pub errors: Family<ErrorLabels, Counter>,
    pub pairs_scored: Counter,
    /// Prompt-prefix tokens taken from an earlier request's cache instead of computed.
    pub prefix_tokens_reused: Counter,
    pub batch_size: Histogram,
    pub queue_pairs: Gauge,
    pub latency: Histogram,
    pub reloads: Family<ReloadLabels, Counter>,
    pub resident: Gauge,
    /// Client connections open now.
    pub connections: Gauge,
    /// Connections refused at `serve.max_connections`.
    pub connections_refused: Counter,
    /// Rankings answered whose capture failed (the ranking was still answered).
    pub capture_failures: Counter,
}

impl Default for Telemetry {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("rerankd");
        let requests = Family::<RequestLabels, Counter>::default();
        let errors = Family::<ErrorLabels, Counter>::default();
        let pairs_scored = Counter::default();
        let prefix_tokens_reused = Counter::default();
        let batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 8));
        let queue_pairs = Gauge::default();
        let latency = Histogram::new(exponential_buckets(0.005, 2.0, 14));
        let reloads = Family::<ReloadLabels, Counter>::default();
        let resident = Gauge::default();
        let connections = Gauge::default();
        let connections_refused = Counter::default();
        let capture_failures = Counter::default();
        registry.register("requests", "HTTP requests answered, by endpoint and status", requests.clone());
        registry.register(
            "request_errors",
            "Requests answered with an error, by endpoint and error type",
            errors.clone(),
        );
        registry.register("pairs_scored", "Query-document pairs scored", pairs_scored.clone());
        registry.register(
            "prefix_tokens_reused",
            "Prompt-prefix tokens (template, instruction) reused from an earlier request's keys and values",
            prefix_tokens_reused.clone(),
        );
        registry.register("batch_size", "Pairs per scoring forward", batch_size.clone());
        registry.register("queue_pairs", "Pairs admitted and not yet answered", queue_pairs.clone());
        registry.register("request_duration_seconds", "Time from request to response", latency.clone());
        registry.register("adapter_reloads", "Adapter reloads after a change of current, by result", reloads.clone());
        registry.register("resident_memory_bytes", "Resident memory of the serve process", resident.clone());
        registry.register("connections", "Client connections open", connections.clone());
        registry.register(
            "connections_refused",
            "Connections answered 503 and closed because serve.max_connections were open",
            connections_refused.clone(),
        );
        registry.register(
            "capture_failures",
            "Rankings answered whose capture into feedback.jsonl failed",
            capture_failures.clone(),
        );
        Self {
            registry,
            requests,
            errors,
            pairs_scored,
            prefix_tokens_reused,
            batch_size,
            queue_pairs,
            latency,
            reloads,
            resident,
            connections,
            connections_refused,
            capture_failures,
        }
    }
}

impl Telemetry {
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
