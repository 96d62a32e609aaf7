//! Header rewriting between client and upstream: hop-by-hop removal, `X-Forwarded-*`, `Via`,
//! `Host`, and the request id.

use std::net::IpAddr;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Version};

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
/// Fields that tell an upstream who the client is or how it connected, which ficus does not
/// write: only a trusted proxy's are believable. RFC 7239's `Forwarded`; `X-Real-IP`, which
/// nginx-style middlewares (Go chi's `RealIP`, Rack) take for the client's address; and
/// `X-Forwarded-Port`, which frameworks build absolute URLs from.
static UNWRITTEN_FORWARDING: [HeaderName; 3] = [
    HeaderName::from_static("forwarded"),
    HeaderName::from_static("x-real-ip"),
    HeaderName::from_static("x-forwarded-port"),
];
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// W3C Trace Context (https://www.w3.org/TR/trace-context/).
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// Longest client-supplied request id that is passed on; longer ones are replaced.
const MAX_REQUEST_ID_LEN: usize = 128;

/// Removes hop-by-hop headers (RFC 9110 7.6.1): the fixed list and those named in `Connection`.
/// With `keep_upgrade`, `Connection: upgrade` and `Upgrade` survive for a protocol switch.
///
/// One pass over the names finds what is there to remove: most heads carry none of these or
/// only `Connection`, and a removal costs a hash lookup each.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let mut doomed: Vec<HeaderName> = Vec::new();
    for name in headers.keys() {
        if is_fixed_hop_by_hop(name) || (!keep_upgrade && name == header::UPGRADE) {
            doomed.push(name.clone());
        }
    }
    if doomed.contains(&header::CONNECTION) {
        let listed = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
            .filter(|name| !(keep_upgrade && name == header::UPGRADE))
            // ficus's own end-to-end fields: both sides of a shadowed request get the same
            // request id, and a client cannot take it (or the trace context) from them.
            .filter(|name| name != X_REQUEST_ID && name != TRACEPARENT);
        doomed.extend(listed);
    }
    for name in &doomed {
        headers.remove(name);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

/// The hop-by-hop headers every hop removes, whatever `Connection` lists. `Trailer` is not
/// one (RFC 9110 6.6.2): it names the trailer fields, which are end-to-end, and HTTP/1.1
/// encoders (hyper's) write only the trailer fields it declares.
fn is_fixed_hop_by_hop(name: &HeaderName) -> bool {
    name == header::CONNECTION
        || name == header::PROXY_AUTHENTICATE
        || name == header::PROXY_AUTHORIZATION
        || name == header::TE
        || name == header::TRANSFER_ENCODING
        || name == KEEP_ALIVE
        || name == PROXY_CONNECTION
}

/// Whether the client accepts trailer fields (`TE: trailers`, RFC 9110 10.1.4).
pub fn accepts_trailers(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            let coding = t.split(';').next().unwrap_or_default();
            coding.trim().eq_ignore_ascii_case("trailers")
        })
}

/// Tells the upstream that this hop accepts trailers, on behalf of a client that does: `TE`
/// is hop-by-hop, yet without it an upstream may leave its trailers out (hyper does).
/// `TE` is a connection option, so `Connection` names it (RFC 9110 10.1.4).
pub fn offer_trailers(headers: &mut HeaderMap) {
    headers.insert(header::TE, HeaderValue::from_static("trailers"));
    headers.append(header::CONNECTION, HeaderValue::from_static("te"));
}

/// The first transfer coding the message was sent in besides one final `chunked`, if any
/// (`gzip` in `Transfer-Encoding: gzip, chunked`; the first `chunked` of `chunked, chunked`).
/// hyper undoes one chunking only.
pub fn other_transfer_coding(headers: &HeaderMap) -> Option<String> {
    // The common cases, without allocating: no coding, or chunked alone.
    let mut values = headers.get_all(header::TRANSFER_ENCODING).iter();
    match (values.next(), values.next()) {
        (None, _) => return None,
        (Some(v), None) if v.as_bytes().eq_ignore_ascii_case(b"chunked") => return None,
        _ => {}
    }
    let codings: Vec<String> = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .flat_map(|v| {
            v.split(',')
                .map(|t| t.split(';').next().unwrap_or_default().trim().to_string())
                .collect::<Vec<_>>()
        })
        .filter(|coding| !coding.is_empty())
        .collect();
    let undone = match codings.last() {
        Some(last) if last.eq_ignore_ascii_case("chunked") => codings.len() - 1,
        _ => codings.len(),
    };
    codings.into_iter().take(undone).next()
}

/// Whether an HTTP/1.1 request asks to switch protocols (WebSocket and the like). An offer of
/// `h2c` is not one ficus passes on: the connection would turn into HTTP/2 with the upstream,
/// and every later request on it would bypass ficus through the tunnel. Its `Upgrade` is
/// stripped like any hop-by-hop header, and the client carries on in HTTP/1.1.
pub fn is_upgrade_request<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && !req
            .headers()
            .get_all(header::UPGRADE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|p| p.trim().eq_ignore_ascii_case("h2c"))
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

/// A W3C trace id: 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct TraceId([u8; 32]);

impl TraceId {
    pub fn as_str(&self) -> &str {
        // Only ever built from lowercase hex digits (ASCII).
        std::str::from_utf8(&self.0).unwrap_or_default()
    }
}

impl std::fmt::Display for TraceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::fmt::Debug for TraceId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TraceId({})", self.as_str())
    }
}

/// Length of a version-00 `traceparent`: `00-<32 hex>-<16 hex>-<2 hex>`.
const TRACEPARENT_LEN: usize = 55;

/// Keeps a valid `traceparent` from the client, or starts a trace (flags `00`: ficus does not
/// force sampling on the systems behind it). Returns the trace id, for logs.
pub fn ensure_traceparent(headers: &mut HeaderMap) -> TraceId {
    if let Some(trace_id) = headers
        .get(&TRACEPARENT)
        .and_then(|v| parse_traceparent(v.as_bytes()))
    {
        return trace_id;
    }
    let mut trace = [0u8; 32];
    hex_lower(&fastrand::u128(1..).to_be_bytes(), &mut trace);
    headers.insert(TRACEPARENT.clone(), traceparent(&trace, b"00"));
    TraceId(trace)
}

/// Gives an outgoing request a span of its own: same trace id and flags, a fresh parent id.
/// The authority call and the shadow call are thus sibling spans of one exchange.
pub fn child_traceparent(headers: &mut HeaderMap) {
    let Some(value) = headers.get(&TRACEPARENT) else {
        return;
    };
    let Some(trace_id) = parse_traceparent(value.as_bytes()) else {
        return;
    };
    let flags = [value.as_bytes()[53], value.as_bytes()[54]];
    let child = traceparent(&trace_id.0, &flags);
    headers.insert(TRACEPARENT.clone(), child);
}

/// `00-<trace>-<fresh parent id>-<flags>`.
fn traceparent(trace: &[u8; 32], flags: &[u8; 2]) -> HeaderValue {
    let mut buf = [0u8; TRACEPARENT_LEN];
    buf[..3].copy_from_slice(b"00-");
    buf[3..35].copy_from_slice(trace);
    buf[35] = b'-';
    hex_lower(&fastrand::u64(1..).to_be_bytes(), &mut buf[36..52]);
    buf[52] = b'-';
    buf[53..].copy_from_slice(flags);
    // Hex digits and dashes are always a valid header value.
    HeaderValue::from_bytes(&buf).unwrap_or_else(|_| HeaderValue::from_static(""))
}

/// Writes `bytes` as lowercase hex into `out`, which holds exactly two digits per byte.
fn hex_lower(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0x0f)];
    }
}

/// The trace id of a valid version-00 `traceparent` (exact layout, lowercase hex, neither
/// id all zeros).
fn parse_traceparent(value: &[u8]) -> Option<TraceId> {
    let hex = |s: &[u8]| {
        s.iter()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(b))
    };
    let zero = |s: &[u8]| s.iter().all(|&b| b == b'0');
    if value.len() != TRACEPARENT_LEN
        || &value[..3] != b"00-"
        || value[35] != b'-'
        || value[52] != b'-'
    {
        return None;
    }
    let (trace, parent, flags) = (&value[3..35], &value[36..52], &value[53..]);
    if !(hex(trace) && hex(parent) && hex(flags)) || zero(trace) || zero(parent) {
        return None;
    }
    let mut id = [0u8; 32];
    id.copy_from_slice(trace);
    Some(TraceId(id))
}

/// Joins the `Cookie` fields an HTTP/2 client may send one per cookie into the single field
/// HTTP/1.1 allows (RFC 9113 8.2.3: "; " between them, before an HTTP/1.1 hop).
pub fn join_cookies(headers: &mut HeaderMap) {
    let mut values = headers.get_all(header::COOKIE).iter();
    if values.next().is_none() || values.next().is_none() {
        return;
    }
    let mut joined = Vec::new();
    for value in headers.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(value.as_bytes());
    }
    // Joined valid values with "; " between them are a valid value.
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, value);
    }
}

/// Whether the request has one `Host` field, whose value is a host with an optional port
/// (no userinfo, path or list).
pub fn has_one_valid_host(headers: &HeaderMap) -> bool {
    let mut hosts = headers.get_all(header::HOST).iter();
    let (Some(host), None) = (hosts.next(), hosts.next()) else {
        return false;
    };
    is_host_and_port(host.as_bytes())
}

/// `host [":" port]` (RFC 9110 7.2, RFC 3986 3.2.2-3.2.3), checked in place: parsing it as
/// an `http::uri::Authority` would copy it, on every request.
fn is_host_and_port(v: &[u8]) -> bool {
    let (name, port) = if let Some(rest) = v.strip_prefix(b"[") {
        // An IP literal; the zones and IPvFuture forms are never needed in a Host.
        let Some(end) = rest.iter().position(|&b| b == b']') else {
            return false;
        };
        let literal = &rest[..end];
        if literal.is_empty()
            || !literal
                .iter()
                .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return false;
        }
        (None, &rest[end + 1..])
    } else {
        let split = v.iter().rposition(|&b| b == b':').unwrap_or(v.len());
        (Some(&v[..split]), &v[split..])
    };
    let port_ok = match port.split_first() {
        None => true,
        Some((b':', digits)) => digits.iter().all(u8::is_ascii_digit),
        Some(_) => false,
    };
    // A reg-name: unreserved, sub-delims and percent-escapes; no `@`, space, `/`, `?`, `#`.
    let name_ok = name.is_none_or(|n| {
        !n.is_empty()
            && n.iter()
                .all(|&b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=%".contains(&b))
    });
    port_ok && name_ok
}

/// `X-Forwarded-For/-Proto/-Host`. Values sent by a peer outside `--trusted-proxies` are
/// replaced, so nothing client-supplied reaches upstreams; a trusted proxy's are extended.
/// `Forwarded` (RFC 7239), `X-Real-IP` and `X-Forwarded-Port` from an untrusted peer are
/// removed: upstreams that read them behind a trusted ficus would take a forged client
/// address, scheme, host or port for ficus's word.
pub fn set_forwarded(
    headers: &mut HeaderMap,
    client: IpAddr,
    tls: bool,
    host: Option<&HeaderValue>,
    trusted: bool,
) {
    let client = ip_value(client.to_canonical());
    if !trusted {
        for name in &UNWRITTEN_FORWARDING {
            headers.remove(name);
        }
    }
    // From a trusted proxy, the chain so far is kept and this peer appended; from anyone
    // else, whatever the client wrote is dropped, so it cannot forge an address.
    let before: Vec<&str> = if trusted {
        headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect()
    } else {
        Vec::new()
    };
    let chain = if before.is_empty() {
        Some(client)
    } else {
        let client = client.to_str().unwrap_or_default();
        HeaderValue::from_str(&format!("{}, {client}", before.join(", "))).ok()
    };
    if let Some(v) = chain {
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

/// An address as a header value. IPv4, by far the most common peer, is written by hand: the
/// formatting machinery costs more than the rest of the rewrite.
fn ip_value(ip: IpAddr) -> HeaderValue {
    let IpAddr::V4(v4) = ip else {
        return HeaderValue::from_str(&ip.to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
    };
    let mut buf = [0u8; 15];
    let mut len = 0;
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            buf[len] = b'.';
            len += 1;
        }
        if octet >= 100 {
            buf[len] = b'0' + octet / 100;
            len += 1;
        }
        if octet >= 10 {
            buf[len] = b'0' + octet / 10 % 10;
            len += 1;
        }
        buf[len] = b'0' + octet % 10;
        len += 1;
    }
    // Digits and dots are always a valid header value.
    HeaderValue::from_bytes(&buf[..len]).unwrap_or_else(|_| HeaderValue::from_static("unknown"))
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
    let status = resp.status();
    let headers = resp.headers_mut();
    // The chunking framed the body, not the length beside it, and the length must go with the
    // chunking (RFC 9112 6.3): left alone, the client reads a truncated body as a whole one.
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
    strip_hop_by_hop(headers, upgraded);
    // No length in an answer that has no content by its status (RFC 9110 8.6); nghttp2's
    // HTTP/2 clients reset a 204 stream that announces one.
    if status == http::StatusCode::NO_CONTENT || status.is_informational() {
        headers.remove(header::CONTENT_LENGTH);
    }
    single_content_length(headers);
    append_via(headers, version);
    headers
        .entry(&X_REQUEST_ID)
        .or_insert_with(|| request_id.clone());
    // `Via` records what the upstream spoke; the client is answered in ficus's own version
    // (RFC 9110 6.2). hyper writes the status line in the response's version, and would
    // otherwise turn an HTTP/1.0 upstream's answer into an HTTP/1.0 one that closes the
    // client's connection. It lowers the version itself for an HTTP/1.0 client.
    *resp.version_mut() = Version::HTTP_11;
}

/// Repairs a repeated `Content-Length` (`2, 2`, or two fields) into one field, as RFC 9110
/// 8.6 allows. hyper's client has already refused an answer whose lengths differ, so the
/// first is the length; passed on repeated, hyper's server drops a HEAD answer's connection
/// and HTTP/2 clients reject the stream.
fn single_content_length(headers: &mut HeaderMap) {
    let mut values = headers.get_all(header::CONTENT_LENGTH).iter();
    let Some(first) = values.next() else {
        return;
    };
    if values.next().is_none() && !first.as_bytes().contains(&b',') {
        return;
    }
    let length = first
        .to_str()
        .ok()
        .and_then(|v| v.split(',').next())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if let Some(length) = length {
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_values() {
        for good in [
            "a",
            "shop.test",
            "shop.test:8080",
            "127.0.0.1:9",
            "[::1]:8080",
            "[::1]",
        ] {
            assert!(is_host_and_port(good.as_bytes()), "{good}");
        }
        for bad in [
            "", ":80", "evil@a", "a, b", "a b", "a/b", "a:b", "[::1", "[]", "[x]:1",
        ] {
            assert!(!is_host_and_port(bad.as_bytes()), "{bad}");
        }
    }

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
    fn connection_cannot_name_ficus_own_end_to_end_fields() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("X-Request-Id, traceparent, x-other"),
        );
        h.insert(&X_REQUEST_ID, HeaderValue::from_static("id-1"));
        h.insert(&TRACEPARENT, HeaderValue::from_static("t"));
        h.insert("x-other", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h, false);
        let mut names: Vec<&str> = h.keys().map(HeaderName::as_str).collect();
        names.sort_unstable();
        assert_eq!(names, ["traceparent", "x-request-id"]);
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
            ensure_traceparent(&mut h).as_str(),
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
            assert_eq!(id.as_str().len(), 32);
            assert!(id.as_str().bytes().all(|b| b.is_ascii_hexdigit()));
            assert!(
                h[&TRACEPARENT]
                    .to_str()
                    .unwrap()
                    .starts_with(&format!("00-{id}-"))
            );
        }
    }

    #[test]
    fn ip_values_are_written_as_display_writes_them() {
        for octets in [
            [0, 0, 0, 0],
            [127, 0, 0, 1],
            [10, 9, 99, 100],
            [192, 168, 1, 255],
            [255, 255, 255, 255],
            [1, 20, 200, 7],
        ] {
            let ip = IpAddr::from(octets);
            assert_eq!(ip_value(ip), ip.to_string().as_str());
        }
        for _ in 0..1000 {
            let ip = IpAddr::from(fastrand::u32(..).to_be_bytes());
            assert_eq!(ip_value(ip), ip.to_string().as_str());
        }
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(ip_value(v6), "2001:db8::1");
        let mapped: IpAddr = "::ffff:10.1.2.3".parse().unwrap();
        let mut h = HeaderMap::new();
        set_forwarded(&mut h, mapped, false, None, false);
        assert_eq!(h[&X_FORWARDED_FOR], "10.1.2.3");
    }

    #[test]
    fn forwarded_for_is_replaced_unless_the_peer_is_trusted() {
        let peer: IpAddr = "10.0.0.7".parse().unwrap();
        let mut h = HeaderMap::new();
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("1.2.3.4"));
        h.append(&X_FORWARDED_FOR, HeaderValue::from_static("5.6.7.8"));
        let mut untrusted = h.clone();
        set_forwarded(&mut untrusted, peer, false, None, false);
        assert_eq!(untrusted[&X_FORWARDED_FOR], "10.0.0.7");
        assert_eq!(untrusted.get_all(&X_FORWARDED_FOR).iter().count(), 1);
        set_forwarded(&mut h, peer, true, None, true);
        assert_eq!(h[&X_FORWARDED_FOR], "1.2.3.4, 5.6.7.8, 10.0.0.7");
        assert_eq!(h[&X_FORWARDED_PROTO], "https");
    }

    #[test]
    fn traceparent_layout_is_checked_exactly() {
        let good = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        assert!(parse_traceparent(good.as_bytes()).is_some());
        for bad in [
            "",
            " 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01 ",
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            "00-0af7651916cd43dd8448eb211c80319c_b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c8031-9c-b7ad6b7169203331-01",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-0g",
        ] {
            assert!(parse_traceparent(bad.as_bytes()).is_none(), "{bad:?}");
        }
        // A fresh one is valid, and a child keeps trace id and flags.
        let mut h = HeaderMap::new();
        let id = ensure_traceparent(&mut h);
        let value = h[&TRACEPARENT].clone();
        assert_eq!(parse_traceparent(value.as_bytes()), Some(id));
        assert!(value.to_str().unwrap().ends_with("-00"));
        child_traceparent(&mut h);
        let child = h[&TRACEPARENT].to_str().unwrap();
        assert_eq!(parse_traceparent(child.as_bytes()), Some(id));
        assert_ne!(child, value);
    }

    #[test]
    fn transfer_codings_other_than_chunked_are_found() {
        let coding = |values: &[&'static str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(header::TRANSFER_ENCODING, HeaderValue::from_static(v));
            }
            other_transfer_coding(&h)
        };
        assert_eq!(coding(&[]), None);
        assert_eq!(coding(&["chunked"]), None);
        assert_eq!(coding(&["Chunked"]), None);
        assert_eq!(coding(&["gzip, chunked"]).as_deref(), Some("gzip"));
        assert_eq!(coding(&["gzip", "chunked"]).as_deref(), Some("gzip"));
        assert_eq!(
            coding(&["x-custom;q=1, chunked"]).as_deref(),
            Some("x-custom")
        );
        assert_eq!(coding(&["chunked, chunked"]).as_deref(), Some("chunked"));
        assert_eq!(coding(&["chunked", "chunked"]).as_deref(), Some("chunked"));
        assert_eq!(coding(&["chunked, gzip"]).as_deref(), Some("chunked"));
        assert_eq!(coding(&["gzip"]).as_deref(), Some("gzip"));
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
