//! What a run reports: one [`Report`] (printed as one JSON object), live [`Live`] counters while
//! it runs, and the latency summary of an HDR histogram.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::error::ConnError;

/// Version of the JSON shape below; bumped when a field changes meaning or disappears.
pub const SCHEMA: u32 = 1;

/// How many distinct error messages a report keeps.
const ERROR_SAMPLES_MAX: usize = 8;

/// Largest latency the histograms track: 10 minutes, in nanoseconds. Larger samples are clamped.
const LATENCY_MAX_NS: u64 = 600_000_000_000;

/// The result of one run. Printed as one JSON object on stdout; fields that do not apply to a
/// workload are zero (or `null` for `latency_us`).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// JSON shape version ([`SCHEMA`]).
    pub schema: u32,
    /// `bulk`, `rr`, `connrate` or `hold`.
    pub workload: &'static str,
    /// The parameters the run used, as given (target, sizes, counts, durations).
    pub params: serde_json::Value,
    /// Payload bytes moved and confirmed intact, both directions summed (an echo counts each
    /// way); bytes of failed streams are not counted.
    pub bytes: u64,
    /// Wall time of the measured part of the run (warm-up excluded).
    pub seconds: f64,
    /// `bytes / seconds` in megabytes (10^6 bytes) per second.
    pub mb_per_s: f64,
    /// Completed operations: streams (bulk), round trips (rr), connections (connrate), or
    /// connections alive at the end (hold).
    pub requests: u64,
    /// `requests / seconds`.
    pub rps: f64,
    /// Latency of each operation in microseconds: stream completion time (bulk), round trip
    /// (rr), connect + echo + close (connrate), connect + first echo (hold). `null` if none
    /// completed.
    pub latency_us: Option<LatencySummary>,
    /// Failed operations (connections that failed, lost or corrupted data).
    pub errors: u64,
    /// The first few distinct error messages, each saying whose fault it was.
    pub error_samples: Vec<String>,
    /// Workload-specific numbers (for `hold`: `opened`, `alive_at_end`, `open_seconds`).
    #[serde(skip_serializing_if = "serde_json::Map::is_empty")]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Report {
    pub(crate) fn new(
        workload: &'static str,
        params: &impl Serialize,
        live: &Live,
        elapsed: Duration,
        bytes: u64,
        requests: u64,
        latency: &Histogram<u64>,
    ) -> Self {
        let seconds = elapsed.as_secs_f64();
        let per_second = |n: f64| if seconds > 0.0 { n / seconds } else { 0.0 };
        Report {
            schema: SCHEMA,
            workload,
            params: serde_json::to_value(params).unwrap_or(serde_json::Value::Null),
            bytes,
            seconds,
            mb_per_s: per_second(bytes as f64 / 1e6),
            requests,
            rps: per_second(requests as f64),
            latency_us: LatencySummary::from_histogram(latency),
            errors: live.errors.load(Ordering::Relaxed),
            error_samples: live.error_samples(),
            extra: serde_json::Map::new(),
        }
    }

    /// The report as one line of JSON.
    pub fn to_json(&self) -> String {
        // A `Report` holds only strings, numbers and maps: serialisation cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Percentiles of a latency histogram, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct LatencySummary {
    /// Number of samples.
    pub count: u64,
    pub min: f64,
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl LatencySummary {
    /// Summarises a histogram of nanosecond samples; `None` when it is empty.
    pub fn from_histogram(h: &Histogram<u64>) -> Option<Self> {
        if h.is_empty() {
            return None;
        }
        let us = |ns: u64| ns as f64 / 1_000.0;
        Some(LatencySummary {
            count: h.len(),
            min: us(h.min()),
            mean: h.mean() / 1_000.0,
            p50: us(h.value_at_quantile(0.50)),
            p90: us(h.value_at_quantile(0.90)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            max: us(h.max()),
        })
    }
}

/// A latency histogram of nanosecond samples, 3 significant digits, up to 10 minutes.
pub fn latency_histogram() -> Histogram<u64> {
    // The bounds are constants that satisfy hdrhistogram's preconditions (low >= 1, high >= 2 *
    // low, sigfig <= 5), so construction cannot fail.
    Histogram::new_with_bounds(1, LATENCY_MAX_NS, 3).expect("constant histogram bounds are valid")
}

/// Records one latency sample, clamped into the histogram's range.
pub(crate) fn record(h: &mut Histogram<u64>, latency: Duration) {
    let ns = u64::try_from(latency.as_nanos()).unwrap_or(u64::MAX);
    h.saturating_record(ns.clamp(1, LATENCY_MAX_NS));
}

/// Counters a run updates while it goes, for progress display. Shared with the caller through an
/// `Arc`; reading them never blocks the workload.
#[derive(Debug, Default)]
pub struct Live {
    /// Payload bytes moved so far (for progress: includes bytes of streams that fail later).
    pub bytes: AtomicU64,
    /// Operations completed so far (including warm-up).
    pub ops: AtomicU64,
    /// Failed operations so far.
    pub errors: AtomicU64,
    /// The first few distinct error messages.
    samples: Mutex<Vec<String>>,
}

impl Live {
    /// Counts one failed operation and keeps its message if it is new.
    pub(crate) fn fail(&self, err: &ConnError) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let msg = err.to_string();
        let mut samples = self.samples.lock().unwrap_or_else(|p| p.into_inner());
        if samples.len() < ERROR_SAMPLES_MAX && !samples.contains(&msg) {
            samples.push(msg);
        }
    }

    pub(crate) fn add_bytes(&self, n: u64) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn add_op(&self) {
        self.ops.fetch_add(1, Ordering::Relaxed);
    }

    /// The error messages kept so far.
    pub fn error_samples(&self) -> Vec<String> {
        self.samples
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_of_an_empty_histogram_is_none() {
        assert_eq!(LatencySummary::from_histogram(&latency_histogram()), None);
    }

    #[test]
    fn summary_reports_percentiles_in_microseconds() {
        let mut h = latency_histogram();
        for us in 1..=1000u64 {
            record(&mut h, Duration::from_micros(us));
        }
        let s = LatencySummary::from_histogram(&h).unwrap();
        assert_eq!(s.count, 1000);
        // 3 significant digits: each value is within 0.1% of the exact one.
        let close = |got: f64, want: f64| (got - want).abs() <= want * 0.001 + 0.001;
        assert!(close(s.min, 1.0), "{s:?}");
        assert!(close(s.p50, 500.0), "{s:?}");
        assert!(close(s.p90, 900.0), "{s:?}");
        assert!(close(s.p99, 990.0), "{s:?}");
        assert!(close(s.p999, 999.0), "{s:?}");
        assert!(close(s.max, 1000.0), "{s:?}");
        assert!(close(s.mean, 500.5), "{s:?}");
    }

    #[test]
    fn samples_beyond_the_range_are_clamped_not_lost() {
        let mut h = latency_histogram();
        record(&mut h, Duration::ZERO);
        record(&mut h, Duration::from_secs(3600));
        let s = LatencySummary::from_histogram(&h).unwrap();
        assert_eq!(s.count, 2);
        assert!(s.max >= 599_000_000.0, "{s:?}");
    }

    #[test]
    fn errors_keep_distinct_samples_up_to_the_limit() {
        let live = Live::default();
        for i in 0..20 {
            live.fail(&ConnError::Eof {
                phase: if i % 2 == 0 { "a" } else { "b" },
            });
        }
        assert_eq!(live.errors.load(Ordering::Relaxed), 20);
        assert_eq!(live.error_samples().len(), 2);
    }

    #[test]
    fn report_json_has_every_field_with_its_unit() {
        #[derive(Serialize)]
        struct P {
            target: &'static str,
            size: usize,
        }
        let live = Live::default();
        let mut h = latency_histogram();
        record(&mut h, Duration::from_micros(50));
        let mut report = Report::new(
            "rr",
            &P {
                target: "127.0.0.1:1",
                size: 64,
            },
            &live,
            Duration::from_secs(2),
            2_000_000,
            100,
            &h,
        );
        let v: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        let keys: std::collections::BTreeSet<&str> =
            v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            std::collections::BTreeSet::from([
                "schema",
                "workload",
                "params",
                "bytes",
                "seconds",
                "mb_per_s",
                "requests",
                "rps",
                "latency_us",
                "errors",
                "error_samples"
            ])
        );
        assert_eq!(v["workload"], "rr");
        assert_eq!(v["params"]["size"], 64);
        assert_eq!(v["mb_per_s"], 1.0);
        assert_eq!(v["rps"], 50.0);
        let lat = v["latency_us"].as_object().unwrap();
        for k in ["count", "min", "mean", "p50", "p90", "p99", "p999", "max"] {
            assert!(lat.contains_key(k), "latency_us.{k} missing");
        }
        assert!((lat["p50"].as_f64().unwrap() - 50.0).abs() < 0.1);

        report.extra.insert("opened".into(), 3.into());
        let v: serde_json::Value = serde_json::from_str(&report.to_json()).unwrap();
        assert_eq!(v["extra"]["opened"], 3);

        let empty = Report::new("hold", &(), &Live::default(), Duration::ZERO, 0, 0, &h);
        let mut empty_h = empty.clone();
        empty_h.latency_us = None;
        let v: serde_json::Value = serde_json::from_str(&empty_h.to_json()).unwrap();
        assert!(v["latency_us"].is_null());
        assert_eq!(v["rps"], 0.0);
    }
}
