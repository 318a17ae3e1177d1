//! Request-path normalisation: the one spelling of a path that routes match on and that is
//! forwarded upstream. Pure: no I/O.
//!
//! Routing on the path as received lets a client pick one route and reach another: an
//! upstream that resolves `/public/../admin`, decodes `%2e%2e` or `%2f`, turns `\` into `/`,
//! merges `//` or drops `;params` (as Tomcat, nginx, IIS and most file servers do) serves
//! `/admin` for a request the gateway matched against `/public`. So the gateway first brings
//! the path to a canonical form, matches routes on that form, and forwards exactly that
//! form, leaving the upstream nothing to reinterpret:
//!
//! - percent-encoded unreserved characters (`A-Z a-z 0-9 - . _ ~`) are decoded; every other
//!   escape is kept, with upper-case hex digits (RFC 3986 §6.2.2);
//! - bytes that may not appear raw in a path (non-ASCII, space, `"`, `<`, `>`, `{`...) are
//!   percent-encoded;
//! - empty segments are dropped (`//admin` is `/admin`), then `.` and `..` segments are
//!   resolved as RFC 3986 §5.2.4 does;
//! - a trailing slash is kept.
//!
//! What cannot be normalised without guessing how the upstream reads it is refused (the
//! caller answers 400 `invalid_path`): an encoded slash or backslash (`%2F`, `%5C`), a dot
//! segment spelt with an escape (`%2e`, `.%2E`), a double-encoded dot, slash or backslash
//! (`%252e`), a raw backslash, a raw `;` (Tomcat and Jetty strip `;params` before routing, so
//! `/public/..;/admin` would be `/admin` to them; a literal `;` can be sent as `%3B`), a
//! control character raw or encoded, a malformed escape, a `..` that climbs above the root,
//! and a path that does not start with `/` (`*`, authority-form).
//!
//! Paths stay case-sensitive, as RFC 3986 defines them and as the upstreams trellis targets
//! (axum, hyper, most frameworks) route: `/ADMIN` does not match a route for `/admin`. An
//! upstream that routes case-insensitively (IIS, some Spring set-ups) must not share a
//! catch-all route with a protected prefix, or `/ADMIN` reaches it through the catch-all.

use std::borrow::Cow;

/// Why a path was refused; the message is safe to show the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct InvalidPath(pub(crate) &'static str);

/// The canonical form of `path` (see the module docs), borrowed when `path` already is.
pub(crate) fn normalize(path: &str) -> Result<Cow<'_, str>, InvalidPath> {
    let Some(rest) = path.strip_prefix('/') else {
        return Err(InvalidPath("the path must start with `/`"));
    };
    if is_canonical(rest) {
        return Ok(Cow::Borrowed(path));
    }
    let raw_segments: Vec<&str> = rest.split('/').collect();
    let mut segments: Vec<String> = Vec::with_capacity(raw_segments.len());
    let mut trailing_slash = false;
    for (index, raw) in raw_segments.iter().enumerate() {
        let last = index + 1 == raw_segments.len();
        let (segment, escaped_dot) = decode_segment(raw)?;
        trailing_slash = last;
        match segment.as_str() {
            "" => {}
            "." | ".." if escaped_dot => {
                return Err(InvalidPath("a dot segment spelt with a percent-escape"));
            }
            "." => {}
            ".." => {
                if segments.pop().is_none() {
                    return Err(InvalidPath("`..` climbs above the root"));
                }
            }
            _ => {
                trailing_slash = false;
                segments.push(segment);
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for segment in &segments {
        out.push('/');
        out.push_str(segment);
    }
    if out.is_empty() || trailing_slash {
        out.push('/');
    }
    if out == path {
        Ok(Cow::Borrowed(path))
    } else {
        Ok(Cow::Owned(out))
    }
}

/// Whether the path after its leading `/` is already canonical: no escapes, only plain path
/// characters, no empty segment but a trailing one, no dot segment. The common case, checked
/// without allocating.
fn is_canonical(rest: &str) -> bool {
    let mut segments = rest.split('/').peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        if (segment.is_empty() && !last) || segment == "." || segment == ".." {
            return false;
        }
        if !segment.bytes().all(is_plain) {
            return false;
        }
    }
    true
}

/// A byte kept as it is in a canonical segment: unreserved, sub-delims but `;`, `:` and `@`.
fn is_plain(byte: u8) -> bool {
    is_unreserved(byte)
        || matches!(
            byte,
            b'!' | b'$' | b'&' | b'\'' | b'(' | b')' | b'*' | b'+' | b',' | b'=' | b':' | b'@'
        )
}

fn is_unreserved(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~')
}

fn hex_value(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

fn push_escaped(out: &mut String, byte: u8) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    out.push('%');
    out.push(char::from(HEX[usize::from(byte >> 4)]));
    out.push(char::from(HEX[usize::from(byte & 0x0f)]));
}

/// One segment in canonical spelling, and whether an escape decoded to a `.` in it.
fn decode_segment(raw: &str) -> Result<(String, bool), InvalidPath> {
    let bytes = raw.as_bytes();
    let mut out = String::with_capacity(bytes.len());
    let mut escaped_dot = false;
    let mut i = 0;
    while i < bytes.len() {
        let byte = bytes[i];
        match byte {
            b'%' => {
                let value = match (
                    bytes.get(i + 1).copied().and_then(hex_value),
                    bytes.get(i + 2).copied().and_then(hex_value),
                ) {
                    (Some(high), Some(low)) => (high << 4) | low,
                    _ => return Err(InvalidPath("a malformed percent-escape")),
                };
                match value {
                    b'/' | b'\\' => {
                        return Err(InvalidPath("an encoded slash or backslash"));
                    }
                    0x00..=0x1f | 0x7f => {
                        return Err(InvalidPath("an encoded control character"));
                    }
                    _ if is_unreserved(value) => {
                        escaped_dot |= value == b'.';
                        out.push(char::from(value));
                    }
                    _ => push_escaped(&mut out, value),
                }
                i += 3;
                continue;
            }
            b'\\' => return Err(InvalidPath("a backslash")),
            b';' => {
                return Err(InvalidPath(
                    "a `;` path parameter (send `%3B` for a literal `;`)",
                ));
            }
            0x00..=0x1f | 0x7f => return Err(InvalidPath("a control character")),
            _ if is_plain(byte) => out.push(char::from(byte)),
            // Non-ASCII (UTF-8) bytes and ASCII that may not appear raw in a path.
            _ => push_escaped(&mut out, byte),
        }
        i += 1;
    }
    // Checked on the result, not the input, so that `%25%32%65` (which becomes `%252e`) is
    // refused too and normalising twice gives what normalising once gave.
    if has_double_escape(&out) {
        return Err(InvalidPath(
            "a double-encoded dot, slash or backslash (`%252e`, `%252F`, `%255C`)",
        ));
    }
    Ok((out, escaped_dot))
}

/// Whether `segment` holds `%25` followed by the hex of `.`, `/` or `\`: an upstream that
/// decodes twice would see a dot segment or a separator.
fn has_double_escape(segment: &str) -> bool {
    segment.match_indices("%25").any(|(at, _)| {
        let next = segment.as_bytes().get(at + 3..at + 5);
        matches!(next, Some(pair) if pair.eq_ignore_ascii_case(b"2e")
            || pair.eq_ignore_ascii_case(b"2f")
            || pair.eq_ignore_ascii_case(b"5c"))
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn ok(path: &str) -> String {
        normalize(path)
            .unwrap_or_else(|e| panic!("`{path}` refused: {}", e.0))
            .into_owned()
    }

    #[test]
    fn dot_segments_and_empty_segments_are_resolved() {
        assert_eq!(ok("/public/../admin"), "/admin");
        assert_eq!(ok("/./admin"), "/admin");
        assert_eq!(ok("//admin"), "/admin");
        assert_eq!(ok("/a/b/./c/../d"), "/a/b/d");
        assert_eq!(ok("/a/b/.."), "/a/");
        assert_eq!(ok("/a/."), "/a/");
        assert_eq!(ok("/a//"), "/a/");
        assert_eq!(ok("/"), "/");
        assert_eq!(ok("/a/.."), "/");
    }

    #[test]
    fn escaped_unreserved_characters_are_decoded_and_others_kept_in_upper_case() {
        assert_eq!(ok("/%61dmin"), "/admin");
        assert_eq!(ok("/file%2ejson"), "/file.json");
        assert_eq!(ok("/hello%20world"), "/hello%20world");
        assert_eq!(ok("/caf%c3%a9"), "/caf%C3%A9");
        assert_eq!(ok("/caf\u{e9}"), "/caf%C3%A9");
        assert_eq!(ok("/a%3bb"), "/a%3Bb");
        assert_eq!(ok("/100%25"), "/100%25");
    }

    #[test]
    fn a_canonical_path_is_borrowed() {
        assert!(matches!(
            normalize("/api/orders/42"),
            Ok(Cow::Borrowed("/api/orders/42"))
        ));
        assert!(matches!(normalize("/api/"), Ok(Cow::Borrowed("/api/"))));
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        for path in [
            "/public/%2e%2e/admin",
            "/public/%2E%2e/admin",
            "/public/.%2e/admin",
            "/public/%2e/admin",
            "/public/..%2fadmin",
            "/public%2f..%2fadmin",
            "/public/..%5cadmin",
            "/public/..\\admin",
            "/public/..;/admin",
            "/admin;jsessionid=1",
            "/public/%00/../admin",
            "/public/\u{1}",
            "/public/%252e%252e/admin",
            "/public/%25%32%65%25%32%65/admin",
            "/public/%zz",
            "/public/%4",
            "/..",
            "/public/../../admin",
            "*",
            "",
            "admin",
        ] {
            assert!(normalize(path).is_err(), "`{path}` was accepted");
        }
    }

    /// Pieces that paths are built from in the property below: the characters and escapes
    /// that matter to normalisation.
    fn piece() -> impl Strategy<Value = &'static str> {
        prop::sample::select(vec![
            "/", "/", "/", ".", "..", "a", "B", "%2e", "%2E", "%2f", "%5c", "%41", "%7e", "%20",
            "%c3%a9", "%25", "%", "2e", ";", "\\", "~", "é", " ", "%00", "?",
        ])
    }

    proptest! {
        #[test]
        fn normalising_is_idempotent_and_leaves_no_dot_segment_or_double_slash(
            pieces in prop::collection::vec(piece(), 0..24)
        ) {
            let path = format!("/{}", pieces.concat());
            if let Ok(once) = normalize(&path) {
                let twice = normalize(&once).map(Cow::into_owned);
                prop_assert_eq!(twice.as_deref(), Ok(once.as_ref()));
                prop_assert!(once.starts_with('/'));
                prop_assert!(!once.contains("//"), "{}", once);
                for segment in once.split('/') {
                    prop_assert!(segment != "." && segment != "..", "{}", once);
                }
            }
        }
    }
}
