//! The command line: `upsplice check` on good and bad configs.

use std::process::Command;

fn check(config: &str) -> (bool, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("router.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_upsplice")).args(["check", "--config"]).arg(&path).output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn check_accepts_the_demo_config_and_reports_data_planes() {
    let demo = Command::new(env!("CARGO_BIN_EXE_upsplice")).arg("default-config").output().unwrap();
    assert!(demo.status.success());
    let (ok, stdout, stderr) = check(&String::from_utf8(demo.stdout).unwrap());
    assert!(ok, "{stderr}");
    assert!(stdout.contains("listeners (2):") && stdout.contains("routes (2):"), "{stdout}");
    for mode in ["sockmap", "uring", "splice", "copy"] {
        assert!(stdout.lines().any(|l| l.trim_start().starts_with(mode)), "{mode} missing from:\n{stdout}");
    }
    assert!(stdout.contains("copy     available"), "{stdout}");
}

/// The summary says how connections are served (`[runtime]`).
#[test]
fn check_says_how_many_workers_serve_and_how() {
    let base = "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:8080\"\nprotocol = \"http\"\n";
    let (ok, stdout, stderr) = check(&format!("[runtime]\nworkers = 3\n{base}"));
    assert!(ok, "{stderr}");
    assert!(stdout.contains("runtime: 3 workers, each with its own socket per listener (SO_REUSEPORT)"), "{stdout}");
    let (ok, stdout, stderr) = check(&format!("[runtime]\nworkers = 2\nwork_stealing = true\n{base}"));
    assert!(ok, "{stderr}");
    assert!(stdout.contains("runtime: 2 workers sharing one work-stealing scheduler"), "{stdout}");
}

/// With a plane named, what `auto` would pick is said as such, not as the
/// plane the config runs.
#[test]
fn check_with_a_named_plane_says_what_auto_would_pick_apart() {
    let demo = Command::new(env!("CARGO_BIN_EXE_upsplice")).arg("default-config").output().unwrap();
    let config = String::from_utf8(demo.stdout).unwrap();
    assert_eq!(config.matches("mode = \"auto\"").count(), 1, "{config}");
    let config = config.replace("mode = \"auto\"", "mode = \"copy\"");
    let (ok, stdout, stderr) = check(&config);
    assert!(ok, "{stderr}\n{stdout}");
    assert!(!stdout.contains("auto picks"), "{stdout}");
    assert!(stdout.contains("mode = \"auto\" would pick ") && stdout.contains("; this config runs copy"), "{stdout}");
    assert!(stdout.contains("data plane copy)"), "{stdout}");
}

#[test]
fn check_names_file_field_and_problem() {
    let base = "[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:8080\"\nprotocol = \"http\"\n\n[[pool]]\nname = \"chat\"\nbackends = [\"127.0.0.1:9001\"]\n\n[[route]]\nhost = \"chat.example.com\"\npool = \"chat\"\n";
    let cases = [
        (base.replace("pool = \"chat\"\n", "pool = \"chatt\"\n"), "route[0].pool: no pool named \"chatt\""),
        (
            format!("{base}\n[[listener]]\nname = \"b\"\nbind = \"127.0.0.1:8080\"\nprotocol = \"http\"\n"),
            "listener[1].bind: 127.0.0.1:8080 is already bound by listener \"web\"",
        ),
        (
            base.replace("protocol = \"http\"", "protocol = \"http\"\ntrusted_cidrs = [\"10.0.0.0/40\"]"),
            "trusted_cidrs",
        ),
        (format!("[limits]\nmax_conections = 5\n{base}"), "unknown field `max_conections`"),
        (format!("[data_plane]\nmode = \"turbo\"\n{base}"), "unknown variant `turbo`"),
        (format!("[runtime]\nworkers = 5000\n{base}"), "runtime.workers: must be at most 1024 (0: one per core)"),
        (format!("[runtime]\nthreads = 2\n{base}"), "unknown field `threads`"),
    ];
    for (config, expected) in cases {
        let (ok, _, stderr) = check(&config);
        assert!(!ok, "accepted a bad config:\n{config}");
        assert!(stderr.contains("router.toml") && stderr.contains(expected), "expected {expected:?} in {stderr:?}");
    }
}

#[test]
fn run_reports_an_unusable_bind_clearly() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let config =
        format!("[[listener]]\nname = \"web\"\nbind = \"{}\"\nprotocol = \"http\"\n", taken.local_addr().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.toml");
    std::fs::write(&path, config).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_upsplice")).args(["run", "--config"]).arg(&path).output().unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("listener \"web\": cannot bind"), "{stderr}");
}

/// `bind` with port 0: the kernel picks free ports and `run` prints them on
/// stdout before serving, so scripts need not guess free ports; the
/// printed ports answer.
#[test]
fn run_binds_port_zero_and_prints_what_it_bound() {
    use std::io::{BufRead, BufReader, Read, Write};
    let config = "[data_plane]\nmode = \"copy\"\n\n[admin]\nbind = \"127.0.0.1:0\"\n\n\
        [[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\n\n\
        [[listener]]\nname = \"raw\"\nbind = \"127.0.0.1:0\"\nprotocol = \"tcp\"\npool = \"p\"\n\n\
        [[pool]]\nname = \"p\"\nbackends = [\"127.0.0.1:9\"]\n";
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.toml");
    std::fs::write(&path, config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_upsplice"))
        .args(["run", "--config"])
        .arg(&path)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut next = || lines.next().expect("a line on stdout").unwrap();
    let (web, raw, admin) = (next(), next(), next());
    let addr = |line: &str, prefix: &str| -> std::net::SocketAddr {
        assert!(line.starts_with(prefix), "{line:?} does not start with {prefix:?}");
        line[prefix.len()..].split(' ').next().unwrap().parse().unwrap()
    };
    let web_addr = addr(&web, "listening on ");
    assert!(web.ends_with(" listener=web protocol=http"), "{web}");
    let raw_addr = addr(&raw, "listening on ");
    assert!(raw.ends_with(" listener=raw protocol=tcp"), "{raw}");
    let admin_addr = addr(&admin, "admin on ");
    let ports = [web_addr.port(), raw_addr.port(), admin_addr.port()];
    assert!(ports.iter().all(|&p| p != 0) && ports[0] != ports[1] && ports[1] != ports[2], "{ports:?}");

    let mut s = std::net::TcpStream::connect(admin_addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let mut s = std::net::TcpStream::connect(web_addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: nowhere.test\r\n\r\n").unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// `run` on a router node must not fall back to the demo config's ports:
/// without --config it refuses and says what to do; --demo is explicit.
#[test]
fn run_without_config_refuses_unless_demo_is_asked_for() {
    let out = Command::new(env!("CARGO_BIN_EXE_upsplice")).arg("run").output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--config <FILE>") && stderr.contains("required"), "{stderr}");
    let out =
        Command::new(env!("CARGO_BIN_EXE_upsplice")).args(["run", "--demo", "--config", "x.toml"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "--demo with --config: {out:?}");
}

/// `check` fails whenever `run` would: a plane chosen by name that cannot
/// run here. Without privileges (as user nobody, through util-linux's
/// setpriv) sockmap cannot load its program.
#[test]
fn check_fails_when_the_chosen_plane_cannot_run() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = dir.path().join("r.toml");
    std::fs::write(
        &path,
        "[data_plane]\nmode = \"sockmap\"\n[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\n",
    )
    .unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let as_nobody = |cmd: &str| {
        Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", env!("CARGO_BIN_EXE_upsplice"), cmd, "--config"])
            .arg(&path)
            .output()
            .expect("setpriv (util-linux) runs")
    };
    let check = as_nobody("check");
    let (stdout, stderr) = (String::from_utf8_lossy(&check.stdout), String::from_utf8_lossy(&check.stderr));
    assert!(!check.status.success(), "check passed:\n{stdout}");
    assert!(stdout.contains("sockmap  unavailable: needs CAP_BPF"), "{stdout}");
    assert!(stderr.contains("data_plane.mode = \"sockmap\" cannot run here"), "{stderr}");
    let run = as_nobody("run");
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("data_plane.mode = \"sockmap\" cannot start"), "{run:?}");
}

/// `--log-level warning` (or any word that is not a level) is an error:
/// tracing would read it as a target and silence every line, errors and
/// the access log included.
#[test]
fn an_unknown_log_level_is_an_error() {
    for bad in ["warning", "verbose", "info,chatty"] {
        let out = Command::new(env!("CARGO_BIN_EXE_upsplice")).args(["--log-level", bad, "default-config"]).output();
        let out = out.unwrap();
        assert_eq!(out.status.code(), Some(2), "{bad}: {out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("is not a level; use one of off, error, warn, info, debug, trace"), "{stderr}");
    }
    for good in ["warn", "INFO", "info,upsplice::access=off", "upsplice=debug"] {
        let out = Command::new(env!("CARGO_BIN_EXE_upsplice")).args(["--log-level", good, "default-config"]).output();
        assert!(out.unwrap().status.success(), "{good}");
    }
}

/// `check --quiet` on a large config: problems and one summary line, not a
/// line per route; `check --help` explains its options.
#[test]
fn check_quiet_prints_problems_and_a_summary() {
    let mut config = String::from(
        "[data_plane]\nmode = \"copy\"\n[[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\nprotocol = \"http\"\n\
         [[pool]]\nname = \"p\"\nbackends = [\"127.0.0.1:9\"]\n[[pool]]\nname = \"idle\"\n",
    );
    for i in 0..1000 {
        config.push_str(&format!("[[route]]\nhost = \"h{i}.example.com\"\npool = \"p\"\n"));
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.toml");
    std::fs::write(&path, &config).unwrap();
    let out =
        Command::new(env!("CARGO_BIN_EXE_upsplice")).args(["check", "--quiet", "-c"]).arg(&path).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    assert!(lines[0].starts_with("warning: pool[1] \"idle\" has no backends"), "{stdout}");
    assert!(lines[2].ends_with("big.toml: ok (1 listeners, 2 pools, 1000 routes; data plane copy)"), "{stdout}");
    let help = Command::new(env!("CARGO_BIN_EXE_upsplice")).args(["check", "--help"]).output().unwrap();
    let help = String::from_utf8(help.stdout).unwrap();
    assert!(help.contains("The TOML config to validate") && help.contains("--quiet"), "{help}");
}
