//! The shop's public OpenAPI document: the services' documents merged, with the answers the
//! gateway in front of them can give (read from the shop's own gateway routes).

#[allow(clippy::wildcard_imports)]
use super::*;

/// The whole public API: the services' OpenAPI documents merged.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = shop_users::openapi();
    for part in [
        shop_products::openapi(),
        shop_inventory::openapi(),
        shop_orders::openapi(),
        shop_payments::openapi(),
        shop_shipping::openapi(),
    ] {
        doc.merge(part);
    }
    doc.info.title = "trellis shop".to_owned();
    doc.info.description = Some(
        "The reference shop's public API, served by the trellis gateway. Errors are \
         {\"error\":{\"code\",\"message\"}} with a 4xx/5xx status. Operations marked \
         with the `bearer` scheme need `Authorization: Bearer TOKEN`, a token from \
         `POST /api/auth/token`."
            .to_owned(),
    );
    gateway_answers(&mut doc);
    doc
}

/// The name of the bearer-token security scheme in [`openapi`].
pub const BEARER_SCHEME: &str = "bearer";

/// Adds what the gateway in front of every service answers to each operation of `doc`,
/// reading the gateway's own routes ([`config_toml`]): the bearer token and 401 where the route
/// authenticates, 403 where it needs a role, 429 where it is rate limited, 413 for a body over
/// the gateway's limit, 400 `invalid_path` for a path parameter it cannot normalise, and
/// 500/502/503/504 everywhere (the gateway's own fault, an upstream that is down, has no
/// healthy endpoint, or does not answer in time).
fn gateway_answers(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::security::SecurityScheme;
    use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityRequirement};

    let loopback = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 1);
    let addrs = SERVICES.iter().map(|name| (*name, loopback)).collect();
    let config = trellis_gateway::Config::from_toml(&config_toml(loopback, loopback, &addrs))
        .expect("the shop's gateway configuration is valid");
    let body_limit = config.server.body_bytes_max / 1024;
    let routes = config.routes;

    for (path, item) in &mut doc.paths.paths {
        for (method, operation) in [
            ("GET", &mut item.get),
            ("PUT", &mut item.put),
            ("POST", &mut item.post),
            ("DELETE", &mut item.delete),
            ("PATCH", &mut item.patch),
        ] {
            let Some(operation) = operation.as_mut() else {
                continue;
            };
            let route = routes
                .iter()
                .find(|route| route_serves(route, method, path));
            let answers = &mut operation.responses.responses;
            if let Some(route) = route {
                if !route.auth.is_empty() {
                    operation.security = Some(vec![SecurityRequirement::new(
                        BEARER_SCHEME,
                        Vec::<String>::new(),
                    )]);
                    add_answer(
                        answers,
                        401,
                        "the gateway: no bearer token, or one that does not verify \
                         (`unauthenticated`, with `WWW-Authenticate`)",
                        None,
                    );
                }
                if !route.required_roles.is_empty() {
                    add_answer(
                        answers,
                        403,
                        &format!(
                            "the gateway: the token lacks the role {} (`forbidden`)",
                            route.required_roles.join(" or ")
                        ),
                        None,
                    );
                }
                if route.rate_limit.is_some() {
                    add_answer(
                        answers,
                        429,
                        "the gateway: over this caller's rate limit (`rate_limited`); \
                         `Retry-After` says when to try again",
                        Some("Retry-After"),
                    );
                }
            }
            if operation.request_body.is_some() {
                add_answer(
                    answers,
                    413,
                    &format!("the gateway: a body over {body_limit} KiB (`body_too_large`)"),
                    None,
                );
            }
            if path.contains('{') {
                add_answer(
                    answers,
                    400,
                    "the gateway: a path it cannot normalise safely, such as an encoded slash \
                     or control character (`invalid_path`)",
                    None,
                );
            }
            add_answer(
                answers,
                500,
                "the gateway: internal error (`internal`)",
                None,
            );
            add_answer(
                answers,
                502,
                "the gateway: the service is unreachable or broke the exchange \
                 (`upstream_unreachable`, `upstream_failed`)",
                None,
            );
            add_answer(
                answers,
                503,
                "the gateway: no healthy endpoint of the service (`no_healthy_upstream`; \
                 `Retry-After` when a breaker will admit a trial call)",
                Some("Retry-After"),
            );
            add_answer(
                answers,
                504,
                "the gateway: the service did not answer in time (`upstream_timeout`)",
                None,
            );
        }
    }
    let scheme = HttpBuilder::new()
        .scheme(HttpAuthScheme::Bearer)
        .bearer_format("JWT")
        .description(Some(
            "An access token from POST /api/auth/token, as `Authorization: Bearer TOKEN`",
        ))
        .build();
    doc.components
        .get_or_insert_with(Default::default)
        .add_security_scheme(BEARER_SCHEME, SecurityScheme::Http(scheme));
}

/// Whether the gateway sends `method path` (an OpenAPI path template) to `route`; the first
/// route that does is the one that serves it, as in the gateway.
fn route_serves(route: &trellis_gateway::config::RouteConfig, method: &str, path: &str) -> bool {
    let method_ok = route.methods.is_empty() || route.methods.iter().any(|m| m == method);
    let path_ok = match (&route.path_exact, &route.path_prefix) {
        (Some(exact), _) => exact == path,
        (None, Some(prefix)) => {
            path.starts_with(prefix.as_str())
                && matches!(path.as_bytes().get(prefix.len()), None | Some(b'/'))
        }
        (None, None) => false,
    };
    method_ok && path_ok
}

/// Documents `status` with `description`, the error body and `header` (seconds to wait), or,
/// when the service documents the status already, adds `description` (and `header`) to the
/// service's.
fn add_answer(
    answers: &mut BTreeMap<String, utoipa::openapi::RefOr<utoipa::openapi::response::Response>>,
    status: u16,
    description: &str,
    header: Option<&str>,
) {
    use utoipa::openapi::header::HeaderBuilder;
    use utoipa::openapi::response::ResponseBuilder;
    use utoipa::openapi::schema::{ObjectBuilder, Type};
    use utoipa::openapi::{ContentBuilder, Ref, RefOr};

    let response = answers.entry(status.to_string()).or_insert_with(|| {
        let mut first = description.chars();
        let capitalised: String = first
            .next()
            .map(|c| c.to_uppercase().chain(first).collect())
            .unwrap_or_default();
        RefOr::T(
            ResponseBuilder::new()
                .description(capitalised)
                .content(
                    "application/json",
                    ContentBuilder::new()
                        .schema(Some(Ref::from_schema_name("ErrorBody")))
                        .build(),
                )
                .build(),
        )
    });
    let RefOr::T(response) = response else {
        return;
    };
    if !response
        .description
        .to_lowercase()
        .contains(&description.to_lowercase())
    {
        response.description.push_str("; ");
        response.description.push_str(description);
    }
    if let Some(name) = header {
        response.headers.entry(name.to_owned()).or_insert_with(|| {
            RefOr::T(
                HeaderBuilder::new()
                    .schema(Some(
                        ObjectBuilder::new().schema_type(Type::Integer).build(),
                    ))
                    .description(Some("Seconds to wait"))
                    .build(),
            )
        });
    }
}
