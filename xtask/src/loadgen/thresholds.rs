//! `--threshold`: pass/fail criteria on a run's figures, as k6 has them
//! (`--threshold 'p99<50ms' --threshold 'lost==0'`). Each is checked against
//! the report, printed with its outcome in the summary and the `--json`
//! output, and any crossed one makes the load generator exit with status 99
//! (k6's), so a CI job can tell "the target was missed" from "the run broke".
//!
//! A threshold is `FIGURE OP VALUE[UNIT]`: OP one of `<`, `<=`, `>`, `>=`,
//! `==`, `!=`; latency figures take `us`, `ms` (the default) or `s`.

use serde::Serialize;

use super::report::{Percentiles, Report};
use super::Scenario;

/// The exit status of a run that crossed a threshold (k6 uses the same).
pub const EXIT_THRESHOLDS_CROSSED: u8 = 99;

/// How the error of a run that crossed a threshold begins.
pub const CROSSED: &str = "thresholds crossed: ";

/// What a threshold may name, with its unit, for `--help` and errors.
pub const FIGURES: &str = "p50, p90, p99, p99.9, max (ms: the scenario's latency: publish-to-receive for fanout, \
round trip for echo, handshake for connect and churn), rate (/s: deliveries, echoes, connects or cycles), \
lost, duplicates, out_of_order, failed (counts), cpu_per_unit (us of server CPU per delivery, echo or \
connection), rss_per_conn (bytes)";

#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
enum Op {
    Lt,
    Le,
    Gt,
    Ge,
    Eq,
    Ne,
}

impl Op {
    fn holds(self, value: f64, bound: f64) -> bool {
        match self {
            Op::Lt => value < bound,
            Op::Le => value <= bound,
            Op::Gt => value > bound,
            Op::Ge => value >= bound,
            Op::Eq => value == bound,
            Op::Ne => value != bound,
        }
    }
}

/// One parsed `--threshold`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Threshold {
    pub text: String,
    figure: String,
    op: Op,
    /// In the figure's unit (milliseconds for latencies).
    bound: f64,
}

/// A threshold and what the run made of it.
#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub threshold: String,
    pub figure: String,
    /// The run's figure, in the threshold's base unit; None if the run has no such figure.
    pub value: Option<f64>,
    pub passed: bool,
}

const LATENCIES: &[&str] = &["p50", "p90", "p99", "p99.9", "max"];
const OTHERS: &[&str] = &[
    "rate",
    "lost",
    "duplicates",
    "out_of_order",
    "failed",
    "cpu_per_unit",
    "rss_per_conn",
];

impl Threshold {
    pub fn parse(text: &str) -> Result<Threshold, String> {
        let t = text.trim();
        let ops = [
            ("<=", Op::Le),
            (">=", Op::Ge),
            ("==", Op::Eq),
            ("!=", Op::Ne),
            ("<", Op::Lt),
            (">", Op::Gt),
        ];
        let (at, sym, op) = ops
            .iter()
            .filter_map(|&(sym, op)| t.find(sym).map(|at| (at, sym, op)))
            .min_by_key(|&(at, sym, _)| (at, std::cmp::Reverse(sym.len())))
            .ok_or_else(|| format!("threshold {text:?}: no comparison (<, <=, >, >=, ==, !=)"))?;
        let figure = t[..at].trim().to_ascii_lowercase();
        let value = t[at + sym.len()..].trim();
        let latency = LATENCIES.contains(&figure.as_str());
        if !latency && !OTHERS.contains(&figure.as_str()) {
            return Err(format!(
                "threshold {text:?}: unknown figure {figure:?}; one of: {FIGURES}"
            ));
        }
        let (number, scale) = if latency {
            if let Some(n) = value.strip_suffix("us") {
                (n, 0.001)
            } else if let Some(n) = value.strip_suffix("ms") {
                (n, 1.0)
            } else if let Some(n) = value.strip_suffix('s') {
                (n, 1000.0)
            } else {
                (value, 1.0)
            }
        } else {
            (value, 1.0)
        };
        let bound: f64 = number.trim().parse().map_err(|_| {
            format!("threshold {text:?}: {value:?} is not a number (latencies take us, ms or s)")
        })?;
        Ok(Threshold {
            text: t.to_string(),
            figure,
            op,
            bound: bound * scale,
        })
    }

    /// The run's value of this threshold's figure.
    fn value(&self, r: &Report) -> Option<f64> {
        let latency = match r.scenario {
            Scenario::Connect | Scenario::Churn => r.handshake_ms.as_ref(),
            _ => r.latency_ms.as_ref(),
        };
        let pick = |p: &Percentiles| match self.figure.as_str() {
            "p50" => p.p50,
            "p90" => p.p90,
            "p99" => p.p99,
            "p99.9" => p.p999,
            _ => p.max,
        };
        match self.figure.as_str() {
            f if LATENCIES.contains(&f) => latency.map(pick),
            "rate" => r
                .deliveries_per_second
                .or(r.messages_per_second)
                .or(r.connects_per_second),
            "lost" => Some(r.lost() as f64),
            "duplicates" => Some(r.duplicates as f64),
            "out_of_order" => Some(r.out_of_order as f64),
            "failed" => Some(r.failures.values().sum::<u64>() as f64),
            "cpu_per_unit" => r.server_cpu_us_per_message,
            "rss_per_conn" => r.rss_per_connection,
            other => unreachable!("figure {other} was checked at parse"),
        }
    }

    pub fn check(&self, r: &Report) -> Outcome {
        let value = self.value(r);
        Outcome {
            threshold: self.text.clone(),
            figure: self.figure.clone(),
            value,
            // A figure the run did not measure fails its threshold: a target
            // cannot be met by a run that never looked.
            passed: value.is_some_and(|v| self.op.holds(v, self.bound)),
        }
    }
}

/// Parses every `--threshold`.
pub fn parse_all(texts: &[String]) -> Result<Vec<Threshold>, String> {
    texts.iter().map(|t| Threshold::parse(t)).collect()
}

/// Prints the outcomes as k6 does, a mark and the figure for each.
pub fn print(outcomes: &[Outcome]) {
    if outcomes.is_empty() {
        return;
    }
    println!("  thresholds");
    for o in outcomes {
        let mark = if o.passed { "✓" } else { "✗" };
        let value = o.value.map_or("not measured".to_string(), |v| {
            format!("{} = {v:.3}", o.figure)
        });
        println!("    {mark} {:<24} {value}", o.threshold);
    }
}

/// Err (with the exit status the caller should use) if any threshold failed.
pub fn verdict(outcomes: &[Outcome]) -> Result<(), String> {
    let crossed: Vec<&str> = outcomes
        .iter()
        .filter(|o| !o.passed)
        .map(|o| o.threshold.as_str())
        .collect();
    if crossed.is_empty() {
        return Ok(());
    }
    Err(format!("{CROSSED}{}", crossed.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forms_units_and_errors() {
        let t = Threshold::parse("p99<50ms").unwrap();
        assert_eq!((t.figure.as_str(), t.op, t.bound), ("p99", Op::Lt, 50.0));
        assert_eq!(Threshold::parse("p99.9 <= 1s").unwrap().bound, 1000.0);
        assert_eq!(Threshold::parse("max<500us").unwrap().bound, 0.5);
        assert_eq!(Threshold::parse("p50<7").unwrap().bound, 7.0);
        let t = Threshold::parse("lost==0").unwrap();
        assert_eq!((t.op, t.bound), (Op::Eq, 0.0));
        assert_eq!(Threshold::parse("rate>=1000").unwrap().op, Op::Ge);
        assert_eq!(Threshold::parse("failed != 3").unwrap().op, Op::Ne);
        assert!(Threshold::parse("p99 50ms")
            .unwrap_err()
            .contains("no comparison"));
        assert!(Threshold::parse("p42<1")
            .unwrap_err()
            .contains("unknown figure"));
        assert!(Threshold::parse("p99<fast")
            .unwrap_err()
            .contains("not a number"));
    }

    #[test]
    fn comparisons() {
        assert!(Op::Lt.holds(1.0, 2.0) && !Op::Lt.holds(2.0, 2.0));
        assert!(Op::Le.holds(2.0, 2.0) && !Op::Le.holds(2.1, 2.0));
        assert!(Op::Gt.holds(3.0, 2.0) && Op::Ge.holds(2.0, 2.0));
        assert!(Op::Eq.holds(0.0, 0.0) && Op::Ne.holds(1.0, 0.0));
    }

    #[test]
    fn verdict_names_what_was_crossed() {
        let o = |t: &str, passed| Outcome {
            threshold: t.into(),
            figure: "x".into(),
            value: Some(1.0),
            passed,
        };
        assert!(verdict(&[o("a", true)]).is_ok());
        let err = verdict(&[o("a", true), o("lost==0", false)]).unwrap_err();
        assert_eq!(err, "thresholds crossed: lost==0");
    }
}
