//! Header rewriting between client and upstream: hop-by-hop removal, `X-Forwarded-*`, `Via`,
//! `Host`, and the request id.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Version};

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// W3C Trace Context (https://www.w3.org/TR/trace-context/).
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// Longest client-supplied request id that is passed on; longer ones are replaced.
const MAX_REQUEST_ID_LEN: usize = 128;

/// Removes hop-by-hop headers (RFC 9110 7.6.1): the fixed list and those named in `Connection`.
/// With `keep_upgrade`, `Connection: upgrade` and `Upgrade` survive for a protocol switch.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .filter(|name| !(keep_upgrade && name == header::UPGRADE))
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in [
        &header::CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::PROXY_AUTHENTICATE,
        &header::PROXY_AUTHORIZATION,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
    ] {
        headers.remove(name);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// Whether an HTTP/1.1 request asks to switch protocols (WebSocket and the like).
pub fn is_upgrade_request<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// The request id the client sent, when usable, or a fresh random UUID.
pub fn ensure_request_id(headers: &mut HeaderMap) -> HeaderValue {
    if let Some(id) = headers.get(&X_REQUEST_ID)
        && !id.is_empty()
        && id.len() <= MAX_REQUEST_ID_LEN
    {
        return id.clone();
    }
    let uuid = uuid::Builder::from_random_bytes(fastrand::u128(..).to_le_bytes()).into_uuid();
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let text = uuid.hyphenated().encode_lower(&mut buf);
    // A hyphenated UUID is always a valid header value.
    let id = HeaderValue::from_str(text).unwrap_or_else(|_| HeaderValue::from_static("invalid"));
    headers.insert(X_REQUEST_ID.clone(), id.clone());
    id
}

/// Keeps a valid `traceparent` from the client, or starts a trace (flags `00`: ficus does not
/// force sampling on the systems behind it). Returns the trace id, for logs.
pub fn ensure_traceparent(headers: &mut HeaderMap) -> String {
    if let Some(trace_id) = headers
        .get(&TRACEPARENT)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_traceparent)
    {
        return trace_id.to_string();
    }
    let trace_id = format!("{:032x}", fastrand::u128(1..));
    let value = format!("00-{trace_id}-{:016x}-00", fastrand::u64(1..));
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(TRACEPARENT.clone(), v);
    }
    trace_id
}

/// Gives an outgoing request a span of its own: same trace id and flags, a fresh parent id.
/// The authority call and the shadow call are thus sibling spans of one exchange.
pub fn child_traceparent(headers: &mut HeaderMap) {
    let Some(value) = headers.get(&TRACEPARENT).and_then(|v| v.to_str().ok()) else {
        return;
    };
    let Some(trace_id) = parse_traceparent(value) else {
        return;
    };
    let flags = &value[53..55];
    let child = format!("00-{trace_id}-{:016x}-{flags}", fastrand::u64(1..));
    if let Ok(v) = HeaderValue::from_str(&child) {
        headers.insert(TRACEPARENT.clone(), v);
    }
}

/// The trace id of a valid version-00 `traceparent`.
fn parse_traceparent(value: &str) -> Option<&str> {
    let hex = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    let zero = |s: &str| s.bytes().all(|b| b == b'0');
    let parts: Vec<&str> = value.trim().split('-').collect();
    match parts.as_slice() {
        ["00", trace, parent, flags]
            if trace.len() == 32
                && parent.len() == 16
                && flags.len() == 2
                && hex(trace)
                && hex(parent)
                && hex(flags)
                && !zero(trace)
                && !zero(parent)
                && value.len() == 55 =>
        {
            Some(&value[3..35])
        }
        _ => None,
    }
}

/// `X-Forwarded-For/-Proto/-Host`. Values sent by a peer outside `--trusted-proxies` are
/// replaced, so nothing client-supplied reaches upstreams; a trusted proxy's are extended.
pub fn set_forwarded(
    headers: &mut HeaderMap,
    client: IpAddr,
    tls: bool,
    host: Option<&HeaderValue>,
    trusted: bool,
) {
    let client = client.to_canonical().to_string();
    // From a trusted proxy, the chain so far is kept and this peer appended; from anyone
    // else, whatever the client wrote is dropped, so it cannot forge an address.
    let chain = if trusted {
        let before: Vec<&str> = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        if before.is_empty() {
            client
        } else {
            format!("{}, {client}", before.join(", "))
        }
    } else {
        client
    };
    if let Ok(v) = HeaderValue::from_str(&chain) {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    if !(trusted && headers.contains_key(&X_FORWARDED_PROTO)) {
        headers.insert(
            X_FORWARDED_PROTO.clone(),
            HeaderValue::from_static(if tls { "https" } else { "http" }),
        );
    }
    if trusted && headers.contains_key(&X_FORWARDED_HOST) {
        return;
    }
    match host {
        Some(host) => headers.insert(X_FORWARDED_HOST.clone(), host.clone()),
        None => headers.remove(&X_FORWARDED_HOST),
    };
}

/// Appends this hop to `Via` (RFC 9110 7.6.3).
pub fn append_via(headers: &mut HeaderMap, version: Version) {
    let hop = match version {
        Version::HTTP_10 => "1.0 ficus",
        Version::HTTP_2 => "2 ficus",
        Version::HTTP_3 => "3 ficus",
        _ => "1.1 ficus",
    };
    headers.append(header::VIA, HeaderValue::from_static(hop));
}

/// Prepares an upstream's response head for the client.
pub fn prepare_response<B>(resp: &mut Response<B>, request_id: &HeaderValue, upgraded: bool) {
    let version = resp.version();
    let headers = resp.headers_mut();
    strip_hop_by_hop(headers, upgraded);
    append_via(headers, version);
    headers
        .entry(&X_REQUEST_ID)
        .or_insert_with(|| request_id.clone());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_listed_and_standard_hop_by_hop_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("close, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        let names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(names, ["x-kept"]);
    }

    #[test]
    fn keeps_upgrade_for_protocol_switch() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h[header::UPGRADE], "websocket");
        assert_eq!(h[header::CONNECTION], "upgrade");
    }

    #[test]
    fn traceparent_is_kept_created_and_given_child_spans() {
        let client = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let mut h = HeaderMap::new();
        h.insert(&TRACEPARENT, HeaderValue::from_static(client));
        assert_eq!(
            ensure_traceparent(&mut h),
            "0af7651916cd43dd8448eb211c80319c"
        );
        child_traceparent(&mut h);
        let child = h[&TRACEPARENT].to_str().unwrap().to_string();
        assert!(child.starts_with("00-0af7651916cd43dd8448eb211c80319c-"));
        assert!(child.ends_with("-01"));
        assert_ne!(child, client);

        for bad in [
            "garbage",
            "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
        ] {
            let mut h = HeaderMap::new();
            h.insert(&TRACEPARENT, HeaderValue::from_str(bad).unwrap());
            let id = ensure_traceparent(&mut h);
            assert_eq!(id.len(), 32);
            assert!(
                h[&TRACEPARENT]
                    .to_str()
                    .unwrap()
                    .starts_with(&format!("00-{id}-"))
            );
        }
    }

    #[test]
    fn request_id_is_kept_or_created() {
        let mut h = HeaderMap::new();
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("abc"));
        assert_eq!(ensure_request_id(&mut h), "abc");
        let mut h = HeaderMap::new();
        let id = ensure_request_id(&mut h);
        assert_eq!(id.len(), 36);
        assert_eq!(h[&X_REQUEST_ID], id);
        assert_ne!(ensure_request_id(&mut HeaderMap::new()), id);
    }
}
