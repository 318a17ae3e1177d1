//! HTML by hand: one escaping function, the page frame, and small helpers for what every page
//! repeats (tables, timestamps, notices).
//!
//! Every value that did not come from this crate's source goes through [`esc`] before it is
//! written into markup, in element text and in quoted attribute values alike (the function
//! escapes `&`, `<`, `>`, `"` and `'`, which is enough for both). The pages' tests feed
//! hostile text (`<script>`, quotes) through every page that shows stored data and check it
//! comes out inert. There is no inline script or style anywhere: the Content-Security-Policy
//! ([`crate::CONTENT_SECURITY_POLICY`]) forbids both.

use std::fmt::Write as _;

use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use chrono::{DateTime, Utc};

/// `text` escaped for HTML element content and quoted attribute values.
pub(crate) fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// `text` escaped for a URL query value (and then safe in a quoted attribute).
pub(crate) fn query_value(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(byte));
        } else {
            let _ = write!(out, "%{byte:02X}");
        }
    }
    out
}

/// The console's sections, in navigation order: (path, label).
const NAV: [(&str, &str); 5] = [
    ("/admin", "Overview"),
    ("/admin/sagas", "Sagas"),
    ("/admin/dead-letters", "Dead letters"),
    ("/admin/provider", "Payment provider"),
    ("/admin/audit", "Audit log"),
];

/// Which navigation entry a page belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Section {
    Overview,
    Sagas,
    DeadLetters,
    Provider,
    Audit,
    /// The login page and errors outside a section: no navigation.
    None,
}

impl Section {
    fn path(self) -> Option<&'static str> {
        let index = match self {
            Self::Overview => 0,
            Self::Sagas => 1,
            Self::DeadLetters => 2,
            Self::Provider => 3,
            Self::Audit => 4,
            Self::None => return None,
        };
        Some(NAV[index].0)
    }
}

/// A whole page: the frame around `body` (already markup), titled `title` (text).
pub(crate) fn page(section: Section, title: &str, body: &str) -> String {
    let mut out = String::with_capacity(body.len() + 2048);
    let _ = write!(
        out,
        "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{} · trellis console</title>\n\
         <link rel=\"stylesheet\" href=\"/admin/assets/console.css\">\n\
         <script src=\"/admin/assets/console.js\" defer></script>\n</head>\n<body>\n\
         <a class=\"skip\" href=\"#main\">Skip to content</a>\n",
        esc(title)
    );
    if let Some(current) = section.path() {
        out.push_str(
            "<header class=\"bar\">\n<span class=\"brand\">trellis console</span>\n\
             <nav aria-label=\"Console sections\"><ul>\n",
        );
        for (path, label) in NAV {
            let aria = if path == current {
                " aria-current=\"page\""
            } else {
                ""
            };
            let _ = writeln!(out, "<li><a href=\"{path}\"{aria}>{label}</a></li>");
        }
        out.push_str(
            "</ul></nav>\n<form method=\"post\" action=\"/admin/logout\" class=\"logout\">\
             <button type=\"submit\">Sign out</button></form>\n</header>\n",
        );
    }
    let _ = write!(
        out,
        "<main id=\"main\" tabindex=\"-1\">\n<h1>{}</h1>\n{body}\n</main>\n</body>\n</html>\n",
        esc(title)
    );
    out
}

/// A page answered with `status`.
pub(crate) fn respond(status: StatusCode, section: Section, title: &str, body: &str) -> Response {
    (status, Html(page(section, title, body))).into_response()
}

/// A notice paragraph: `kind` is `ok` or `error` (a class), `text` is escaped. Errors are
/// announced to screen readers at once (`role="alert"`), successes politely.
pub(crate) fn notice(kind: &str, text: &str) -> String {
    let role = if kind == "error" {
        "role=\"alert\""
    } else {
        "role=\"status\""
    };
    format!("<p class=\"notice {kind}\" {role}>{}</p>\n", esc(text))
}

/// A time as `2026-12-06 21:55:16 UTC`, in a `<time>` element.
pub(crate) fn time(at: &DateTime<Utc>) -> String {
    format!(
        "<time datetime=\"{}\">{}</time>",
        esc(&at.to_rfc3339()),
        esc(&at.format("%Y-%m-%d %H:%M:%S UTC").to_string())
    )
}

/// A table with a caption, header cells (text) and rows of cells (markup), wrapped so it
/// scrolls sideways in a narrow window instead of widening the page.
pub(crate) fn table(caption: &str, headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut out = String::from("<div class=\"table-wrap\">\n<table>\n");
    let _ = writeln!(out, "<caption>{}</caption>", esc(caption));
    out.push_str("<thead><tr>");
    for header in headers {
        let _ = write!(out, "<th scope=\"col\">{}</th>", esc(header));
    }
    out.push_str("</tr></thead>\n<tbody>\n");
    if rows.is_empty() {
        let _ = writeln!(
            out,
            "<tr><td colspan=\"{}\" class=\"empty\">None.</td></tr>",
            headers.len().max(1)
        );
    }
    for row in rows {
        out.push_str("<tr>");
        for cell in row {
            let _ = write!(out, "<td>{cell}</td>");
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</tbody>\n</table>\n</div>\n");
    out
}

/// A `<pre>` block of JSON, pretty-printed and escaped.
pub(crate) fn json_block(label: &str, value: &serde_json::Value) -> String {
    let text = serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string());
    format!(
        "<pre class=\"json\" aria-label=\"{}\" tabindex=\"0\">{}</pre>\n",
        esc(label),
        esc(&text)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_leaves_no_markup_and_no_way_out_of_an_attribute() {
        let hostile = "<script>alert('x')</script>\" onmouseover=\"x";
        let escaped = esc(hostile);
        assert!(!escaped.contains('<') && !escaped.contains('"') && !escaped.contains('\''));
        assert_eq!(esc("a & b"), "a &amp; b");
        assert_eq!(query_value("a b&c/é"), "a%20b%26c%2F%C3%A9");
    }

    #[test]
    fn a_page_marks_its_section_current_and_escapes_its_title() {
        let html = page(Section::Sagas, "<b>", "<p>body</p>");
        assert!(html.contains("<a href=\"/admin/sagas\" aria-current=\"page\">Sagas</a>"));
        assert!(html.contains("<h1>&lt;b&gt;</h1>"));
        assert!(!html.contains("<script>"), "no inline script");
        assert!(html.contains("<script src=\"/admin/assets/console.js\" defer></script>"));
        let login = page(Section::None, "Sign in", "");
        assert!(!login.contains("<nav"), "no navigation before signing in");
    }
}
