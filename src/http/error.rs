//! Why a request to the public listener was refused ([`WebhookError`]), and
//! the one place a refusal becomes an HTTP status and JSON body, whether the
//! handler refused it or no route matched (warp's rejections).

use serde_json::json;
use warp::Reply;
use warp::http::StatusCode;
use warp::reply::Response;

use crate::payload::PayloadError;
use crate::store::StoreError;

/// Why a request was refused; mapped to a status and body in `into_response`.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("unauthorized")]
    Unauthorized,
    #[error("{message}")]
    BadRequest {
        field: &'static str,
        message: String,
    },
    #[error("body larger than {0} bytes")]
    TooLarge(usize),
    #[error("content type must be application/json")]
    UnsupportedMediaType,
    #[error("request body not received in time")]
    Timeout,
    #[error("not found")]
    NotFound,
    #[error("method not allowed: POST the event")]
    MethodNotAllowed,
    /// A method other than GET on `/healthz`.
    #[error("method not allowed")]
    OnlyGet,
    #[error("database unavailable, retry later")]
    Unavailable(StoreError),
    #[error("internal error")]
    Internal(StoreError),
}

impl From<PayloadError> for WebhookError {
    fn from(e: PayloadError) -> Self {
        WebhookError::BadRequest {
            field: e.field,
            message: e.message,
        }
    }
}

impl WebhookError {
    pub(super) fn bad(field: &'static str, message: impl Into<String>) -> Self {
        WebhookError::BadRequest {
            field,
            message: message.into(),
        }
    }

    /// The outcome label counted in metrics.
    pub(super) fn outcome(&self) -> &'static str {
        match self {
            WebhookError::Unauthorized => "unauthorized",
            WebhookError::BadRequest { .. } => "bad_request",
            WebhookError::TooLarge(_) => "too_large",
            WebhookError::UnsupportedMediaType => "unsupported_media_type",
            WebhookError::Timeout => "timeout",
            WebhookError::NotFound => "not_found",
            WebhookError::MethodNotAllowed | WebhookError::OnlyGet => "method_not_allowed",
            WebhookError::Unavailable(_) => "unavailable",
            WebhookError::Internal(_) => "error",
        }
    }

    /// The one place an error becomes an HTTP answer.
    pub(super) fn into_response(self) -> Response {
        let status = match &self {
            WebhookError::Unauthorized => StatusCode::UNAUTHORIZED,
            WebhookError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            WebhookError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            WebhookError::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            WebhookError::Timeout => StatusCode::REQUEST_TIMEOUT,
            WebhookError::NotFound => StatusCode::NOT_FOUND,
            WebhookError::MethodNotAllowed | WebhookError::OnlyGet => {
                StatusCode::METHOD_NOT_ALLOWED
            }
            WebhookError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            WebhookError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let body = match &self {
            WebhookError::BadRequest { field, message } => {
                json!({"error": message, "field": field})
            }
            other => json!({"error": other.to_string()}),
        };
        let mut resp = warp::reply::with_status(warp::reply::json(&body), status).into_response();
        if matches!(
            self,
            WebhookError::Unavailable(_) | WebhookError::Internal(_)
        ) {
            if let Ok(v) = "5".parse() {
                resp.headers_mut().insert("retry-after", v);
            }
        }
        resp
    }
}

/// What a request no route took is refused as: a known path with the wrong
/// method (`POST /healthz`) is 405, anything else 404.
pub(super) fn rejection(rej: &warp::Rejection) -> WebhookError {
    if rej.find::<warp::reject::MethodNotAllowed>().is_some() {
        WebhookError::OnlyGet
    } else {
        WebhookError::NotFound
    }
}
