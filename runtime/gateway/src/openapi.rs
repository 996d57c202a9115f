//! The OpenAPI 3.1 document of the gateway's public routes, generated from the handlers'
//! annotations (utoipa), served at `/openapi.json`.
//!
//! HTTP functions are not in it: their routes come and go with deploys and their
//! contracts belong to the functions. Health and metrics live on the admin listener and
//! are not public routes either.

use axum::Json;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::bus_routes::{Published, StructuredCloudEvent};
use crate::problem::ProblemBody;

/// The document.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "Patchbay gateway",
        description = "External callers onto the Patchbay bus: publish CloudEvents, send \
                       requests, invoke functions. Errors are RFC 9457 problem details. \
                       Authenticate with `Authorization: Bearer <token>` (`patchbay token create`).",
        license(name = "Apache-2.0", identifier = "Apache-2.0"),
    ),
    paths(
        crate::bus_routes::publish_event,
        crate::bus_routes::request,
        crate::bus_routes::invoke,
        document,
    ),
    components(schemas(Published, ProblemBody, StructuredCloudEvent)),
    modifiers(&BearerAuth),
    tags(
        (name = "bus", description = "Events and requests on NATS subjects"),
        (name = "functions", description = "Event functions"),
        (name = "meta", description = "This document"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some("A Patchbay API token"))
                    .build(),
            ),
        );
    }
}

/// This OpenAPI document.
#[utoipa::path(
    get,
    path = "/openapi.json",
    tag = "meta",
    responses((status = 200, description = "The OpenAPI 3.1 document", content_type = "application/json"))
)]
pub async fn document() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
