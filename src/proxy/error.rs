//! Errors of one exchange, tagged with who failed, and the single place that turns them into
//! the client's response (a small JSON body naming route, side and upstream).

use std::error::Error as _;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use serde::Serialize;

use crate::rules::Side;
use crate::upstream::{Body, BoxError};

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot connect to the {side} upstream: {source}")]
    Connect { side: Side, source: BoxError },
    #[error("connecting to the {side} upstream timed out")]
    ConnectTimeout { side: Side },
    #[error("the {side} upstream sent no response within {timeout:?}")]
    Timeout { side: Side, timeout: Duration },
    #[error("the {side} upstream reset the connection: {source}")]
    Reset { side: Side, source: BoxError },
    #[error("the {side} upstream failed: {source}")]
    Upstream { side: Side, source: BoxError },
    #[error("bad request: {0}")]
    BadRequest(&'static str),
    #[error("bad request: {0}")]
    BadPath(#[from] crate::route::path::PathError),
    #[error("the request target is longer than {limit} bytes")]
    UriTooLong { limit: usize },
    #[error("the request body is larger than {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("{0} is not supported by a reverse proxy")]
    MethodNotAllowed(&'static str),
    #[error("the client sent no request-body bytes for {timeout:?}")]
    ClientBodyTimeout { timeout: Duration },
    #[error("the request body failed before its end: {source}")]
    ClientBody { source: BoxError },
    #[error("the request body is in transfer coding {0:?}, which is not supported")]
    UnsupportedTransferCoding(String),
}

/// hyper-util's errors name only their outer layer ("client error (SendRequest)"): the
/// client's message and the log get the whole chain, down to what went wrong (a refused
/// connection, an answer head over the 64 KiB read buffer).
fn with_causes(e: &hyper_util::client::legacy::Error) -> BoxError {
    let mut message = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message.into()
}

impl ProxyError {
    /// Classifies a client error from hyper-util by walking its source chain.
    pub fn from_client(side: Side, e: hyper_util::client::legacy::Error) -> ProxyError {
        let mut source = e.source();
        while let Some(s) = source {
            if let Some(t) = s.downcast_ref::<super::body::TooLarge>() {
                return ProxyError::BodyTooLarge { limit: t.limit };
            }
            if let Some(failed) = s.downcast_ref::<super::body::ClientBodyFailed>() {
                return ProxyError::ClientBody {
                    source: failed.0.to_string().into(),
                };
            }
            source = s.source();
        }
        if e.is_connect() {
            let mut source = e.source();
            while let Some(s) = source {
                if let Some(io) = s.downcast_ref::<std::io::Error>()
                    && io.kind() == std::io::ErrorKind::TimedOut
                {
                    return ProxyError::ConnectTimeout { side };
                }
                source = s.source();
            }
            return ProxyError::Connect {
                side,
                source: with_causes(&e),
            };
        }
        let mut source = e.source();
        while let Some(s) = source {
            if let Some(io) = s.downcast_ref::<std::io::Error>()
                && matches!(
                    io.kind(),
                    std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::BrokenPipe
                )
            {
                return ProxyError::Reset {
                    side,
                    source: with_causes(&e),
                };
            }
            source = s.source();
        }
        ProxyError::Upstream {
            side,
            source: with_causes(&e),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::Connect { .. } | ProxyError::Reset { .. } | ProxyError::Upstream { .. } => {
                StatusCode::BAD_GATEWAY
            }
            ProxyError::ConnectTimeout { .. } | ProxyError::Timeout { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
            ProxyError::BadRequest(_) | ProxyError::BadPath(_) | ProxyError::ClientBody { .. } => {
                StatusCode::BAD_REQUEST
            }
            ProxyError::ClientBodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ProxyError::UriTooLong { .. } => StatusCode::URI_TOO_LONG,
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::UnsupportedTransferCoding(_) => StatusCode::NOT_IMPLEMENTED,
        }
    }

    /// Stable, machine-readable error code for the JSON body and logs.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::Connect { .. } => "upstream_unavailable",
            ProxyError::ConnectTimeout { .. } => "upstream_connect_timeout",
            ProxyError::Timeout { .. } => "upstream_timeout",
            ProxyError::Reset { .. } => "upstream_reset",
            ProxyError::Upstream { .. } => "upstream_error",
            ProxyError::BadRequest(_) => "bad_request",
            ProxyError::BadPath(_) => "bad_path",
            ProxyError::UriTooLong { .. } => "uri_too_long",
            ProxyError::BodyTooLarge { .. } => "body_too_large",
            ProxyError::MethodNotAllowed(_) => "method_not_allowed",
            ProxyError::ClientBodyTimeout { .. } => "client_body_timeout",
            ProxyError::ClientBody { .. } => "client_body_error",
            ProxyError::UnsupportedTransferCoding(_) => "unsupported_transfer_coding",
        }
    }

    /// The `kind` label of `ficus_upstream_errors_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyError::Connect { .. } => "connect",
            ProxyError::ConnectTimeout { .. } => "connect_timeout",
            ProxyError::Timeout { .. } => "timeout",
            ProxyError::Reset { .. } => "reset",
            ProxyError::Upstream { .. } => "upstream",
            ProxyError::BadRequest(_)
            | ProxyError::BadPath(_)
            | ProxyError::UriTooLong { .. }
            | ProxyError::BodyTooLarge { .. }
            | ProxyError::MethodNotAllowed(_)
            | ProxyError::ClientBodyTimeout { .. }
            | ProxyError::ClientBody { .. }
            | ProxyError::UnsupportedTransferCoding(_) => "client",
        }
    }

    /// Whether the answer goes out before the request body was read to its end: hyper then
    /// closes the connection rather than read the rest.
    pub fn leaves_body_unread(&self) -> bool {
        matches!(
            self,
            ProxyError::BodyTooLarge { .. }
                | ProxyError::ClientBody { .. }
                | ProxyError::ClientBodyTimeout { .. }
        )
    }

    /// Whether the client, not an upstream, made the exchange fail.
    pub fn is_client(&self) -> bool {
        self.side().is_none()
    }

    fn side(&self) -> Option<Side> {
        match self {
            ProxyError::Connect { side, .. }
            | ProxyError::ConnectTimeout { side }
            | ProxyError::Timeout { side, .. }
            | ProxyError::Reset { side, .. }
            | ProxyError::Upstream { side, .. } => Some(*side),
            ProxyError::BadRequest(_)
            | ProxyError::BadPath(_)
            | ProxyError::UriTooLong { .. }
            | ProxyError::BodyTooLarge { .. }
            | ProxyError::MethodNotAllowed(_)
            | ProxyError::ClientBodyTimeout { .. }
            | ProxyError::ClientBody { .. }
            | ProxyError::UnsupportedTransferCoding(_) => None,
        }
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'static str,
    message: String,
    route: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    side: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream: Option<&'a str>,
    request_id: &'a str,
}

/// The client's response for a failed exchange.
pub fn rescue(
    err: &ProxyError,
    route: &str,
    upstream: Option<&str>,
    request_id: &HeaderValue,
) -> Response<Body> {
    let body = ErrorBody {
        error: err.code(),
        message: err.to_string(),
        route,
        side: err.side().map(Side::as_str),
        upstream,
        request_id: request_id.to_str().unwrap_or_default(),
    };
    let json = serde_json::to_vec(&body).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = Response::new(full(Bytes::from(json)));
    *resp.status_mut() = err.status();
    let headers = resp.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(super::headers::X_REQUEST_ID.clone(), request_id.clone());
    resp
}

/// A complete body as the shared body type.
pub fn full(bytes: Bytes) -> Body {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}
