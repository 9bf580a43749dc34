//! One scrape of a `/metrics` endpoint, read by sample name.

use std::fmt;

use anyhow::Result;

use crate::http::http;

/// The Prometheus text a service exposed at one moment.
#[derive(Debug, Clone)]
pub struct Metrics {
    text: String,
}

impl Metrics {
    /// Fetches `/metrics` from `addr` (`host:port`); fails unless it answers 200.
    pub async fn scrape(addr: &str) -> Result<Self> {
        let reply = http(addr, "GET", "/metrics", None, "", b"").await?;
        anyhow::ensure!(reply.status == 200, "GET {addr}/metrics answered {}", reply.status);
        Ok(Self::parse(String::from_utf8_lossy(&reply.raw).into_owned()))
    }

    /// Wraps exposition text already fetched.
    pub fn parse(text: String) -> Self {
        Self { text }
    }

    /// The value of the sample named exactly `series` (labels included, as exposed:
    /// `name{label="v"}`); 0 when absent, as for a counter never incremented.
    pub fn value(&self, series: &str) -> f64 {
        self.text
            .lines()
            .filter_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .find_map(|rest| rest.split_whitespace().next()?.parse().ok())
            .unwrap_or(0.0)
    }

    /// Whether `name` appears anywhere in the exposition (a family, its help or a sample).
    pub fn mentions(&self, name: &str) -> bool {
        self.text.contains(name)
    }

    /// The exposition text as scraped.
    pub fn text(&self) -> &str {
        &self.text
    }
}

/// The whole exposition, for failure messages.
impl fmt::Display for Metrics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP chat_gateway_connections Open sockets.\n\
        chat_gateway_connections 2\n\
        chat_gateway_connections_total 9\n\
        chat_gateway_commands_total{command=\"send\",outcome=\"ok\"} 3\n";

    #[test]
    fn a_sample_is_read_by_its_exact_name_and_labels_and_an_absent_one_is_zero() {
        let metrics = Metrics::parse(TEXT.to_owned());
        assert_eq!(metrics.value("chat_gateway_connections"), 2.0);
        assert_eq!(metrics.value("chat_gateway_connections_total"), 9.0);
        assert_eq!(metrics.value(r#"chat_gateway_commands_total{command="send",outcome="ok"}"#), 3.0);
        assert_eq!(metrics.value("chat_gateway_rate_limited_total"), 0.0);
        assert!(metrics.mentions("chat_gateway_commands_total"));
    }
}
