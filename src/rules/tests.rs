use super::*;

fn load_one(text: &str) -> Result<Loaded, Vec<Diagnostic>> {
    load_sources(vec![("r.toml".into(), text.to_string())], &|name| {
        (name == "ORDERS_URL").then(|| "http://orders:7001".to_string())
    })
}

fn errors(text: &str) -> Vec<String> {
    load_one(text)
        .expect_err("rules should be rejected")
        .iter()
        .map(ToString::to_string)
        .collect()
}

#[test]
fn full_example_loads() {
    let loaded = load_one(
        r#"
[upstreams]
orders-svc = "${ORDERS_URL}"
billing = { url = "${BILLING_URL:-https://billing.internal}", timeout = "5s" }
legacy = { connect_timeout = "300ms" }

[[route]]
name = "orders-read"
priority = 10
authority = "legacy"
new = "orders-svc"
[route.match]
path = "/api/orders/{id}"
methods = ["GET", "head"]
headers = { "X-Tenant" = "acme" }
query = { "v" = "2" }
host = "shop.example.com"
[route.canary]
percent = 5
key = "header:x-customer-id"
[route.shadow]
sample = 0.5
[route.compare]
ignore = ["/meta/generated_at", "/items/*/etag", "/**/trace_id"]
headers = ["content-type"]
"#,
    )
    .unwrap();
    let rules = loaded.rules;
    assert!(loaded.warnings.is_empty());
    let r = &rules.routes[0];
    assert_eq!(&*r.name, "orders-read");
    assert_eq!(&*rules.upstreams[r.new].name, "orders-svc");
    assert_eq!(
        rules.upstreams[r.new].url.as_ref().unwrap().to_string(),
        "http://orders:7001/"
    );
    assert_eq!(r.methods.as_ref().unwrap(), &[Method::GET, Method::HEAD]);
    assert_eq!(r.headers[0].0, "x-tenant");
    assert_eq!(r.canary.as_ref().unwrap().percent, 5.0);
    assert_eq!(
        rules.upstreams[LEGACY_UPSTREAM].connect_timeout,
        Some(Duration::from_millis(300))
    );
    let billing = rules
        .upstreams
        .iter()
        .find(|u| &*u.name == "billing")
        .unwrap();
    assert_eq!(
        billing.url.as_ref().unwrap().host(),
        Some("billing.internal")
    );
    assert_eq!(billing.timeout, Some(Duration::from_secs(5)));
}

#[test]
fn errors_carry_file_line_column_and_hint() {
    let errs = errors("[[route]]\nname = \"a\"\n[route.match]\npathh = \"/x\"\n");
    assert_eq!(errs.len(), 1);
    assert!(
        errs[0].starts_with("r.toml:4:1: error: unknown field `pathh`"),
        "{}",
        errs[0]
    );
    assert!(errs[0].contains("hint:"));
}

#[test]
fn every_error_is_reported_not_just_the_first() {
    let errs = errors(
        r#"
[[route]]
name = "a"
authority = "newer"
[route.match]
path = "/a/{id"
[route.canary]
percent = 101
[[route]]
name = "a"
new = "nope"
"#,
    );
    let joined = errs.join("\n");
    assert!(
        joined.contains("r.toml:4:13: error: unknown authority `newer`"),
        "{joined}"
    );
    assert!(
        joined.contains("r.toml:6:8: error: bad template segment `{id`"),
        "{joined}"
    );
    assert!(
        joined.contains("r.toml:8:11: error: canary percent 101 is outside 0..100"),
        "{joined}"
    );
    assert!(
        joined
            .contains("r.toml:10:8: error: duplicate route name `a`, first defined at r.toml:3:8"),
        "{joined}"
    );
    assert!(
        joined.contains("r.toml:11:7: error: unknown upstream `nope`"),
        "{joined}"
    );
    assert_eq!(errs.len(), 5, "{joined}");
}

#[test]
fn rejects_bad_values_with_hints() {
    let cases: &[(&str, &str)] = &[
        (
            "[upstreams]\nx = \"${NOPE}\"\n",
            "environment variable `NOPE` is not set",
        ),
        (
            "[upstreams]\nx = \"ftp://h\"\n",
            "must be http:// or https://",
        ),
        (
            "[upstreams]\nx = \"http://h/base\"\n",
            "has a path or query",
        ),
        (
            "[upstreams]\nlegacy = \"http://h\"\n",
            "comes from --legacy",
        ),
        ("[upstreams]\nx = { timeout = \"5s\" }\n", "has no URL"),
        (
            "[upstreams]\nx = { url = \"http://h\", timeout = \"soon\" }\n",
            "bad duration",
        ),
        ("[upstreams]\nx = 5\n", "an upstream"),
        (
            "[upstreams]\nx = \"ftp://h\"\n[[route]]\nname = \"a\"\nnew = \"x\"\n",
            "must be http://",
        ),
        ("[[route]]\nname = \"default\"\n", "built-in route"),
        (
            "[[route]]\nname = \"a\"\nmax_request_body = \"10 parsecs\"\n",
            "r.toml:3:20: error: bad size unit",
        ),
        (
            "[[route]]\nname = \"a\"\nmax_request_body = \"0\"\n",
            "max_request_body must be positive",
        ),
        ("[[route]]\nname = \"a b\"\n", "bad route name"),
        (
            "[[route]]\nname = \"a\"\n[route.match]\npath = \"/a\"\npath_prefix = \"/b\"\n",
            "exclusive",
        ),
        (
            "[[route]]\nname = \"a\"\n[route.match]\nmethods = []\n",
            "`methods` is empty",
        ),
        (
            "[[route]]\nname = \"a\"\n[route.match]\nhost = \"a.com:80\"\n",
            "bad host",
        ),
        (
            "[[route]]\nname = \"a\"\n[route.canary]\npercent = 5\nkey = \"ip\"\n",
            "bad key `ip`",
        ),
        (
            "[[route]]\nname = \"a\"\n[route.shadow]\nsample = 2.0\n",
            "outside 0..1",
        ),
        (
            "[[route]]\nname = \"a\"\n[route.compare]\nignore = [\"meta\"]\n",
            "r.toml:4:11: error: compare.ignore: pattern `meta` must start with `/`",
        ),
        (
            "[[route]]\nname = \"a\"\n[route.compare]\nredact_query = [\"sig\", \"token=x\"]\n",
            "r.toml:4:24: error: compare.redact_query: `token=x` is not a query parameter name",
        ),
        ("[[route]]\npriority = 1\n", "missing field `name`"),
        (
            "[[route]]\nname = \"a\"\n[[route.classify]]\nclass = \"x\"\npaths = [\"meta\"]\n",
            "r.toml:5:10: error: bad classify path `meta`",
        ),
        (
            "[[route]]\nname = \"a\"\n[route.gate]\nmax_divergence_rate = 2.0\n",
            "max_divergence_rate 2 is outside 0..1",
        ),
        ("[[route]\nname = \"a\"\n", "r.toml:1:"),
    ];
    for (text, want) in cases {
        let errs = errors(text).join("\n");
        assert!(errs.contains(want), "{text:?}: want {want:?} in {errs}");
        assert!(errs.contains("r.toml:"), "{errs}");
    }
}

#[test]
fn precedence_is_priority_then_order_of_appearance_across_files() {
    let loaded = load_sources(
        vec![
            (
                "a.toml".into(),
                "[[route]]\nname = \"a1\"\n[[route]]\nname = \"a2\"\npriority = 5\n".into(),
            ),
            (
                "b.toml".into(),
                "[[route]]\nname = \"b1\"\npriority = 5\n[upstreams]\nx = \"http://x\"\n".into(),
            ),
        ],
        &|_| None,
    )
    .unwrap();
    let names: Vec<&str> = loaded.rules.routes.iter().map(|r| &*r.name).collect();
    assert_eq!(names, ["a2", "b1", "a1"]);
    assert!(
        loaded
            .rules
            .routes
            .iter()
            .enumerate()
            .all(|(i, r)| r.rank as usize == i)
    );
}

#[test]
fn duplicate_names_across_files_are_rejected() {
    let errs = load_sources(
        vec![
            ("a.toml".into(), "[[route]]\nname = \"x\"\n".into()),
            ("b.toml".into(), "[[route]]\nname = \"x\"\n".into()),
        ],
        &|_| None,
    )
    .unwrap_err();
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].location.file.to_str(), Some("b.toml"));
    assert!(errs[0].message.contains("first defined at a.toml:2:8"));
}

#[test]
fn warns_about_unreachable_and_overlapping_routes() {
    let loaded = load_one(
        r#"
[[route]]
name = "api"
priority = 10
[route.match]
path_prefix = "/api/"

[[route]]
name = "orders"
[route.match]
path = "/api/orders/{id}"
methods = ["GET"]

[[route]]
name = "x"
priority = 1
[route.match]
path = "/x/{id}"
methods = ["GET"]

[[route]]
name = "x-items"
priority = 1
[route.match]
path = "/x/items"
"#,
    )
    .unwrap();
    let w: Vec<String> = loaded.warnings.iter().map(ToString::to_string).collect();
    assert_eq!(w.len(), 2, "{w:?}");
    assert!(
        w[0].starts_with("r.toml:9:8: warning: route `orders` can never match: `api` (r.toml:3:8)"),
        "{}",
        w[0]
    );
    assert!(
        w[1].starts_with(
            "r.toml:22:8: warning: route `x-items` overlaps `x` (r.toml:15:8) at equal priority 1"
        ),
        "{}",
        w[1]
    );
}

#[test]
fn narrower_conditions_do_not_make_a_route_unreachable() {
    let loaded = load_one(
        r#"
[[route]]
name = "tenant"
priority = 10
[route.match]
path_prefix = "/api/"
headers = { "x-tenant" = "acme" }

[[route]]
name = "orders"
[route.match]
path = "/api/orders/{id}"
"#,
    )
    .unwrap();
    assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
}

#[test]
fn env_expansion() {
    let env = |n: &str| (n == "A").then(|| "1".to_string());
    assert_eq!(expand_env("x${A}y", &env).unwrap(), "x1y");
    assert_eq!(expand_env("${B:-d}", &env).unwrap(), "d");
    assert!(expand_env("${B}", &env).is_err());
    assert!(expand_env("${A", &env).is_err());
}

#[test]
fn credentials_in_an_upstream_url_are_not_repeated_in_the_error() {
    let errs = load_sources(
        vec![(
            "r.toml".into(),
            "[upstreams]\norders = \"${ORDERS_URL}\"\n".into(),
        )],
        &|n| (n == "ORDERS_URL").then(|| "http://svc:hunter2@orders:7001".to_string()),
    )
    .unwrap_err();
    let text: Vec<String> = errs.iter().map(ToString::to_string).collect();
    assert_eq!(text.len(), 1, "{text:?}");
    assert!(text[0].contains("carries credentials"), "{text:?}");
    assert!(text[0].contains("http://***@orders:7001"), "{text:?}");
    assert!(!text[0].contains("hunter2"), "{text:?}");
}

#[test]
fn builtin_upstream_settings_may_be_given_once() {
    let errs = load_sources(
        vec![
            (
                "a.toml".into(),
                "[upstreams]\nlegacy = { timeout = \"5s\" }\n".into(),
            ),
            (
                "b.toml".into(),
                "[upstreams]\nlegacy = { timeout = \"9s\" }\n".into(),
            ),
        ],
        &|_| None,
    )
    .unwrap_err();
    assert_eq!(errs.len(), 1);
    assert!(
        errs[0].to_string().starts_with(
            "b.toml:2:10: error: upstream `legacy` is defined twice, first at a.toml:2:10"
        ),
        "{}",
        errs[0]
    );
}

#[test]
fn a_bad_upstream_does_not_cascade_into_its_routes() {
    let errs = errors("[upstreams]\nx = \"ftp://h\"\n[[route]]\nname = \"a\"\nnew = \"x\"\n");
    assert_eq!(errs.len(), 1, "{errs:?}");
}

#[test]
fn errors_are_sorted_by_location() {
    let errs = errors("[upstreams]\nz = \"ftp://z\"\na = \"ftp://a\"\n");
    assert!(errs[0].starts_with("r.toml:2:"), "{errs:?}");
    assert!(errs[1].starts_with("r.toml:3:"), "{errs:?}");
}

#[test]
fn symlink_loops_in_the_rules_directory_terminate() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("r.toml"), "[[route]]\nname = \"a\"\n").unwrap();
    std::os::unix::fs::symlink(dir.path(), dir.path().join("loop")).unwrap();
    let files = rule_files(dir.path()).unwrap();
    assert_eq!(files.len(), 1, "{files:?}");
}

/// A FIFO named `*.toml` would block the reader until someone writes to it: the load (and,
/// as reloads are serialised, every later one) would never end. It is refused instead, and so
/// is a file too large to be rules.
#[test]
fn special_and_oversized_rules_files_are_refused_not_read() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.toml"), "[[route]]\nname = \"a\"\n").unwrap();
    let fifo = dir.path().join("b.toml");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    assert!(made.is_ok_and(|s| s.success()), "mkfifo");
    let path = dir.path().to_path_buf();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(load_with_env(&path, &|_| None).map(|_| ()));
    });
    let errs = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("the load ended")
        .unwrap_err();
    let shown: Vec<String> = errs.iter().map(ToString::to_string).collect();
    assert!(
        shown
            .iter()
            .any(|e| e.contains("b.toml") && e.contains("not a regular file")),
        "{shown:?}"
    );

    std::fs::remove_file(&fifo).unwrap();
    let big = "#".repeat(MAX_RULES_FILE_BYTES as usize + 1);
    std::fs::write(dir.path().join("c.toml"), big).unwrap();
    let errs = load_with_env(dir.path(), &|_| None).unwrap_err();
    let shown: Vec<String> = errs.iter().map(ToString::to_string).collect();
    assert!(
        shown
            .iter()
            .any(|e| e.contains("c.toml") && e.contains("larger than 16 MiB")),
        "{shown:?}"
    );
}

/// Header names are case-insensitive in the rules, and differences name them in lower case:
/// `header:Date` in a classify rule matches a `date` difference.
#[test]
fn classify_header_names_are_case_insensitive() {
    let loaded = load_one(
        "[[route]]\nname = \"a\"\n[[route.classify]]\nclass = \"benign\"\npaths = [\"header:Date\", \"/meta/**\"]\n",
    )
    .expect("valid");
    let rule = &loaded.rules.routes[0].classify[0];
    assert!(rule.covers(&["header:date".to_string(), "/meta/at".to_string()]));
}

#[test]
fn max_request_body_is_parsed_per_route() {
    let loaded = load_one(
        "[[route]]\nname = \"a\"\nmax_request_body = \"10MiB\"\n[[route]]\nname = \"b\"\n",
    )
    .expect("valid");
    let by_name = |n: &str| {
        loaded
            .rules
            .routes
            .iter()
            .find(|r| &*r.name == n)
            .map(|r| r.max_request_body)
    };
    assert_eq!(by_name("a"), Some(Some(10 << 20)));
    assert_eq!(by_name("b"), Some(None));
}

mod properties {
    use super::*;
    use proptest::prelude::*;

    /// Fragments of real rules, shuffled: mostly-valid TOML reaches deep into validation.
    fn fragments() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            Just("[[route]]\n".to_string()),
            Just("name = \"r\"\n".to_string()),
            Just("name = \"r2\"\n".to_string()),
            Just("priority = -3\n".to_string()),
            Just("authority = \"new\"\n".to_string()),
            Just("[route.match]\n".to_string()),
            Just("path = \"/a/{id}/**\"\n".to_string()),
            Just("path_prefix = \"/api/\"\n".to_string()),
            Just("methods = [\"GET\", \"POST\"]\n".to_string()),
            Just("host = \"*.example.com\"\n".to_string()),
            Just("[route.canary]\npercent = 20\nkey = \"header:x-user\"\n".to_string()),
            Just("[route.shadow]\nsample = 0.5\n".to_string()),
            Just("[route.compare]\nignore = [\"/meta/**\"]\n".to_string()),
            Just("max_request_body = \"1MiB\"\n".to_string()),
            Just("[upstreams]\nx = \"http://h:1\"\n".to_string()),
            "[ -~\n]{0,20}",
        ];
        prop::collection::vec(piece, 0..12).prop_map(|v| v.concat())
    }

    proptest! {
        #[test]
        fn any_text_gives_rules_or_located_errors_never_a_panic(text in fragments()) {
            match load_one(&text) {
                Ok(_) => {}
                Err(errors) => {
                    prop_assert!(!errors.is_empty());
                    for e in errors {
                        prop_assert!(e.to_string().starts_with("r.toml:"), "{}", e);
                    }
                }
            }
        }
    }
}

/// The verdict reads at most 62 days of hourly counts on Redis; a longer window would give a
/// different verdict on SQLite for the same rules, so it is refused where it is written.
#[test]
fn a_gate_window_longer_than_the_stores_read_is_refused() {
    let errs = errors("[[route]]\nname = \"a\"\n[route.gate]\nwindow = \"90d\"\n");
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert!(errs[0].starts_with("r.toml:4:"), "{errs:?}");
    assert!(errs[0].contains("longer than 62 days"), "{errs:?}");
    assert!(load_one("[[route]]\nname = \"a\"\n[route.gate]\nwindow = \"62d\"\n").is_ok());
}

/// inotify drops events when its queue overflows (a busy directory next to the rules, a
/// checkout of thousands of files) and says so with one event that names no path and asks
/// for a rescan. The watch looked only at the paths of events, so that notice woke nothing,
/// and a rules change lost in the overflow stayed unloaded until the next change or SIGHUP.
#[test]
fn a_rescan_notice_wakes_the_rules_watch() {
    use notify::event::{CreateKind, Flag};
    use notify::{Event, EventKind};
    let dir = Path::new("/etc/ficus/rules");
    let rescan = Event::new(EventKind::Other).set_flag(Flag::Rescan);
    assert!(watch::wakes(&rescan, dir, None).is_some());
    let file = dir.join("rules.toml");
    assert!(watch::wakes(&rescan, &file, Some(dir)).is_some());
    // Ordinary events still wake it only for paths of the rules.
    let create = |p: &str| Event::new(EventKind::Create(CreateKind::File)).add_path(p.into());
    assert!(watch::wakes(&create("/etc/ficus/rules/a.toml"), dir, None).is_some());
    assert!(watch::wakes(&create("/etc/ficus/other.toml"), dir, None).is_none());
}

/// A team's rules in a linked directory (`team-b -> /srv/team-b/rules`) whose target is gone
/// for a moment (a checkout swapping it, an unmounted volume): the link was taken for a file
/// that is not `*.toml` and skipped, so the set loaded, and was installed, without the
/// team's routes, sending their traffic to legacy. A link that cannot be followed is an
/// error instead, and the rules in force stay.
#[cfg(unix)]
#[test]
fn a_broken_link_in_the_rules_directory_is_an_error_not_skipped() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("a.toml"), "[[route]]\nname = \"a\"\n").unwrap();
    let team = dir.path().join("team-b");
    std::os::unix::fs::symlink(dir.path().join("gone"), &team).unwrap();
    let errs = load_with_env(dir.path(), &|_| None).expect_err("a broken link is an error");
    let shown: Vec<String> = errs.iter().map(ToString::to_string).collect();
    assert_eq!(shown.len(), 1, "{shown:?}");
    assert!(
        shown[0].starts_with(&format!("{}:1:1: error: cannot follow", team.display())),
        "{shown:?}"
    );
    // Hidden entries are still never looked at: an editor's lock link (`.#a.toml`) dangles.
    std::fs::remove_file(&team).unwrap();
    std::os::unix::fs::symlink("user@host.123", dir.path().join(".#a.toml")).unwrap();
    assert!(load_with_env(dir.path(), &|_| None).is_ok());
}
