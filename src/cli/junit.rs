//! A minimal JUnit XML writer for `bexar boot-test` reports (the schema CI systems read).

use std::fmt::Write;

/// One test case.
#[derive(Debug, Clone)]
pub struct Case {
    /// Test name.
    pub name: String,
    /// Seconds it took.
    pub seconds: f64,
    /// Failure message, if it failed.
    pub failure: Option<String>,
    /// Captured output (the console log).
    pub output: String,
}

/// Escapes text for XML content and attributes; drops characters XML 1.0 cannot carry.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(c),
            c if (c as u32) < 0x20 || c == '\u{fffe}' || c == '\u{ffff}' => {}
            c => out.push(c),
        }
    }
    out
}

/// Renders a test suite.
pub fn render(suite: &str, cases: &[Case]) -> String {
    let failures = cases.iter().filter(|c| c.failure.is_some()).count();
    let total: f64 = cases.iter().map(|c| c.seconds).sum();
    let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        x,
        "<testsuites tests=\"{}\" failures=\"{failures}\" time=\"{total:.3}\">",
        cases.len()
    );
    let _ = writeln!(
        x,
        "  <testsuite name=\"{}\" tests=\"{}\" failures=\"{failures}\" errors=\"0\" time=\"{total:.3}\">",
        escape(suite),
        cases.len()
    );
    for c in cases {
        let _ = write!(
            x,
            "    <testcase classname=\"{}\" name=\"{}\" time=\"{:.3}\">",
            escape(suite),
            escape(&c.name),
            c.seconds
        );
        if let Some(f) = &c.failure {
            let _ = write!(x, "<failure message=\"{}\"/>", escape(f));
        }
        let _ = writeln!(
            x,
            "<system-out>{}</system-out></testcase>",
            escape(&c.output)
        );
    }
    x.push_str("  </testsuite>\n</testsuites>\n");
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_and_counts() {
        let cases = vec![
            Case {
                name: "a<b".into(),
                seconds: 1.5,
                failure: None,
                output: "ok \x1b[0m & done".into(),
            },
            Case {
                name: "c".into(),
                seconds: 0.5,
                failure: Some("timed out \"x\"".into()),
                output: String::new(),
            },
        ];
        let x = render("boot", &cases);
        assert!(x.contains("tests=\"2\" failures=\"1\""));
        assert!(x.contains("name=\"a&lt;b\""));
        assert!(x.contains("ok [0m &amp; done"));
        assert!(x.contains("<failure message=\"timed out &quot;x&quot;\"/>"));
        assert!(x.contains("time=\"2.000\""));
    }
}
