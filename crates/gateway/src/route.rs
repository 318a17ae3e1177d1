//! Request matching (host, path, method, headers) and path rewriting. Pure: no I/O.
//!
//! Matching runs on the canonical path ([`crate::path::normalize`]); route paths from the
//! configuration are brought to the same form when a route is compiled. This module judges
//! route paths too ([`MatchRule::validate`], called by the configuration's checks), and knows
//! nothing of the configuration file: a route's match section reaches it as a [`MatchRule`].

use std::borrow::Cow;
use std::collections::BTreeMap;

use http::{HeaderMap, HeaderName, HeaderValue, Method};

/// A route's match section and path rewrite, as written in the configuration.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MatchRule<'a> {
    /// `Host` pattern: exact, or `*.suffix`.
    pub(crate) host: Option<&'a str>,
    pub(crate) path_exact: Option<&'a str>,
    pub(crate) path_prefix: Option<&'a str>,
    pub(crate) path_template: Option<&'a str>,
    /// Methods; any when empty.
    pub(crate) methods: &'a [String],
    /// Headers that must be present with these values.
    pub(crate) headers: &'a BTreeMap<String, String>,
    pub(crate) strip_prefix: Option<&'a str>,
    pub(crate) add_prefix: Option<&'a str>,
}

/// Why a [`MatchRule`]'s paths are refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InvalidMatchRule {
    /// The offending key (`path_template`, …), or `None` when the rule as a whole is wrong.
    pub(crate) field: Option<&'static str>,
    pub(crate) message: String,
}

impl MatchRule<'_> {
    /// Checks the path fields: at most one path matcher, every path starting with `/` and
    /// normalisable, and a template that parses.
    ///
    /// # Errors
    /// The first problem, with the field it is in.
    pub(crate) fn validate(&self) -> Result<(), InvalidMatchRule> {
        let invalid = |field, message: &str| InvalidMatchRule {
            field,
            message: message.to_owned(),
        };
        let paths = usize::from(self.path_exact.is_some())
            + usize::from(self.path_prefix.is_some())
            + usize::from(self.path_template.is_some());
        if paths > 1 {
            return Err(invalid(
                None,
                "set at most one of `path_exact`, `path_prefix`, `path_template`",
            ));
        }
        for (field, value) in [
            ("path_exact", self.path_exact),
            ("path_prefix", self.path_prefix),
            ("path_template", self.path_template),
            ("strip_prefix", self.strip_prefix),
            ("add_prefix", self.add_prefix),
        ] {
            if let Some(v) = value
                && !v.starts_with('/')
            {
                return Err(invalid(Some(field), "must start with /"));
            }
            if field != "path_template"
                && let Some(v) = value
                && let Err(e) = crate::path::normalize(v)
            {
                return Err(invalid(
                    Some(field),
                    &format!("cannot be normalised: {}", e.0),
                ));
            }
        }
        if let Some(t) = self.path_template {
            PathTemplate::parse(t).map_err(|m| invalid(Some("path_template"), &m))?;
        }
        Ok(())
    }
}

/// How a route matches the request path.
#[derive(Debug, Clone)]
pub(crate) enum PathMatch {
    /// Any path.
    Any,
    /// Exactly this path.
    Exact(String),
    /// This prefix, on a segment boundary.
    Prefix(String),
    /// A template of literal and `{param}` segments.
    Template(PathTemplate),
}

/// A path template such as `/api/orders/{id}`: `{name}` matches one non-empty segment.
#[derive(Debug, Clone)]
pub struct PathTemplate {
    segments: Vec<Option<String>>,
}

impl PathTemplate {
    /// Parses a template.
    ///
    /// # Errors
    /// A message when a segment is malformed (`{` without `}`, empty name, braces mid-segment).
    pub fn parse(template: &str) -> Result<Self, String> {
        let rest = template
            .strip_prefix('/')
            .ok_or_else(|| "must start with /".to_owned())?;
        let mut segments = Vec::new();
        for segment in rest.split('/') {
            if let Some(inner) = segment.strip_prefix('{') {
                let name = inner
                    .strip_suffix('}')
                    .ok_or_else(|| format!("segment `{segment}` opens `{{` without closing it"))?;
                if name.is_empty() || name.contains(['{', '}']) {
                    return Err(format!("segment `{segment}` needs a name, like {{id}}"));
                }
                segments.push(None);
            } else if segment.contains(['{', '}']) {
                return Err(format!(
                    "segment `{segment}`: a parameter must be a whole segment"
                ));
            } else if segment.is_empty() {
                segments.push(Some(String::new()));
            } else {
                // Request paths are matched in canonical form, so literals are too.
                if segment == "." || segment == ".." {
                    return Err(format!("segment `{segment}` is a dot segment"));
                }
                let slashed = format!("/{segment}");
                let canonical = crate::path::normalize(&slashed)
                    .map_err(|e| format!("segment `{segment}`: {}", e.0))?;
                segments.push(Some(canonical[1..].to_owned()));
            }
        }
        Ok(Self { segments })
    }

    /// Whether `path` matches.
    pub fn matches(&self, path: &str) -> bool {
        let Some(rest) = path.strip_prefix('/') else {
            return false;
        };
        let mut parts = rest.split('/');
        for segment in &self.segments {
            match (segment, parts.next()) {
                (Some(literal), Some(part)) if literal == part => {}
                (None, Some(part)) if !part.is_empty() => {}
                _ => return false,
            }
        }
        parts.next().is_none()
    }
}

/// A host pattern: exact (case-insensitive) or `*.suffix`.
#[derive(Debug, Clone)]
pub(crate) enum HostMatch {
    Exact(String),
    Suffix(String),
}

impl HostMatch {
    fn parse(host: &str) -> Self {
        let host = host.to_ascii_lowercase();
        match host.strip_prefix("*.") {
            Some(suffix) => Self::Suffix(format!(".{suffix}")),
            None => Self::Exact(host),
        }
    }

    fn matches(&self, host: &str) -> bool {
        match self {
            Self::Exact(h) => h.eq_ignore_ascii_case(host),
            Self::Suffix(s) => {
                host.len() > s.len()
                    && host.as_bytes()[host.len() - s.len()..].eq_ignore_ascii_case(s.as_bytes())
            }
        }
    }
}

/// Everything a route matches on, and how it rewrites the path.
#[derive(Debug, Clone)]
pub(crate) struct Matcher {
    host: Option<HostMatch>,
    path: PathMatch,
    methods: Vec<Method>,
    headers: Vec<(HeaderName, HeaderValue)>,
    strip_prefix: Option<String>,
    add_prefix: Option<String>,
}

impl Matcher {
    /// Compiles a validated route's match section. Paths are brought to the canonical form
    /// request paths are matched in (see [`crate::path`]), so `/café` in the file matches a
    /// request for `/caf%C3%A9`.
    pub(crate) fn from_rule(route: &MatchRule<'_>) -> Result<Self, String> {
        let canonical = |p: &str| {
            crate::path::normalize(p)
                .map(Cow::into_owned)
                .map_err(|e| format!("`{p}` cannot be normalised: {}", e.0))
        };
        let path = if let Some(p) = route.path_exact {
            PathMatch::Exact(canonical(p)?)
        } else if let Some(p) = route.path_prefix {
            PathMatch::Prefix(canonical(p)?.trim_end_matches('/').to_owned())
        } else if let Some(t) = route.path_template {
            PathMatch::Template(PathTemplate::parse(t)?)
        } else {
            PathMatch::Any
        };
        let methods = route
            .methods
            .iter()
            .map(|m| Method::from_bytes(m.as_bytes()).map_err(|e| e.to_string()))
            .collect::<Result<_, _>>()?;
        let headers = route
            .headers
            .iter()
            .map(|(k, v)| {
                Ok((
                    HeaderName::from_bytes(k.as_bytes()).map_err(|e| e.to_string())?,
                    HeaderValue::from_str(v).map_err(|e| e.to_string())?,
                ))
            })
            .collect::<Result<_, String>>()?;
        Ok(Self {
            host: route.host.map(HostMatch::parse),
            path,
            methods,
            headers,
            strip_prefix: route
                .strip_prefix
                .map(canonical)
                .transpose()?
                .map(|p| p.trim_end_matches('/').to_owned()),
            add_prefix: route
                .add_prefix
                .map(canonical)
                .transpose()?
                .map(|p| p.trim_end_matches('/').to_owned()),
        })
    }

    /// Whether the request matches. `host` is without port.
    pub(crate) fn matches(
        &self,
        method: &Method,
        host: Option<&str>,
        path: &str,
        headers: &HeaderMap,
    ) -> bool {
        if let Some(pattern) = &self.host {
            match host {
                Some(h) if pattern.matches(h) => {}
                _ => return false,
            }
        }
        if !self.methods.is_empty() && !self.methods.contains(method) {
            return false;
        }
        let path_ok = match &self.path {
            PathMatch::Any => true,
            PathMatch::Exact(p) => p == path,
            PathMatch::Prefix(p) => prefix_matches(p, path),
            PathMatch::Template(t) => t.matches(path),
        };
        path_ok
            && self
                .headers
                .iter()
                .all(|(name, value)| headers.get(name) == Some(value))
    }

    /// The path sent upstream: `strip_prefix` removed, then `add_prefix` added.
    pub(crate) fn rewrite<'a>(&self, path: &'a str) -> Cow<'a, str> {
        let mut out: Cow<'a, str> = Cow::Borrowed(path);
        if let Some(strip) = &self.strip_prefix
            && prefix_matches(strip, path)
        {
            let rest = &path[strip.len()..];
            out = if rest.is_empty() {
                Cow::Borrowed("/")
            } else {
                Cow::Borrowed(rest)
            };
        }
        if let Some(add) = &self.add_prefix {
            out = if out == "/" {
                Cow::Owned(if add.is_empty() {
                    "/".to_owned()
                } else {
                    add.clone()
                })
            } else {
                Cow::Owned(format!("{add}{out}"))
            };
        }
        out
    }
}

fn prefix_matches(prefix: &str, path: &str) -> bool {
    prefix.is_empty()
        || (path.starts_with(prefix)
            && matches!(path.as_bytes().get(prefix.len()), None | Some(b'/')))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RouteConfig;

    fn route(extra: &str) -> RouteConfig {
        let text = format!("name = \"r\"\ncluster = \"c\"\n{extra}");
        toml::from_str(&text).expect("route parses")
    }

    fn matcher(extra: &str) -> Matcher {
        Matcher::from_rule(&route(extra).match_rule()).expect("valid")
    }

    fn matches(m: &Matcher, method: Method, host: Option<&str>, path: &str) -> bool {
        m.matches(&method, host, path, &HeaderMap::new())
    }

    #[test]
    fn a_prefix_matches_on_segment_boundaries_only() {
        let m = matcher("path_prefix = \"/api/\"");
        assert!(matches(&m, Method::GET, None, "/api"));
        assert!(matches(&m, Method::GET, None, "/api/orders"));
        assert!(!matches(&m, Method::GET, None, "/apix"));
    }

    #[test]
    fn a_template_matches_one_non_empty_segment_per_parameter() {
        let m = matcher("path_template = \"/api/orders/{id}\"");
        assert!(matches(&m, Method::GET, None, "/api/orders/42"));
        assert!(!matches(&m, Method::GET, None, "/api/orders/"));
        assert!(!matches(&m, Method::GET, None, "/api/orders/42/items"));
        assert!(!matches(&m, Method::GET, None, "/api/order/42"));
    }

    #[test]
    fn a_rule_with_two_path_matchers_or_a_relative_path_is_refused() {
        let both = route("path_exact = \"/a\"\npath_prefix = \"/b\"");
        assert_eq!(both.match_rule().validate().map_err(|e| e.field), Err(None));
        let relative = route("strip_prefix = \"api\"");
        assert_eq!(
            relative.match_rule().validate().map_err(|e| e.field),
            Err(Some("strip_prefix"))
        );
        let template = route("path_template = \"/a/{id\"");
        assert_eq!(
            template.match_rule().validate().map_err(|e| e.field),
            Err(Some("path_template"))
        );
    }

    #[test]
    fn malformed_templates_are_rejected() {
        assert!(PathTemplate::parse("/a/{id").is_err());
        assert!(PathTemplate::parse("/a/x{id}").is_err());
        assert!(PathTemplate::parse("/a/{}").is_err());
    }

    #[test]
    fn host_method_and_header_must_all_match() {
        let m = matcher(
            "host = \"*.example.com\"\nmethods = [\"POST\"]\nheaders = { x-version = \"2\" }",
        );
        let mut headers = HeaderMap::new();
        headers.insert("x-version", HeaderValue::from_static("2"));
        assert!(m.matches(&Method::POST, Some("API.example.com"), "/", &headers));
        assert!(!m.matches(&Method::GET, Some("api.example.com"), "/", &headers));
        assert!(!m.matches(&Method::POST, Some("example.com"), "/", &headers));
        assert!(!m.matches(
            &Method::POST,
            Some("api.example.com"),
            "/",
            &HeaderMap::new()
        ));
    }

    #[test]
    fn strip_and_add_prefix_rewrite_the_path() {
        let m = matcher("strip_prefix = \"/api\"\nadd_prefix = \"/v1\"");
        assert_eq!(m.rewrite("/api/orders/1"), "/v1/orders/1");
        assert_eq!(m.rewrite("/api"), "/v1");
        assert_eq!(m.rewrite("/apix"), "/v1/apix");
    }
}
