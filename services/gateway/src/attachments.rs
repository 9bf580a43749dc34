//! `POST /v1/attachments` and `GET /v1/attachments/{id}`: uploads read under a hard
//! limit while streaming (never an unbounded buffer), types checked against an
//! allowlist, downloads served with headers that keep browsers from running them.

use axum::body::Body as RawBody;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use chat_proto::v1 as pb;
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use crate::backend::caller;
use crate::error::{CommandError, ErrorCode, HttpError};
use crate::protocol::json;
use crate::rest::{Params, User};
use crate::state::AppState;

/// Largest upload.
pub const MAX_UPLOAD: usize = 10 * 1024 * 1024;

/// Declared types kept as they are; anything else is stored as
/// `application/octet-stream`. No HTML, SVG or script types: those could run in a
/// browser that opens the download.
const ALLOWED_TYPES: &[&str] = &[
    "image/png",
    "image/jpeg",
    "image/gif",
    "image/webp",
    "application/pdf",
    "text/plain",
    "audio/mpeg",
    "audio/ogg",
    "audio/webm",
    "video/mp4",
    "video/webm",
    "application/zip",
];

/// The attachment routes, with their OpenAPI descriptions.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(upload)).routes(routes!(download))
}

/// The stored content type for a declared one.
pub fn allowed_type(declared: Option<&str>) -> &'static str {
    let mime = declared.and_then(|d| d.split(';').next()).map(|m| m.trim().to_ascii_lowercase());
    ALLOWED_TYPES.iter().find(|t| Some(**t) == mime.as_deref()).copied().unwrap_or("application/octet-stream")
}

fn too_large() -> HttpError {
    HttpError(CommandError::new(ErrorCode::TooLarge, format!("attachments are at most {MAX_UPLOAD} bytes")))
}

#[derive(Deserialize)]
struct UploadQuery {
    #[serde(default)]
    name: Option<String>,
}

#[utoipa::path(post, path = "/v1/attachments", tag = "attachments",
    params(("name" = Option<String>, Query, description = "file name")),
    request_body(content = String, content_type = "application/octet-stream", description = "the file's bytes; Content-Type is kept if allowlisted"),
    responses((status = 201, description = "`{attachment:{id,name,content_type,size,url}}`"), (status = 400, description = "empty body"),
        (status = 401, description = "no valid Bearer token"), (status = 413, description = "over 10 MiB")))]
/// `POST /v1/attachments?name=` with the raw bytes as the body → 201 `{attachment}`;
/// 413 over 10 MiB.
#[tracing::instrument(skip_all, fields(user = %user.sub))]
async fn upload(
    State(state): State<AppState>,
    User(user): User,
    Params(q): Params<UploadQuery>,
    headers: HeaderMap,
    body: RawBody,
) -> Result<Response, HttpError> {
    let declared_len =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if declared_len.is_some_and(|n| n > MAX_UPLOAD) {
        return Err(too_large());
    }
    // Reads at most MAX_UPLOAD bytes, whatever the client declared.
    let data = axum::body::to_bytes(body, MAX_UPLOAD).await.map_err(|_| too_large())?;
    if data.is_empty() {
        return Err(HttpError::bad_request("the body is the file; it is empty"));
    }
    let content_type = allowed_type(headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()));
    let req = pb::UploadAttachmentRequest {
        caller: Some(caller(&user)),
        name: q.name.unwrap_or_default(),
        content_type: content_type.to_owned(),
        data: data.to_vec(),
    };
    let attachment = state.backend().upload_attachment(req).await?;
    Ok((StatusCode::CREATED, Json(json::attachment_body(&attachment))).into_response())
}

#[utoipa::path(get, path = "/v1/attachments/{id}", tag = "attachments",
    params(("id" = String, Path, description = "attachment id")),
    responses((status = 200, description = "the bytes"), (status = 401, description = "no valid Bearer token"),
        (status = 403, description = "neither the uploader nor a member of a room where it was shared"),
        (status = 404, description = "no such attachment")))]
/// `GET /v1/attachments/{id}` → the bytes, for the uploader or a member of a room
/// whose message carries the attachment.
#[tracing::instrument(skip_all, fields(user = %user.sub, attachment = %id))]
async fn download(
    State(state): State<AppState>,
    User(user): User,
    Path(id): Path<String>,
) -> Result<Response, HttpError> {
    let reply = state
        .backend()
        .get_attachment(pb::GetAttachmentRequest { caller: Some(caller(&user)), attachment_id: id })
        .await?;
    let meta = reply.attachment.unwrap_or_default();
    let inline = meta.content_type.starts_with("image/");
    let mut headers = HeaderMap::new();
    let content_type =
        HeaderValue::from_str(&meta.content_type).unwrap_or(HeaderValue::from_static("application/octet-stream"));
    headers.insert(header::CONTENT_TYPE, content_type);
    if let Ok(disposition) = HeaderValue::from_str(&content_disposition(&meta.name, inline)) {
        headers.insert(header::CONTENT_DISPOSITION, disposition);
    }
    headers.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    headers.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static("default-src 'none'; sandbox"));
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("private, max-age=3600"));
    Ok((headers, reply.data).into_response())
}

/// `attachment; filename="<ascii>"; filename*=UTF-8''<percent-encoded>` (RFC 6266):
/// the quoted form keeps only safe ASCII, the encoded form carries the real name.
pub fn content_disposition(name: &str, inline: bool) -> String {
    let ascii: String =
        name.chars().map(|c| if c.is_ascii_graphic() && c != '"' && c != '\\' || c == ' ' { c } else { '_' }).collect();
    let mut encoded = String::new();
    for b in name.bytes() {
        let c = b as char;
        if c.is_ascii_alphanumeric() || "!#$&+-.^_`|~".contains(c) {
            encoded.push(c);
        } else {
            encoded.push_str(&format!("%{b:02X}"));
        }
    }
    let kind = if inline { "inline" } else { "attachment" };
    format!("{kind}; filename=\"{ascii}\"; filename*=UTF-8''{encoded}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_allowlisted_types_survive() {
        assert_eq!(allowed_type(Some("image/png")), "image/png");
        assert_eq!(allowed_type(Some("Text/Plain; charset=utf-8")), "text/plain");
        assert_eq!(allowed_type(Some("text/html")), "application/octet-stream");
        assert_eq!(allowed_type(Some("image/svg+xml")), "application/octet-stream");
        assert_eq!(allowed_type(None), "application/octet-stream");
    }

    #[test]
    fn dispositions_cannot_break_out_of_the_header() {
        let d = content_disposition("re\"port\r\n.pdf", false);
        assert_eq!(d, "attachment; filename=\"re_port__.pdf\"; filename*=UTF-8''re%22port%0D%0A.pdf");
        let d = content_disposition("café.png", true);
        assert!(d.starts_with("inline; filename=\"caf_.png\""), "{d}");
        assert!(d.ends_with("caf%C3%A9.png"), "{d}");
    }
}
