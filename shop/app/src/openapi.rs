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
    doc.merge(admin_api());
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

/// The operator API the gateway routes under `/api/admin` (administrators only): the payment
/// provider simulator's settings (its own document, moved to the gateway's path), the dead-letter
/// queue (trellis-bus's endpoints) and the order saga's inspector (trellis-saga's), as the
/// crates' docs describe them. Answers are left without a schema where their shape is the
/// crate's to change; every error is the usual `ErrorBody`.
fn admin_api() -> utoipa::openapi::OpenApi {
    let error = |description: &str| {
        serde_json::json!({"description": description, "content": {"application/json":
            {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}})
    };
    let ok = |description: &str| serde_json::json!({"description": description, "content": {"application/json": {}}});
    let none = |description: &str| serde_json::json!({ "description": description });
    let text = |name: &str, place: &str, description: &str| {
        serde_json::json!({"name": name, "in": place, "required": place == "path",
            "description": description, "schema": {"type": "string"}})
    };
    // The inspector's bodies: optional, objects of these fields and no others.
    let body = |properties: serde_json::Value, required: &[&str]| {
        serde_json::json!({"required": false, "content": {"application/json": {"schema":
            {"type": "object", "properties": properties, "required": required,
             "additionalProperties": false}}}})
    };
    let dlq_filter: Vec<serde_json::Value> = [
        ("group", "Only this consumer group's letters"),
        ("topic", "Only this topic's"),
        ("type", "Only this event type's"),
        (
            "error_contains",
            "Only letters whose last error contains this text",
        ),
        (
            "fingerprint",
            "Only this failure group (`fingerprint` of a group)",
        ),
        ("reason", "Only letters dead-lettered for this reason"),
        ("older_than", "Only letters older than this many seconds"),
        ("newer_than", "Only letters newer than this many seconds"),
        ("state", "Only letters in this state"),
        ("limit", "Page size (a whole number)"),
    ]
    .into_iter()
    .map(|(name, description)| text(name, "query", description))
    .collect();
    let mut dlq_list = dlq_filter.clone();
    dlq_list.push(text(
        "cursor",
        "query",
        "With a cursor (empty for the first page) the answer is a page \
         `{\"dead_letters\",\"next_cursor\"}`; without, the first page as an array (and \
         `x-next-cursor` when more follow)",
    ));
    // `status` and `answer` on success; `one` when the path names a letter (404 then).
    let dlq_answers = |status: &str, answer: serde_json::Value, one: bool| {
        let mut answers = serde_json::json!({
            "400": error("Bad input (`invalid_input`)"),
            "500": error("Internal error (`internal`)"),
            "503": error("The bus is unavailable (`backend_unavailable`); try again"),
        });
        answers[status] = answer;
        if one {
            answers["404"] = error("No such dead letter (`dead_letter_not_found`)");
        }
        answers
    };
    let saga_errors = |ok_answer: serde_json::Value| {
        serde_json::json!({
            "200": ok_answer,
            "400": error("Bad input (`bad_request`)"),
            "404": error("No such saga (`saga_not_found`)"),
            "409": error("The saga is being run (`saga_leased`), or the action does not apply \
                (`action_rejected`, `conflict`)"),
            "500": error("Internal error (`internal`)"),
            "503": error("The saga log is unavailable (`unavailable`); try again"),
        })
    };
    let id = text("id", "path", "The id");
    let dlq = "dead letters (trellis-bus)";
    let sagas = "sagas (trellis-saga)";
    let document = serde_json::json!({
        "openapi": "3.1.0",
        "info": {"title": "trellis shop: operators", "version": "1"},
        "paths": {
            "/api/admin/dlq/dead-letters": {"get": {"tags": [dlq],
                "summary": "Dead letters matching the filter, oldest first",
                "parameters": dlq_list,
                "responses": dlq_answers("200", ok("The letters: an array, or a page with a cursor"), false)}},
            "/api/admin/dlq/dead-letters/groups": {"get": {"tags": [dlq],
                "summary": "Dead letters matching the filter, grouped by failure, largest first",
                "parameters": dlq_filter,
                "responses": dlq_answers("200", ok("The failure groups"), false)}},
            "/api/admin/dlq/dead-letters/actions": {"get": {"tags": [dlq],
                "summary": "The most recent operator actions on dead letters, newest first",
                "parameters": [text("limit", "query", "How many (a whole number)")],
                "responses": dlq_answers("200", ok("The actions"), false)}},
            "/api/admin/dlq/dead-letters/redrive": {"post": {"tags": [dlq],
                "summary": "Redrives every dead letter the filter in the body matches",
                "requestBody": {"required": true, "content": {"application/json": {"schema":
                    {"type": "object", "description": "The filter: the query parameters of \
                        the listing, as fields"}}}},
                "responses": dlq_answers("200", ok("`{\"redriven\": [id]}`"), false)}},
            "/api/admin/dlq/dead-letters/{id}": {
                "get": {"tags": [dlq], "summary": "One dead letter", "parameters": [id],
                    "responses": dlq_answers("200", ok("The letter"), true)},
                "delete": {"tags": [dlq], "summary": "Discards a dead letter",
                    "parameters": [id], "responses": dlq_answers("204", none("Done: discarded"), true)}},
            "/api/admin/dlq/dead-letters/{id}/redrive": {"post": {"tags": [dlq],
                "summary": "Sends a dead letter back to its topic", "parameters": [id],
                "responses": dlq_answers("200", ok("`{\"redriven\": [id]}`"), true)}},
            "/api/admin/dlq/dead-letters/{id}/archive": {"post": {"tags": [dlq],
                "summary": "Archives a dead letter", "parameters": [id],
                "responses": dlq_answers("204", none("Done: archived"), true)}},
            "/api/admin/sagas": {"get": {"tags": [sagas],
                "summary": "The order sagas matching the filter",
                "parameters": [
                    text("status", "query", "Comma-separated statuses, e.g. `stuck,failed`"),
                    text("definition", "query", "Only this saga definition's"),
                    text("older_than_secs", "query", "Only sagas older than this"),
                    text("younger_than_secs", "query", "Only sagas younger than this"),
                    text("limit", "query", "How many (a whole number)"),
                ],
                "responses": saga_errors(ok("The sagas"))}},
            "/api/admin/sagas/purge": {"post": {"tags": [sagas],
                "summary": "Deletes finished sagas older than `older_than_days`",
                "requestBody": body(serde_json::json!({"older_than_days":
                    {"type": "integer", "minimum": 0}}), &[]),
                "responses": saga_errors(ok("How many were purged"))}},
            "/api/admin/sagas/{id}": {"get": {"tags": [sagas],
                "summary": "One saga with its log", "parameters": [id],
                "responses": saga_errors(ok("The saga"))}},
            "/api/admin/sagas/{id}/cancel": {"post": {"tags": [sagas],
                "summary": "Cancels a saga: its completed steps are compensated",
                "parameters": [id],
                "requestBody": body(serde_json::json!({"reason": {"type": "string"}}), &[]),
                "responses": saga_errors(ok("What was written to the saga's log"))}},
            "/api/admin/sagas/{id}/retry": {"post": {"tags": [sagas],
                "summary": "Runs a stuck or failed saga's current step again",
                "parameters": [id],
                "responses": saga_errors(ok("What was written to the saga's log"))}},
            "/api/admin/sagas/{id}/skip": {"post": {"tags": [sagas],
                "summary": "Marks a step done without running it", "parameters": [id],
                "requestBody": body(serde_json::json!({"step": {"type": "string"}}), &["step"]),
                "responses": saga_errors(ok("What was written to the saga's log"))}},
            "/api/admin/orders/{id}/saga": {"get": {"tags": [sagas],
                "summary": "The saga of an order", "parameters": [id],
                "responses": {
                    "200": ok("`{\"order_id\", \"saga_id\"}`"),
                    "404": error("No such order, or no saga for it (yet, or the saga is \
                        choreographed) (`not_found`)"),
                    "500": error("Internal error (`internal`)"),
                }}},
        },
    });
    let mut doc: utoipa::openapi::OpenApi =
        serde_json::from_value(document).expect("the operator API document is valid");
    // The provider simulator's settings, as the gateway serves them.
    let mut provider = shop_payment_provider::openapi();
    if let Some(mut settings) = provider.paths.paths.remove("/admin/config") {
        if let Some(put) = settings.put.as_mut() {
            // What the simulator's JSON extractor answers and its document leaves out.
            let answer: utoipa::openapi::RefOr<utoipa::openapi::response::Response> =
                serde_json::from_value(error(
                    "No `Content-Type: application/json` (`unsupported_media_type`)",
                ))
                .expect("a valid response");
            put.responses.responses.insert("415".to_owned(), answer);
        }
        doc.paths
            .paths
            .insert("/api/admin/provider".to_owned(), settings);
    }
    if let Some(components) = provider.components.as_mut() {
        components
            .schemas
            .retain(|name, _| name.starts_with("ProviderConfig"));
    }
    provider.paths.paths.clear();
    doc.merge(provider);
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
