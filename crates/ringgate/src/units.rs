//! Human units on the command line: durations (`2`, `2s`, `500ms`, `5m`) and
//! sizes (`65536`, `64KiB`, `16MiB`, `1GB`).

use std::time::Duration;

/// Parses a duration; a bare number is seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = split(text);
    let value: f64 = number.parse().map_err(|_| {
        format!("invalid duration {text:?}: expected a number and an optional unit (ms, s, m, h)")
    })?;
    let seconds = match unit {
        "" | "s" | "sec" | "secs" => value,
        "ms" => value / 1000.0,
        "m" | "min" | "mins" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(format!(
                "invalid duration {text:?}: unknown unit {other:?} (use ms, s, m or h)"
            ))
        }
    };
    if !seconds.is_finite() || !(0.0..=1e9).contains(&seconds) {
        return Err(format!("invalid duration {text:?}: out of range"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// Parses a duration, or `off` (also `0`) as zero: for settings that can be turned off.
pub fn parse_duration_or_off(text: &str) -> Result<Duration, String> {
    if text.trim().eq_ignore_ascii_case("off") {
        return Ok(Duration::ZERO);
    }
    parse_duration(text)
}

/// Parses a byte size; a bare number is bytes. `KiB`, `K` and `k` are 1024;
/// `KB` is 1000 (likewise M and G).
pub fn parse_size(text: &str) -> Result<u64, String> {
    let (number, unit) = split(text);
    let value: u64 = number
        .parse()
        .map_err(|_| format!("invalid size {text:?}: expected a whole number and an optional unit (B, KiB, MiB, GiB, KB, MB, GB)"))?;
    let scale: u64 = match unit {
        "" | "B" | "b" => 1,
        "K" | "k" | "KiB" | "kiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "KB" | "kB" => 1000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        other => return Err(format!("invalid size {text:?}: unknown unit {other:?}")),
    };
    value
        .checked_mul(scale)
        .ok_or_else(|| format!("invalid size {text:?}: too large"))
}

fn split(text: &str) -> (&str, &str) {
    let text = text.trim();
    let at = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    (&text[..at], text[at..].trim())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("5 parsecs")
            .unwrap_err()
            .contains("unknown unit"));
        assert!(parse_duration("-1").is_err());
        assert_eq!(parse_duration_or_off("off"), Ok(Duration::ZERO));
        assert_eq!(parse_duration_or_off("0"), Ok(Duration::ZERO));
        assert_eq!(parse_duration_or_off("30s"), Ok(Duration::from_secs(30)));
        assert!(parse_duration_or_off("of").is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("65536"), Ok(65536));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("64K"), Ok(65536));
        assert_eq!(parse_size("16MiB"), Ok(16 << 20));
        assert_eq!(parse_size("1GB"), Ok(1_000_000_000));
        assert_eq!(parse_size("2 MiB"), Ok(2 << 20));
        assert!(parse_size("1.5MiB").is_err());
        assert!(parse_size("99999999999999GiB")
            .unwrap_err()
            .contains("too large"));
        assert!(parse_size("12 parsecs")
            .unwrap_err()
            .contains("unknown unit"));
    }
}
