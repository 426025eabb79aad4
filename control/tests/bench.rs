//! End-to-end test of `warren bench`: the real binary runs a tiny bench and its JSON report must
//! show bytes moved both ways and round trips with percentiles. It asserts that the bench ran,
//! never how fast.

use std::process::Command;

use serde_json::Value;

fn bench(args: &[&str]) -> Value {
    let out = Command::new(env!("CARGO_BIN_EXE_warren"))
        .arg("bench")
        .args(args)
        .output()
        .expect("running warren bench");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "warren bench failed ({}):\nstdout: {stdout}\nstderr: {stderr}",
        out.status
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!("stdout is not one JSON object ({e}):\n{stdout}\nstderr: {stderr}")
    })
}

#[test]
fn bench_json_reports_throughput_both_ways_and_latency_percentiles() {
    let v = bench(&["--bytes", "4MiB", "--rr-seconds", "1", "--json"]);
    assert_eq!(v["errors"], 0, "{v}");
    for dir in ["download", "upload"] {
        assert_eq!(v[dir]["bytes"], 4 * 1024 * 1024, "{dir}: {v}");
        let mbs = v[dir]["mb_per_s"].as_f64().unwrap_or(0.0);
        assert!(mbs > 0.0, "{dir} throughput {mbs}: {v}");
        assert!(v["cpu"][dir].get("seconds_per_gb").is_some(), "{v}");
    }
    let rr = &v["rr"];
    assert!(rr["requests"].as_u64().unwrap_or(0) > 0, "{v}");
    assert!(rr["rps"].as_f64().unwrap_or(0.0) > 0.0, "{v}");
    for p in ["p50", "p90", "p99", "p999"] {
        let us = rr["latency_us"][p].as_f64().unwrap_or(0.0);
        assert!(us > 0.0, "rr latency {p} = {us}: {v}");
    }
    // `auto` by default: whichever data plane this host runs, named.
    assert!(
        matches!(v["backend"].as_str(), Some("uring" | "compat")),
        "{v}"
    );
    let tuning = &v["tuning"];
    for role in ["server", "client"] {
        assert_eq!(tuning[role]["backend"], "auto", "{v}");
        assert_eq!(v["backends"][role], v["backend"], "{v}");
        assert!(tuning[role]["shards"].as_u64().unwrap_or(0) >= 1, "{v}");
        assert_eq!(tuning[role]["source"], "defaults", "{v}");
        assert_eq!(tuning[role]["read_buffer_bytes"], 65_536, "{v}");
    }
}

#[test]
fn bench_uses_the_tuning_of_the_config_file_and_the_backend_flag() {
    let dir = std::env::temp_dir().join(format!("warren-bench-e2e-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("tuning.toml");
    std::fs::write(
        &path,
        "[server.tuning]\nshards = 1\nread_buffer_bytes = 131072\n",
    )
    .unwrap();
    let v = bench(&[
        "-c",
        path.to_str().unwrap(),
        "--bytes",
        "1MiB",
        "--rr-seconds",
        "0.2",
        "--transport",
        "tls",
        "--backend",
        "compat",
        "--json",
    ]);
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(v["transport"], "tls", "{v}");
    assert_eq!(v["backend"], "compat", "--backend compat: {v}");
    assert_eq!(v["tuning"]["sessions"], 1, "{v}");
    for role in ["server", "client"] {
        assert_eq!(v["tuning"][role]["shards"], 1, "{role}: {v}");
        assert_eq!(v["tuning"][role]["backend"], "compat", "{role}: {v}");
        assert_eq!(
            v["tuning"][role]["read_buffer_bytes"], 131_072,
            "{role}: {v}"
        );
    }
    assert!(v["rr"]["requests"].as_u64().unwrap_or(0) > 0, "{v}");
}
