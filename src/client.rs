//! The `ficus` commands that talk to a running ficus through its admin API: divergences,
//! groups, report. Human output is aligned text; `--json` prints the API's JSON as is.

use std::fmt::Write as _;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::{Args, Subcommand};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::{Value, json};

/// Where the admin API is.
#[derive(Args, Clone)]
pub struct AdminArgs {
    /// Admin API base URL.
    #[arg(
        long,
        env = "FICUS_ADMIN",
        value_name = "URL",
        default_value = "http://127.0.0.1:9901",
        global = true
    )]
    pub admin: String,
    /// Admin token (`NAME=TOKEN` accepted, as for `serve --admin-token`; of a comma-separated
    /// list, as `FICUS_ADMIN_TOKEN` may hold for `serve`, the first).
    #[arg(long, env = "FICUS_ADMIN_TOKEN", value_name = "TOKEN", global = true)]
    pub token: Option<String>,
    /// Longest wait for the admin API's answer: a pipeline running `report
    /// --fail-unless-ready` must fail, not hang, on a port that accepts and never answers.
    #[arg(long, env = "FICUS_ADMIN_TIMEOUT", value_name = "DURATION", default_value = "2m",
          value_parser = humantime::parse_duration, global = true)]
    pub timeout: std::time::Duration,
}

#[derive(Subcommand)]
pub enum DivergencesCommand {
    /// List divergences, newest first.
    List {
        #[arg(long)]
        route: Option<String>,
        /// open, acknowledged, expected or resolved.
        #[arg(long)]
        state: Option<String>,
        /// At least 1; more than a page's 1000 are fetched page by page.
        #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..))]
        limit: u64,
        #[arg(long)]
        json: bool,
    },
    /// Show one divergence: the request, both answers, the differences.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Set the state, class or note of a divergence.
    Set {
        id: String,
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        class: Option<String>,
        #[arg(long)]
        note: Option<String>,
    },
    /// Send the recorded request to both sides again and compare; resolves it on a match.
    Replay {
        id: String,
        /// Replay a non-safe method (the write happens again on both sides).
        #[arg(long)]
        allow_writes: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum GroupsCommand {
    /// Divergences grouped by fingerprint, largest group first.
    List {
        #[arg(long)]
        route: Option<String>,
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

/// `NAME=TOKEN` as (name, token); anything else, such as a base64 secret ending in `=`
/// padding (the part after the first `=` empty or only `=`), is an unnamed token as a whole.
pub fn split_token(raw: &str) -> (Option<&str>, &str) {
    match raw.split_once('=') {
        Some((name, token)) if !name.is_empty() && token.bytes().any(|b| b != b'=') => {
            (Some(name), token)
        }
        _ => (None, raw),
    }
}

/// The secret the CLI sends for `--token`: `FICUS_ADMIN_TOKEN` may list several tokens for
/// `serve`, of which the CLI uses the first, and each may be `NAME=TOKEN`.
fn bearer(raw: &str) -> &str {
    let first = raw.split(',').next().unwrap_or(raw).trim();
    split_token(first).1
}

/// Calls the admin API; returns the status and the JSON body.
async fn call(
    admin: &AdminArgs,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<(StatusCode, Value)> {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let url = format!("{}{path}", admin.admin.trim_end_matches('/'));
    let mut req = Request::builder().method(method).uri(&url);
    if let Some(token) = &admin.token {
        let token = bearer(token);
        req = req.header("authorization", format!("Bearer {token}"));
    }
    let body = match body {
        Some(v) => {
            req = req.header("content-type", "application/json");
            Full::new(Bytes::from(v.to_string()))
        }
        None => Full::new(Bytes::new()),
    };
    let exchange = async {
        let resp = client
            .request(req.body(body).context("bad admin URL")?)
            .await
            .with_context(|| format!("cannot reach the admin API at {}", admin.admin))?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, bytes))
    };
    let (status, bytes) = tokio::time::timeout(admin.timeout, exchange)
        .await
        .map_err(|_| {
            anyhow::anyhow!(
                "the admin API at {} did not answer within {} (--timeout)",
                admin.admin,
                humantime::format_duration(admin.timeout)
            )
        })??;
    // Every answer of the admin API is JSON. A success that is not is another server (the
    // proxy port, whose legacy side answers anything with 200): taking it for the API would
    // print an empty table, or "override lifted", with exit 0 and nothing done.
    let value = match serde_json::from_slice(&bytes) {
        Ok(value) => value,
        Err(_) if status.is_success() => bail!(
            "{} answered {status} with a body that is not JSON: is --admin (FICUS_ADMIN) the admin port (default http://127.0.0.1:9901)?",
            admin.admin
        ),
        Err(_) => Value::Null,
    };
    Ok((status, value))
}

/// Calls the API and fails with its error message on a non-2xx answer.
async fn call_ok(
    admin: &AdminArgs,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<Value> {
    let (status, value) = call(admin, method, path, body).await?;
    if !status.is_success() {
        // A replay that failed after its request went out may have been processed there: the
        // operator must not take the error for "nothing happened" and replay (a write) again.
        let sent = if value["sent"] == true {
            "; the request had already gone out to an upstream and may have been processed there: replaying it again repeats it"
        } else {
            ""
        };
        bail!(
            "{status}: {} ({}){sent}",
            value["message"].as_str().unwrap_or("no message"),
            value["error"].as_str().unwrap_or("error")
        );
    }
    Ok(value)
}

fn query(pairs: &[(&str, Option<String>)]) -> String {
    let parts: Vec<String> = pairs
        .iter()
        .filter_map(|(k, v)| {
            v.as_ref().map(|v| {
                format!(
                    "{k}={}",
                    form_urlencoded::byte_serialize(v.as_bytes()).collect::<String>()
                )
            })
        })
        .collect();
    if parts.is_empty() {
        String::new()
    } else {
        format!("?{}", parts.join("&"))
    }
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Left-aligned columns.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let line = |cells: Vec<String>, out: &mut String| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                l.push_str(cell);
            } else {
                let _ = write!(l, "{cell:<w$}  ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(header.iter().map(|h| h.to_string()).collect(), &mut out);
    for row in rows {
        line(row.clone(), &mut out);
    }
    out
}

/// ANSI color, only when stdout is a terminal (never in pipes, files or CI logs).
fn paint(text: &str, color: &str) -> String {
    use std::io::IsTerminal;
    if std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none() {
        let code = match color {
            "green" => "32",
            "red" => "31",
            "yellow" => "33",
            _ => return text.to_string(),
        };
        format!("\x1b[{code}m{text}\x1b[0m")
    } else {
        text.to_string()
    }
}

/// The items of a JSON array as text, joined.
fn joined(items: &[Value], sep: &str) -> String {
    items.iter().map(text).collect::<Vec<_>>().join(sep)
}

/// A JSON value as terminal text. Strings come from upstream answers (body paths, header
/// values): their control characters are shown escaped, so an answer cannot send escape
/// sequences to the operator's terminal.
fn text(v: &Value) -> String {
    match v {
        Value::String(s) if s.chars().any(char::is_control) => s
            .chars()
            .map(|c| {
                if c.is_control() {
                    c.escape_default().to_string()
                } else {
                    c.to_string()
                }
            })
            .collect(),
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// The first 400 characters of a body, on one line.
fn excerpt(body: &str) -> String {
    let flat: String = body
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    match flat.char_indices().nth(400) {
        Some((cut, _)) => format!("{}...", &flat[..cut]),
        None => flat,
    }
}

fn diff_line(d: &Value) -> String {
    match d["in"].as_str() {
        Some("status") => format!("status {} -> {}", d["old"], d["value"]),
        Some("header") => format!(
            "header {}: {} -> {}",
            text(&d["path"]),
            text(&d["old"]),
            text(&d["value"])
        ),
        _ => match d["op"].as_str() {
            Some("add") => format!("add {} = {}", text(&d["path"]), d["value"]),
            Some("remove") => format!("remove {} (was {})", text(&d["path"]), d["old"]),
            Some("replace") => format!(
                "replace {}: {} -> {}",
                text(&d["path"]),
                d["old"],
                d["value"]
            ),
            _ => format!("body {}", d),
        },
    }
}

pub async fn divergences(admin: &AdminArgs, cmd: DivergencesCommand) -> Result<()> {
    match cmd {
        DivergencesCommand::List {
            route,
            state,
            limit,
            json,
        } => {
            let limit = usize::try_from(limit).unwrap_or(usize::MAX);
            // A page may hold fewer records than asked, even none, with a cursor to go on: on
            // Redis a page reads a bounded number of index entries and checks the filter's
            // other conditions record by record. Follow it, or a selective filter would print
            // an empty table while matching records lie further on.
            let mut items: Vec<Value> = Vec::new();
            let mut cursor: Option<String> = None;
            let next = loop {
                let path = format!(
                    "/api/divergences{}",
                    query(&[
                        ("route", route.clone()),
                        ("state", state.clone()),
                        ("limit", Some(limit.saturating_sub(items.len()).to_string())),
                        ("cursor", cursor.take()),
                    ])
                );
                let page = call_ok(admin, Method::GET, &path, None).await?;
                if let Some(got) = page["items"].as_array() {
                    items.extend(got.iter().cloned());
                }
                match page["next"].as_str() {
                    Some(next) if items.len() < limit => cursor = Some(next.to_string()),
                    next => break next.map(str::to_string),
                }
            };
            let page = json!({"items": items, "next": next});
            if json {
                print_json(&page);
                return Ok(());
            }
            let rows: Vec<Vec<String>> = page["items"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| {
                    vec![
                        text(&r["id"]),
                        text(&r["at"]),
                        text(&r["route"]),
                        text(&r["state"]),
                        text(&r["class"]),
                        format!(
                            "{} {}",
                            text(&r["request"]["method"]),
                            text(&r["request"]["path"])
                        ),
                        r["paths"]
                            .as_array()
                            .map(|p| joined(p, ", "))
                            .unwrap_or_default(),
                    ]
                })
                .collect();
            print!(
                "{}",
                table(
                    &[
                        "ID",
                        "AT",
                        "ROUTE",
                        "STATE",
                        "CLASS",
                        "REQUEST",
                        "DIFFERS AT"
                    ],
                    &rows
                )
            );
        }
        DivergencesCommand::Show { id, json } => {
            let r = call_ok(admin, Method::GET, &format!("/api/divergences/{id}"), None).await?;
            if json {
                print_json(&r);
                return Ok(());
            }
            let req = &r["request"];
            println!(
                "{} {}{}",
                text(&req["method"]),
                text(&req["path"]),
                req["query"]
                    .as_str()
                    .map(|q| format!("?{q}"))
                    .unwrap_or_default()
            );
            println!(
                "route {}  authority {}  state {}  class {}  at {}",
                text(&r["route"]),
                text(&r["authority"]),
                text(&r["state"]),
                text(&r["class"]),
                text(&r["at"])
            );
            if let Some(body) = req["body"].as_str().filter(|b| !b.is_empty()) {
                println!("request body: {}", excerpt(body));
            }
            for side in ["legacy", "new"] {
                println!(
                    "{side:<6} {} in {} ms",
                    r[side]["status"], r[side]["latency_ms"]
                );
                if let Some(body) = r[side]["body"].as_str() {
                    println!("       {}", excerpt(body));
                }
            }
            println!("differences:");
            for d in r["diffs"].as_array().into_iter().flatten() {
                let color = match d["op"].as_str() {
                    Some("add") => "green",
                    Some("remove") => "red",
                    _ => "yellow",
                };
                println!("  {}", paint(&diff_line(d), color));
            }
            // Anyone who may change records writes the note: escaped like the rest.
            if r["note"].is_string() {
                println!("note: {}", text(&r["note"]));
            }
        }
        DivergencesCommand::Set {
            id,
            state,
            class,
            note,
        } => {
            let mut patch = serde_json::Map::new();
            for (k, v) in [("state", state), ("class", class), ("note", note)] {
                if let Some(v) = v {
                    patch.insert(k.into(), json!(v));
                }
            }
            if patch.is_empty() {
                bail!("nothing to set: give --state, --class or --note");
            }
            let r = call_ok(
                admin,
                Method::PATCH,
                &format!("/api/divergences/{id}"),
                Some(Value::Object(patch)),
            )
            .await?;
            println!(
                "{} is {}{}",
                text(&r["id"]),
                text(&r["state"]),
                r["class"]
                    .as_str()
                    .map(|c| format!(" ({c})"))
                    .unwrap_or_default()
            );
        }
        DivergencesCommand::Replay {
            id,
            allow_writes,
            json,
        } => {
            let q = if allow_writes {
                "?allow_writes=true"
            } else {
                ""
            };
            let r = call_ok(
                admin,
                Method::POST,
                &format!("/api/divergences/{id}/replay{q}"),
                None,
            )
            .await?;
            if json {
                print_json(&r);
                return Ok(());
            }
            let state = text(&r["record"]["state"]);
            if let Some(why) = r["unconfirmed"].as_str() {
                // Both sides agree, on an answer legacy did not give the recorded request (the
                // credentials are not replayed, the resource is gone): not a fix.
                println!(
                    "the answers match, but {}; {id} stays {state}",
                    text(&json!(why))
                );
            } else if r["match"] == true && state == "resolved" {
                println!("the answers match now: {id} is resolved");
            } else if r["match"] == true {
                // A record marked expected stays so.
                println!("the answers match now; {id} stays {state}");
            } else {
                println!("the answers still differ:");
                for d in r["diffs"].as_array().into_iter().flatten() {
                    println!("  {}", diff_line(d));
                }
            }
        }
    }
    Ok(())
}

pub async fn groups(admin: &AdminArgs, cmd: GroupsCommand) -> Result<()> {
    let GroupsCommand::List { route, state, json } = cmd;
    let g = call_ok(
        admin,
        Method::GET,
        &format!(
            "/api/groups{}",
            query(&[("route", route), ("state", state)])
        ),
        None,
    )
    .await?;
    if json {
        print_json(&g);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = g["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| {
            vec![
                text(&i["fingerprint"]),
                text(&i["route"]),
                text(&i["count"]),
                text(&i["last_seen"]),
                i["paths"]
                    .as_array()
                    .map(|p| joined(p, ", "))
                    .unwrap_or_default(),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &["FINGERPRINT", "ROUTE", "COUNT", "LAST SEEN", "DIFFERS AT"],
            &rows
        )
    );
    // On stderr, so that the table stays the same for scripts that read it.
    if g["truncated"] == true {
        eprintln!(
            "note: only the newest 10,000 matching records were grouped (or the store's pages ran out first): counts are partial and older groups may be missing; narrow with --route or --state"
        );
    }
    Ok(())
}

/// Prints the readiness report; with `fail_unless_ready`, fails unless that route is ready.
pub async fn report(
    admin: &AdminArgs,
    json: bool,
    fail_unless_ready: Option<String>,
) -> Result<bool> {
    let r = call_ok(admin, Method::GET, "/api/report", None).await?;
    if json {
        print_json(&r);
    } else {
        let rows: Vec<Vec<String>> = r["routes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|x| {
                vec![
                    text(&x["route"]),
                    text(&x["authority"]),
                    text(&x["verdict"]),
                    text(&x["comparisons"]["window"]),
                    format!(
                        "{:.4}%",
                        x["divergence_rate"].as_f64().unwrap_or(0.0) * 100.0
                    ),
                    format!(
                        "{:.4}%",
                        x["divergence_rate_upper_95"].as_f64().unwrap_or(0.0) * 100.0
                    ),
                    x["reasons"]
                        .as_array()
                        .map(|p| joined(p, "; "))
                        .unwrap_or_default(),
                ]
            })
            .collect();
        print!(
            "{}",
            table(
                &[
                    "ROUTE",
                    "AUTHORITY",
                    "VERDICT",
                    "COMPARISONS",
                    "RATE",
                    "UPPER 95%",
                    "REASONS"
                ],
                &rows
            )
        );
    }
    let Some(route) = fail_unless_ready else {
        return Ok(true);
    };
    let found = r["routes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|x| x["route"] == route.as_str());
    match found {
        None => bail!("route `{route}` is not in the rules in force"),
        Some(x) => Ok(x["verdict"] == "ready"),
    }
}

/// `ficus rules impact PATH`: what the candidate rules' compare settings would do to the
/// divergences on record of a running ficus.
pub async fn impact(admin: &AdminArgs, path: &std::path::Path, json: bool) -> Result<()> {
    let files = ficus::rules::rule_files(path).map_err(|errors| {
        let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
        anyhow::anyhow!("{}", lines.join("\n"))
    })?;
    let mut body = serde_json::Map::new();
    for file in files {
        let text = std::fs::read_to_string(&file)
            .with_context(|| format!("cannot read {}", file.display()))?;
        body.insert(file.display().to_string(), json!(text));
    }
    let (status, answer) = call(
        admin,
        Method::POST,
        "/api/rules/impact",
        Some(json!({ "files": body })),
    )
    .await?;
    if status == StatusCode::UNPROCESSABLE_ENTITY {
        for e in answer["errors"].as_array().into_iter().flatten() {
            eprintln!("{}", text(e));
        }
        bail!("the candidate rules are invalid");
    }
    if !status.is_success() {
        bail!(
            "{status}: {}",
            answer["message"].as_str().unwrap_or("no message")
        );
    }
    if json {
        print_json(&answer);
        return Ok(());
    }
    let rows: Vec<Vec<String>> = answer["routes"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|r| {
            vec![
                text(&r["route"]),
                text(&r["records"]),
                text(&r["totals"]["would_match"]),
                text(&r["totals"]["would_remain"]),
                text(&r["totals"]["unknown"]),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &["ROUTE", "RECORDS", "WOULD MATCH", "WOULD REMAIN", "UNKNOWN"],
            &rows
        )
    );
    Ok(())
}

#[derive(Subcommand)]
pub enum RoutesCommand {
    /// Emergency override on every replica: who answers (and/or no shadow), for a while.
    Override {
        name: String,
        /// legacy or new.
        #[arg(long)]
        authority: Option<String>,
        /// Stop shadowing on the route.
        #[arg(long)]
        no_shadow: bool,
        /// How long, e.g. 1h (at most 7 days).
        #[arg(long)]
        ttl: String,
        /// Why: kept with the override and logged.
        #[arg(long)]
        reason: String,
    },
    /// Lift the override of a route.
    Release { name: String },
}

pub async fn routes(admin: &AdminArgs, cmd: RoutesCommand) -> Result<()> {
    match cmd {
        RoutesCommand::Override {
            name,
            authority,
            no_shadow,
            ttl,
            reason,
        } => {
            let mut body = json!({"ttl": ttl, "reason": reason});
            if let Some(a) = authority {
                body["authority"] = json!(a);
            }
            if no_shadow {
                body["shadow"] = json!(false);
            }
            let o = call_ok(
                admin,
                Method::POST,
                &format!("/api/routes/{name}/override"),
                Some(body),
            )
            .await?;
            println!(
                "{name}: override in force (authority {}, shadow {}) for {ttl}",
                text(&o["authority"]),
                if o["shadow"] == false {
                    "off"
                } else {
                    "as in the rules"
                }
            );
        }
        RoutesCommand::Release { name } => {
            call_ok(
                admin,
                Method::DELETE,
                &format!("/api/routes/{name}/override"),
                None,
            )
            .await?;
            println!("{name}: override lifted; the rules apply again");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn strings_from_answers_reach_the_terminal_without_control_characters() {
        let d = json!({"in": "body", "op": "replace", "path": "/a\u{1b}[2J", "old": 1, "value": 2});
        let line = diff_line(&d);
        assert!(!line.chars().any(char::is_control), "{line:?}");
        assert!(line.contains(r"/a\u{1b}[2J"), "{line}");
        let h = json!({"in": "header", "path": "x", "old": "a\u{7}", "value": "b\r\nc"});
        assert!(!diff_line(&h).chars().any(char::is_control));
        assert_eq!(text(&json!("plain")), "plain");
    }

    #[test]
    fn the_cli_sends_the_first_of_several_tokens_without_its_name() {
        assert_eq!(bearer("s3cret"), "s3cret");
        assert_eq!(bearer("alice=s3cret"), "s3cret");
        assert_eq!(bearer("alice=s3cret, bob=other"), "s3cret");
        assert_eq!(bearer("c2VjcmV0=,bob=other"), "c2VjcmV0=");
    }
}
