//! The `ficus` binary: `rules check`, `rules explain`, help, and `serve` configured through
//! environment variables, reloaded by SIGHUP and stopped by SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers may panic

mod support;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use support::{Backend, backend_of, client, eventually};

const FICUS: &str = env!("CARGO_BIN_EXE_ficus");

fn ficus(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(FICUS).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn rules_check_accepts_the_shipped_examples() {
    let (code, out, _) = ficus(&["rules", "check", "routing-rules"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("ok: 4 routes, 0 warnings"), "{out}");
}

#[test]
fn rules_check_prints_every_error_with_its_location() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a.toml"),
        "[[route]]\nname = \"a\"\n[route.match]\npath = \"/a/{id\"\n",
    )
    .unwrap();
    std::fs::write(
        dir.path().join("b.toml"),
        "[[route]]\nname = \"a\"\n[route.canary]\npercent = 150\n",
    )
    .unwrap();
    let (code, out, _) = ficus(&["rules", "check", dir.path().to_str().unwrap()]);
    assert_eq!(code, 1, "{out}");
    let a = dir.path().join("a.toml");
    let b = dir.path().join("b.toml");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines.contains(&format!("{}:4:8: error: bad template segment `{{id` in `/a/{{id`; hint: a segment is either literal text or a whole `{{name}}` (letters, digits, `_`)", a.display()).as_str()), "{out}");
    assert!(
        out.contains(&format!(
            "{}:2:8: error: duplicate route name `a`, first defined at {}:2:8",
            b.display(),
            a.display()
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!(
            "{}:4:11: error: canary percent 150 is outside 0..100",
            b.display()
        )),
        "{out}"
    );
    assert!(out.contains("failed: 3 errors"), "{out}");
}

#[test]
fn rules_check_warns_but_passes() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("r.toml");
    std::fs::write(
        &file,
        "[[route]]\nname = \"all-api\"\npriority = 5\n[route.match]\npath = \"/api/**\"\n\n[[route]]\nname = \"orders\"\n[route.match]\npath = \"/api/orders\"\n",
    )
    .unwrap();
    let (code, out, _) = ficus(&["rules", "check", file.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains(&format!(
            "{}:8:8: warning: route `orders` can never match",
            file.display()
        )),
        "{out}"
    );
    assert!(out.contains("ok: 2 routes, 1 warning"), "{out}");
}

#[test]
fn rules_explain_says_which_route_and_why_not_the_others() {
    let (code, out, err) = ficus(&[
        "rules",
        "explain",
        "routing-rules",
        "GET",
        "http://shop.example.com/api/orders/42",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("route: orders-read (routing-rules/10-orders.toml:"),
        "{out}"
    );
    assert!(out.contains("authority: legacy (upstream legacy)"), "{out}");
    assert!(
        out.contains("orders-write  no: method GET is not in [POST, PUT, PATCH, DELETE]"),
        "{out}"
    );
    assert!(
        out.contains("customers     no: path /api/orders/42 does not match `/api/customers/`"),
        "{out}"
    );

    let (_, out, _) = ficus(&[
        "rules",
        "explain",
        "routing-rules",
        "GET",
        "/api/catalog/lamp",
        "-H",
        "x-customer-id: 1001",
    ]);
    assert!(
        out.contains("canary: 25% by header:x-customer-id; this key is at"),
        "{out}"
    );

    let (_, out, _) = ficus(&["rules", "explain", "routing-rules", "GET", "/nowhere"]);
    assert!(out.contains("route: default (built-in)"), "{out}");
    assert!(out.contains("no route matches"), "{out}");
}

/// An admin port that accepts connections and never answers (a wedged process, a proxy in
/// between): the CLI fails after its timeout instead of hanging a CI pipeline for ever.
#[test]
fn the_cli_gives_up_on_an_admin_api_that_never_answers() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    // Accepted (the kernel completes the handshake from the backlog), never read nor answered.
    let (code, _, err) = ficus(&["report", "--admin", &url, "--timeout", "300ms"]);
    assert_ne!(code, 0);
    assert!(err.contains("did not answer within 300ms"), "{err}");
    drop(listener);
}

/// `--limit 0` reached the API as "no limit given" and printed its default page of 50.
#[test]
fn divergences_list_refuses_a_limit_of_zero() {
    let (code, _, err) = ficus(&["divergences", "list", "--limit", "0"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--limit"), "{err}");
}

#[test]
fn help_documents_every_flag_and_its_environment_variable() {
    let (code, out, _) = ficus(&["serve", "--help"]);
    assert_eq!(code, 0);
    for flag in [
        "--rules",
        "--legacy",
        "--new",
        "--listen",
        "--admin-listen",
        "--tls-cert",
        "--tls-key",
        "--upstream-ca",
        "--connect-timeout",
        "--upstream-timeout",
        "--shutdown-timeout",
        "--no-watch",
        "--workers",
        "--shadow-max-inflight",
        "--shadow-max-memory",
        "--shadow-body-limit",
        "--shadow-timeout",
        "--shadow-header",
        "--store",
        "--store-prefix",
        "--spool-dir",
        "--spool-max",
        "--retention",
        "--retention-per-route",
        "--record-body-limit",
        "--instance",
        "--admin-token",
        "--log-format",
        "--log",
    ] {
        assert!(out.contains(flag), "serve --help lacks {flag}");
    }
    for env in [
        "FICUS_RULES",
        "FICUS_LEGACY",
        "FICUS_NEW",
        "FICUS_LISTEN",
        "FICUS_ADMIN_LISTEN",
        "FICUS_TLS_CERT",
        "FICUS_TLS_KEY",
        "FICUS_UPSTREAM_CA",
        "FICUS_CONNECT_TIMEOUT",
        "FICUS_UPSTREAM_TIMEOUT",
        "FICUS_SHUTDOWN_TIMEOUT",
        "FICUS_NO_WATCH",
        "FICUS_WORKERS",
        "FICUS_SHADOW_MAX_INFLIGHT",
        "FICUS_SHADOW_TIMEOUT",
        "FICUS_STORE",
        "FICUS_SPOOL_DIR",
        "FICUS_RETENTION",
        "FICUS_RECORD_BODY_LIMIT",
        "FICUS_ADMIN_TOKEN",
    ] {
        assert!(out.contains(env), "serve --help lacks {env}");
    }
    let (_, out, _) = ficus(&["--help"]);
    for cmd in ["serve", "rules", "demo"] {
        assert!(out.contains(cmd));
    }
    let (_, out, _) = ficus(&["rules", "--help"]);
    assert!(out.contains("check") && out.contains("explain"));
}

#[test]
fn serve_refuses_to_start_on_invalid_rules() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("r.toml"), "[[route]]\nname = 1\n").unwrap();
    let out = Command::new(FICUS)
        .args(["serve", "--rules", dir.path().to_str().unwrap()])
        .args([
            "--legacy",
            "http://127.0.0.1:1",
            "--new",
            "http://127.0.0.1:1",
        ])
        .args(["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("r.toml:2:8: error: invalid type"), "{err}");
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

struct Child(std::process::Child);
impl Drop for Child {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn signal(child: &std::process::Child, sig: &str) {
    let status = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

#[tokio::test]
async fn serve_from_environment_reloads_on_sighup_and_stops_on_sigterm() {
    let legacy = Backend::start("legacy").await;
    let new = Backend::start("new").await;
    let orders = Backend::start("orders").await;
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules.toml");
    let route = |new_name: &str| {
        format!(
            "[upstreams]\norders-svc = \"${{ORDERS_URL}}\"\n[[route]]\nname = \"orders\"\nauthority = \"new\"\nnew = \"{new_name}\"\n[route.match]\npath_prefix = \"/api/orders\"\n"
        )
    };
    std::fs::write(&rules, route("orders-svc")).unwrap();
    let (port, admin) = (free_port(), free_port());
    let mut child = Child(
        Command::new(FICUS)
            .arg("serve")
            .env("FICUS_RULES", &rules)
            .env("FICUS_LEGACY", legacy.url().to_string())
            .env("FICUS_NEW", new.url().to_string())
            .env("FICUS_LISTEN", format!("127.0.0.1:{port}"))
            .env("FICUS_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
            .env("FICUS_NO_WATCH", "true")
            .env("FICUS_LOG_FORMAT", "json")
            .env("ORDERS_URL", orders.url().to_string())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let c = client();
    let ready = format!("http://127.0.0.1:{admin}/readyz");
    assert!(
        eventually(Duration::from_secs(20), || async {
            c.get(&ready).send().await.is_ok_and(|r| r.status() == 200)
        })
        .await,
        "ficus never became ready"
    );
    let healthz = c
        .get(format!("http://127.0.0.1:{admin}/healthz"))
        .send()
        .await
        .unwrap();
    assert_eq!(healthz.status(), 200);
    let url = format!("http://127.0.0.1:{port}/api/orders/1");
    let resp = c.get(&url).send().await.unwrap();
    assert_eq!(
        backend_of(&resp),
        "orders",
        "the env-referenced upstream serves the route"
    );

    std::fs::write(&rules, route("new")).unwrap();
    signal(&child.0, "-HUP");
    assert!(
        eventually(Duration::from_secs(10), || async {
            backend_of(&c.get(&url).send().await.unwrap()) == "new"
        })
        .await,
        "SIGHUP did not reload the rules"
    );

    signal(&child.0, "-TERM");
    let status = tokio::task::spawn_blocking(move || {
        let status = child.0.wait().unwrap();
        let mut err = String::new();
        child
            .0
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        (status, err)
    });
    let (status, err) = tokio::time::timeout(Duration::from_secs(20), status)
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exit status {status}");
    // One JSON access line per request, with route, authority, status and latency.
    let access: Vec<serde_json::Value> = err
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "ficus::access")
        .collect();
    assert!(access.len() >= 2, "{err}");
    let first = &access[0];
    assert_eq!(first["route"], "orders");
    assert_eq!(first["authority"], "new");
    assert_eq!(first["status"], 200);
    assert!(first["latency_ms"].is_number());
    assert!(
        first["request_id"]
            .as_str()
            .is_some_and(|id| id.len() == 36)
    );
}

/// `--admin-token` takes `NAME=TOKEN`, splitting at the first `=`. A base64 secret ends in
/// `=` padding (`openssl rand -base64 32`), and `ops=` is what `ops=$TOKEN` gives with an unset
/// variable: either way the token part is empty (or only `=`), and that must not turn into "no
/// Authorization header needed" (or a secret of `=`). ficus must either refuse to start or
/// still ask for the real token.
#[tokio::test]
async fn an_admin_token_that_parses_to_an_empty_secret_does_not_open_the_api() {
    let legacy = Backend::start("legacy").await;
    let new = Backend::start("new").await;
    for token in ["c2VjcmV0LXRva2Vu=", "dG9rZW4tc2VjcmV0==", "ops="] {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("rules.toml"), "[[route]]\nname = \"a\"\n").unwrap();
        let (port, admin) = (free_port(), free_port());
        let mut child = Child(
            Command::new(FICUS)
                .arg("serve")
                .args(["--rules", dir.path().to_str().unwrap()])
                .args(["--legacy", &legacy.url().to_string()])
                .args(["--new", &new.url().to_string()])
                .args(["--listen", &format!("127.0.0.1:{port}")])
                .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
                .args(["--admin-token", token])
                .arg("--no-watch")
                .args([
                    "--store",
                    &format!("sqlite:{}", dir.path().join("r.db").display()),
                ])
                .env_remove("FICUS_ADMIN_TOKEN")
                .current_dir(dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let c = client();
        let ready = format!("http://127.0.0.1:{admin}/readyz");
        let mut exited = false;
        let mut up = false;
        for _ in 0..400 {
            if child.0.try_wait().unwrap().is_some() {
                exited = true;
                break;
            }
            if c.get(&ready).send().await.is_ok_and(|r| r.status() == 200) {
                up = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if exited {
            continue; // refusing an empty token at start-up is a fine answer
        }
        assert!(
            up,
            "ficus neither started nor exited with --admin-token {token}"
        );
        let resp = c
            .get(format!("http://127.0.0.1:{admin}/api/divergences"))
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.status(),
            401,
            "--admin-token {token}: the API answers without any Authorization header"
        );
        for guess in ["Bearer ", "Bearer ="] {
            let resp = c
                .post(format!("http://127.0.0.1:{admin}/api/rules/reload"))
                .header("authorization", guess)
                .send()
                .await
                .unwrap();
            assert_eq!(
                resp.status(),
                401,
                "--admin-token {token}: `{guess}` is accepted as the token"
            );
        }
    }
}

/// `--admin` pointed at the wrong port (the proxy's, whose legacy side answers any path with a
/// 200 page): the CLI must not take that page for the API's answer and report success, as in
/// "override lifted" during a rollback, with nothing done.
#[tokio::test]
async fn the_cli_fails_on_an_answer_that_is_not_the_admin_api() {
    let page = Backend::with_handler("spa", |_req| async {
        http::Response::builder()
            .header("content-type", "text/html")
            .body(support::full("<!doctype html><p>Shop</p>"))
            .unwrap()
    })
    .await;
    let url = format!("http://{}", page.addr);
    for args in [
        &["routes", "release", "orders"][..],
        &["divergences", "set", "x", "--state", "resolved"],
        &["report"],
        &["divergences", "list"],
    ] {
        let mut all = args.to_vec();
        all.extend(["--admin", &url]);
        let all: Vec<String> = all.iter().map(|s| s.to_string()).collect();
        let (code, out, err) = tokio::task::spawn_blocking(move || {
            let refs: Vec<&str> = all.iter().map(String::as_str).collect();
            ficus(&refs)
        })
        .await
        .unwrap();
        assert_eq!(code, 1, "{args:?}: {out}");
        assert!(err.contains("not JSON"), "{args:?}: {err}");
    }
}

/// `FICUS_ADMIN_TOKEN` takes a comma-separated list; written with a space after each comma (as
/// the CLI's own reading of that variable allows), every token must still open the API.
#[tokio::test]
async fn admin_tokens_listed_with_spaces_after_the_commas_each_work() {
    let legacy = Backend::start("legacy").await;
    let new = Backend::start("new").await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("rules.toml"), "[[route]]\nname = \"a\"\n").unwrap();
    let (port, admin) = (free_port(), free_port());
    let mut child = Child(
        Command::new(FICUS)
            .arg("serve")
            .args(["--rules", dir.path().to_str().unwrap()])
            .args(["--legacy", &legacy.url().to_string()])
            .args(["--new", &new.url().to_string()])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--admin-listen", &format!("127.0.0.1:{admin}")])
            .arg("--no-watch")
            .args([
                "--store",
                &format!("sqlite:{}", dir.path().join("r.db").display()),
            ])
            .env("FICUS_ADMIN_TOKEN", "first-secret, second-secret")
            .current_dir(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let c = client();
    let ready = format!("http://127.0.0.1:{admin}/readyz");
    let mut up = false;
    for _ in 0..400 {
        assert!(child.0.try_wait().unwrap().is_none(), "ficus exited");
        if c.get(&ready).send().await.is_ok_and(|r| r.status() == 200) {
            up = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(up, "ficus did not start");
    for token in ["first-secret", "second-secret"] {
        let resp = c
            .get(format!("http://127.0.0.1:{admin}/api/divergences"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{token}");
    }
}

/// A SIGHUP while `ficus serve` is still starting (loading a large rule set, opening the
/// store), as a deploy sends after updating the rules and restarting: until the handler was
/// installed, the signal's default action ended the process, without a line in the log. The
/// handler is now in place before the rules are read, and the SIGHUP reloads once serving.
#[tokio::test]
async fn a_sighup_during_start_up_does_not_kill_ficus_and_reloads_once_serving() {
    use std::io::BufRead;
    let legacy = Backend::start("legacy").await;
    let new = Backend::start("new").await;
    let dir = tempfile::tempdir().unwrap();
    // Thousands of routes take a while to validate and analyse: the SIGHUP lands during it.
    let mut text = String::new();
    for i in 0..4000 {
        text.push_str(&format!(
            "[[route]]\nname = \"r{i}\"\npriority = {}\n[route.match]\npath = \"/a{i}/{{id}}\"\nmethods = [\"GET\"]\n",
            i % 7
        ));
    }
    std::fs::write(dir.path().join("rules.toml"), text).unwrap();
    let (port, admin) = (free_port(), free_port());
    let mut child = Child(
        Command::new(FICUS)
            .arg("serve")
            .env("FICUS_RULES", dir.path())
            .env("FICUS_LEGACY", legacy.url().to_string())
            .env("FICUS_NEW", new.url().to_string())
            .env("FICUS_LISTEN", format!("127.0.0.1:{port}"))
            .env("FICUS_ADMIN_LISTEN", format!("127.0.0.1:{admin}"))
            .env(
                "FICUS_STORE",
                format!("sqlite:{}", dir.path().join("r.db").display()),
            )
            .env("FICUS_SPOOL_DIR", dir.path().join("spool"))
            .env("FICUS_NO_WATCH", "true")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // The log, line by line, from a thread (bounded by the child's lifetime).
    let stderr = child.0.stderr.take().unwrap();
    let (tx, mut lines) = tokio::sync::mpsc::unbounded_channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let mut seen = Vec::new();
    let mut wait_for = async |needle: &str, seen: &mut Vec<String>| {
        let found = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = lines.recv().await {
                let hit = line.contains(needle);
                seen.push(line);
                if hit {
                    return true;
                }
            }
            false
        })
        .await;
        found.unwrap_or(false)
    };
    assert!(
        wait_for("loading the rules", &mut seen).await,
        "no start-up line: {seen:#?}"
    );
    signal(&child.0, "-HUP");
    assert!(
        wait_for("ficus is serving", &mut seen).await,
        "ficus did not survive a SIGHUP during start-up ({:?}): {seen:#?}",
        child.0.try_wait()
    );
    assert!(
        wait_for("SIGHUP: reloading rules", &mut seen).await,
        "the SIGHUP received during start-up was not acted on: {seen:#?}"
    );
    signal(&child.0, "-TERM");
    let status = tokio::task::spawn_blocking(move || child.0.wait().unwrap());
    let status = tokio::time::timeout(Duration::from_secs(30), status)
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "exit status {status}");
}

/// `rules explain` promises to say what the proxy does with a request. The proxy refuses
/// some before any route is chosen (userinfo in the target, a bad or doubled Host, CONNECT):
/// explain named a route and an upstream for them, and exited 0.
#[test]
fn rules_explain_says_so_when_the_proxy_refuses_the_request_before_routing() {
    let cases: &[(&[&str], &str)] = &[
        (
            &["GET", "http://a@shop.example.com/api/orders/42"],
            "ficus answers 400 to this request: bad request: the request target carries userinfo",
        ),
        (
            &["CONNECT", "shop.example.com:443"],
            "ficus answers 405 to this request: CONNECT is not supported by a reverse proxy",
        ),
        (
            &["GET", "/api/orders/42", "-H", "host: a", "-H", "host: b"],
            "ficus answers 400 to this request: bad request: an HTTP/1.1 request needs exactly one valid Host header",
        ),
    ];
    for (args, want) in cases {
        let mut all = vec!["rules", "explain", "routing-rules"];
        all.extend_from_slice(args);
        let (code, out, err) = ficus(&all);
        assert_eq!(code, 1, "{args:?}: {out}{err}");
        assert!(err.contains(want), "{args:?}: {err}");
        assert!(!out.contains("route:"), "{args:?}: {out}");
    }
    // A request the proxy takes is still explained.
    let (code, out, err) = ficus(&[
        "rules",
        "explain",
        "routing-rules",
        "GET",
        "/api/orders/42",
        "-H",
        "host: shop.example.com",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("route: orders-read"), "{out}");
}
