//! Whole networks in one process: `blossom-p2p simulate` with the tiny model
//! (real round engine, real libp2p and gossipsub over netsim), one scenario
//! per test, checked through the metrics JSONL it writes.

mod common;

use std::path::Path;

use serde_json::Value;

/// Runs a simulation of the tiny model and returns its stdout and the
/// per-round records.
fn simulate(dir: &Path, nodes: u32, rounds: u32, scenario: Option<&str>, settings: &[&str], extra: &[&str]) -> (String, Vec<Value>) {
    let data_dir = format!("network.data_dir=\"{}\"", dir.display());
    let metrics = dir.join("metrics.jsonl");
    let (nodes, rounds) = (nodes.to_string(), rounds.to_string());
    let mut args = vec![
        "--set", "model.source=tiny", "--set", "lora.num_layers=4", "--set", &data_dir, "--set", "train.local_steps=6",
    ];
    for setting in settings {
        args.extend(["--set", setting]);
    }
    args.extend([
        "simulate", "--nodes", &nodes, "--rounds", &rounds, "--eval-rows", "16", "--exact-match-rows", "2",
        "--metrics", metrics.to_str().unwrap(),
    ]);
    let scenario_path;
    if let Some(name) = scenario {
        scenario_path = format!("netsim/scenarios/{name}.toml");
        args.extend(["--scenario", &scenario_path]);
    }
    args.extend(extra);
    let output = common::blossom(&args);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "simulate failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    // The terminal gets the table; the nodes' logs go to their file.
    assert!(!stderr.contains(" INFO ") && !stderr.contains(" WARN "), "node logs on the terminal:\n{stderr}");
    let records = std::fs::read_to_string(&metrics)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .filter(|r| r.get("round").is_some())
        .collect();
    (stdout, records)
}

fn field(record: &Value, key: &str) -> f64 {
    record[key].as_f64().unwrap_or_else(|| panic!("{key} in {record}"))
}

fn agreements(records: &[Value]) -> Vec<f64> {
    records.iter().map(|r| field(r, "agreement")).collect()
}

#[test]
fn ideal_network_loss_falls_and_every_node_agrees() {
    let dir = tempfile::tempdir().unwrap();
    let (stdout, records) = simulate(dir.path(), 4, 4, Some("ideal"), &[], &["--centralized-baseline"]);
    assert_eq!(records.len(), 4, "{stdout}");
    let (first, last) = (&records[0], &records[3]);
    assert!(field(last, "eval_loss") < field(first, "eval_loss") - 0.1, "{stdout}");
    assert!(field(last, "train_loss") < field(first, "train_loss"), "{stdout}");
    assert_eq!(field(last, "agreement"), 1.0, "{stdout}");
    assert_eq!(field(last, "nodes"), 4.0);
    assert!(field(last, "bytes_sent_per_node") > 0.0);
    // The table, the plot and the saved adapter are there.
    assert!(stdout.contains("agreement") && stdout.contains("exact match: "), "{stdout}");
    assert!(std::fs::read_to_string(dir.path().join("metrics.svg")).unwrap().contains("<svg"));
    assert!(dir.path().join("simulate/adapter/adapters.safetensors").exists());
    assert!(dir.path().join("simulate/adapter/adapter_config.json").exists());
    assert!(stdout.contains("centralized eval loss"), "{stdout}");
    // The table says where the nodes' logs went, and they are there.
    let node_log = dir.path().join("simulate/nodes.log");
    assert!(stdout.contains(&format!("node logs: {}", node_log.display())), "{stdout}");
    let logs = std::fs::read_to_string(&node_log).unwrap();
    assert!(logs.contains("round 0 members settled") && logs.contains("average certified"), "{logs}");
    // The breakdown of what a node received (the default, reduce exchange).
    assert!(stdout.contains("on the links; payload") && stdout.contains("pieces "), "{stdout}");
}

/// `federation.exchange = "…"`, as a setting.
fn exchange(name: &str) -> String {
    format!("federation.exchange=\"{name}\"")
}

fn lossy_wan_completes_and_agrees(mode: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (stdout, records) = simulate(dir.path(), 4, 4, Some("lossy-wan"), &[&exchange(mode)], &[]);
    assert_eq!(records.len(), 4, "{stdout}");
    assert_eq!(agreements(&records)[3], 1.0, "{stdout}");
}

#[test]
fn lossy_wan_completes_and_agrees_in_the_gossip_exchange() {
    lossy_wan_completes_and_agrees("gossip");
}

#[test]
fn lossy_wan_completes_and_agrees_in_the_reduce_exchange() {
    lossy_wan_completes_and_agrees("reduce");
}

#[test]
fn churn_completes_and_live_nodes_agree_again_when_it_stops() {
    churn_in("gossip");
}

/// Crashes and restarts, each possibly an owner of slices mid-round.
#[test]
fn churn_completes_and_live_nodes_agree_again_in_the_reduce_exchange() {
    churn_in("reduce");
}

fn churn_in(mode: &str) {
    let dir = tempfile::tempdir().unwrap();
    // Churn events end at round 4; rounds 5 and 6 are quiet.
    let (stdout, records) = simulate(dir.path(), 4, 7, Some("churn"), &[&exchange(mode)], &[]);
    assert_eq!(records.len(), 7, "{stdout}");
    let nodes: Vec<f64> = records.iter().map(|r| field(r, "nodes")).collect();
    assert!(nodes.iter().any(|n| *n < 4.0), "the churn took nodes away: {nodes:?}");
    assert!(stdout.contains("node 1 caught up") && stdout.contains("node 2 caught up"), "{stdout}");
    assert_eq!(field(&records[6], "agreement"), 1.0, "{stdout}");
    assert_eq!(field(&records[6], "nodes"), 4.0, "{stdout}");
}

/// int8 and top-k updates with the Nesterov outer step through crashes
/// and restarts in the reduce exchange: restarted nodes take the certified
/// state (the momentum with it) and everyone agrees again.
#[test]
fn compressed_updates_with_nesterov_agree_again_after_churn() {
    for compression in ["int8", "topk"] {
        let dir = tempfile::tempdir().unwrap();
        let compressed = format!("federation.compression=\"{compression}\"");
        let settings = [compressed.as_str(), "federation.outer_optimizer=\"nesterov\""];
        let (stdout, records) = simulate(dir.path(), 4, 7, Some("churn"), &settings, &[]);
        assert_eq!(records.len(), 7, "{compression}: {stdout}");
        assert!(stdout.contains("node 1 caught up") && stdout.contains("node 2 caught up"), "{compression}: {stdout}");
        assert_eq!(field(&records[6], "agreement"), 1.0, "{compression}: {stdout}");
        assert_eq!(field(&records[6], "nodes"), 4.0, "{compression}: {stdout}");
    }
}

/// Late joiners under each compression, in both exchanges: a joiner's
/// state is the certified one, momentum included.
#[test]
fn late_joiners_agree_under_every_compression() {
    for (compression, mode) in [("fp16", "gossip"), ("int8", "reduce"), ("topk", "gossip")] {
        let dir = tempfile::tempdir().unwrap();
        let settings = [format!("federation.compression=\"{compression}\""), "federation.outer_optimizer=\"nesterov\"".to_owned(), exchange(mode)];
        let settings: Vec<&str> = settings.iter().map(String::as_str).collect();
        let (stdout, records) = simulate(dir.path(), 4, 5, Some("late-joiners"), &settings, &[]);
        assert!(stdout.contains("node 3 caught up: trains from round"), "{compression}: {stdout}");
        let last = records.last().unwrap();
        assert_eq!(field(last, "nodes"), 4.0, "{compression}: {stdout}");
        assert_eq!(field(last, "agreement"), 1.0, "{compression}: {stdout}");
    }
}

/// int8 moves under half of float32's bytes and learns as much: the eval
/// loss within 1% after the same rounds; top-k moves under half of int8's
/// and still learns (within 5% of float32's eval loss on the tiny model,
/// where sending nothing useful ends far above: round 0's loss is 17% up).
#[test]
fn compressed_updates_move_fewer_bytes_and_learn() {
    let run = |compression: &str| {
        let dir = tempfile::tempdir().unwrap();
        let setting = format!("federation.compression=\"{compression}\"");
        let (stdout, records) = simulate(dir.path(), 4, 3, Some("ideal"), &[&setting], &[]);
        assert_eq!(agreements(&records), [1.0; 3], "{stdout}");
        let bytes: f64 = records.iter().map(|r| field(r, "bytes_sent_per_node") + field(r, "bytes_received_per_node")).sum();
        (bytes, field(&records[2], "eval_loss"))
    };
    let (plain_bytes, plain_loss) = run("none");
    let (int8_bytes, int8_loss) = run("int8");
    assert!(int8_bytes < plain_bytes * 0.5, "int8 {int8_bytes} B against float32 {plain_bytes} B");
    assert!((int8_loss - plain_loss).abs() <= plain_loss * 0.01, "eval loss {int8_loss} against {plain_loss}");
    let (topk_bytes, topk_loss) = run("topk");
    assert!(topk_bytes < int8_bytes * 0.5, "topk {topk_bytes} B against int8 {int8_bytes} B");
    assert!(topk_loss <= plain_loss * 1.05, "eval loss {topk_loss} against {plain_loss}");
}

/// The CI version of the churn soak (the full one: README, `churn-soak`):
/// a third of six nodes churning over lossy links, then quiet rounds.
#[test]
fn a_short_churn_soak_stays_bounded_and_ends_in_agreement() {
    churn_soak_in("gossip");
}

/// The same soak in the reduce exchange: nodes that came back late, or saw
/// other updates than the rest, adopt the inputs most owners averaged.
#[test]
fn a_short_churn_soak_ends_in_agreement_in_the_reduce_exchange() {
    churn_soak_in("reduce");
}

fn churn_soak_in(mode: &str) {
    let dir = tempfile::tempdir().unwrap();
    let quota_mb = 64;
    let quota = format!("network.store_quota_mb={quota_mb}");
    let (stdout, records) = simulate(dir.path(), 6, 7, Some("churn-soak-short"), &[&quota, &exchange(mode)], &[]);
    assert_eq!(records.len(), 7, "{stdout}");
    let nodes: Vec<f64> = records.iter().map(|r| field(r, "nodes")).collect();
    assert!(nodes.iter().any(|n| *n < 6.0), "the churn took nodes away: {nodes:?}");
    // Quiet from round 4: everyone agrees again within two rounds.
    assert_eq!(field(&records[6], "agreement"), 1.0, "{stdout}");
    assert_eq!(field(&records[6], "nodes"), 6.0, "{stdout}");
    for record in &records {
        assert!(field(record, "largest_store_bytes") <= (quota_mb * 1024 * 1024) as f64, "{record}");
    }
    // Memory: the peak does not keep growing once the churn stops.
    let peak = |r: &Value| field(r, "peak_rss_mb");
    assert!(peak(&records[6]) <= peak(&records[3]) * 1.25, "peak RSS grew: {} MB → {} MB", peak(&records[3]), peak(&records[6]));
}

#[test]
fn a_late_joiner_catches_up_from_the_newest_average() {
    late_joiners_in("gossip");
}

#[test]
fn a_late_joiner_catches_up_in_the_reduce_exchange() {
    late_joiners_in("reduce");
}

fn late_joiners_in(mode: &str) {
    let dir = tempfile::tempdir().unwrap();
    let (stdout, records) = simulate(dir.path(), 4, 5, Some("late-joiners"), &[&exchange(mode)], &[]);
    assert!(stdout.contains("node 3 caught up: trains from round"), "{stdout}");
    assert_eq!(field(&records[0], "nodes"), 2.0, "nodes 2 and 3 join later: {stdout}");
    let last = records.last().unwrap();
    assert_eq!(field(last, "nodes"), 4.0, "{stdout}");
    assert_eq!(field(last, "agreement"), 1.0, "{stdout}");
}

#[test]
fn a_partitioned_network_diverges_and_converges_after_healing() {
    partition_heal_in("gossip");
}

#[test]
fn a_partitioned_network_converges_after_healing_in_the_reduce_exchange() {
    partition_heal_in("reduce");
}

/// Compressed updates are changes: after the heal the halves' changes go
/// onto one start (the certified state most inputs trained from), so they
/// agree again as float32 adapters do.
#[test]
fn a_partitioned_network_converges_after_healing_with_int8_changes() {
    partition_heal_with("reduce", &["federation.compression=\"int8\""]);
}

fn partition_heal_in(mode: &str) {
    partition_heal_with(mode, &[]);
}

fn partition_heal_with(mode: &str, settings: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let mode = exchange(mode);
    let settings: Vec<&str> = settings.iter().copied().chain([mode.as_str()]).collect();
    let (stdout, records) = simulate(dir.path(), 4, 5, Some("partition-heal"), &settings, &[]);
    let agreement = agreements(&records);
    // Split at round 1 into halves: each half averages on its own. (The
    // split comes as the first node starts round 1, so a node still in
    // round 0's exchange may fall behind and rejoin later: round 1's row
    // then holds 3 nodes, 2 of them agreeing.)
    assert!(agreement[1] < 1.0, "the halves diverge: {stdout}");
    assert_eq!(agreement[4], 1.0, "healed at round 3: {stdout}");
}

#[test]
fn exact_and_robust_averaging_run_end_to_end() {
    for method in ["exact", "median", "trimmed-mean", "norm-clip"] {
        let dir = tempfile::tempdir().unwrap();
        let set = format!("federation.aggregation=\"{method}\"");
        let (stdout, records) = simulate(dir.path(), 3, 2, None, &[&set], &[]);
        assert!(stdout.contains(&format!("`{method}` averaging")), "{stdout}");
        assert_eq!(agreements(&records)[1], 1.0, "{method}: {stdout}");
    }
}

/// The reduce exchange averages slice by slice at the slices' owners; put
/// together, the slices are the gossip exchange's average, hash for hash,
/// for every method, and for int8 and top-k changes too (owners and the gossip
/// exchange write the average in the same compression).
#[test]
fn the_reduce_exchange_gives_the_gossip_exchanges_averages_for_every_method() {
    let runs = [
        ("fedavg", "none"), ("exact", "none"), ("median", "none"), ("trimmed-mean", "none"), ("norm-clip", "none"),
        ("fedavg", "int8"), ("median", "int8"), ("norm-clip", "int8"), ("fedavg", "topk"),
    ];
    for (method, compression) in runs {
        let hashes = |mode: &str| {
            let dir = tempfile::tempdir().unwrap();
            let set = format!("federation.aggregation=\"{method}\"");
            let compressed = format!("federation.compression=\"{compression}\"");
            let (stdout, records) = simulate(dir.path(), 3, 2, None, &[&set, &exchange(mode), &compressed], &[]);
            assert_eq!(records.len(), 2, "{method} {mode}: {stdout}");
            let hashes: Vec<String> = records.iter().map(|r| r["average_hash"].as_str().unwrap().to_owned()).collect();
            assert!(agreements(&records).iter().all(|a| *a == 1.0), "{method} {mode}: {stdout}");
            hashes
        };
        assert_eq!(hashes("gossip"), hashes("reduce"), "{method}, {compression}");
    }
}

/// One of four nodes claims every slice it owns with wrong values: the
/// honest nodes find the claims contested, compute those slices from the
/// signed inputs, keep the true average (the clean run's), and exclude the
/// liar with the reason.
#[test]
fn a_lying_reducer_is_caught_and_excluded_and_the_honest_nodes_agree() {
    let reduce = exchange("reduce");
    let dir = tempfile::tempdir().unwrap();
    let (stdout, records) = simulate(dir.path(), 4, 3, None, &[&reduce], &["--attack", "lying-reducer"]);
    let clean_dir = tempfile::tempdir().unwrap();
    let (_, clean) = simulate(clean_dir.path(), 4, 3, None, &[&reduce], &[]);
    assert!(stdout.contains("lying-reducer"), "the rejections name the liar's kind: {stdout}");
    for record in &records {
        let averages = record["averages"].as_object().unwrap();
        let honest: Vec<&Value> = ["0", "1", "2"].iter().map(|n| &averages[*n]).collect();
        assert!(honest.iter().all(|h| *h == honest[0]), "honest nodes disagree: {record}");
    }
    // Round 0: the liar trained honestly; the honest nodes hold the clean
    // average, not one with the lie in it.
    assert_eq!(records[0]["averages"]["0"], clean[0]["average_hash"], "{stdout}");
}

/// Audits of part of a slice: with an adapter of the default model's size
/// (the tiny model at rank 208: 3.4 MB, slices of ~245 KB) and every node
/// auditing each round, a node checks an eighth of a slice, fetching only
/// that part of every input with its proof. An honest run stays one
/// average with no one excluded (a part computed alone is the same bytes
/// as in the slice); a slice's sole owner (`replicas` 1, so no co-owner
/// contests it) that claims wrong values is caught by those parts.
#[test]
fn audits_of_part_of_a_slice_catch_a_sole_owners_lie_and_spare_the_honest() {
    let big = ["lora.rank=208", "federation.audit=1.0"];
    let dir = tempfile::tempdir().unwrap();
    let (stdout, records) = simulate(dir.path(), 4, 2, None, &big, &[]);
    assert!(agreements(&records).iter().all(|a| *a == 1.0), "{stdout}");
    assert!(!stdout.contains("lying-reducer"), "an honest owner was convicted: {stdout}");
    let summary: Value = std::fs::read_to_string(dir.path().join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|r| r["summary"] == true)
        .unwrap();
    let payload = &summary["payload_received_per_node_round"];
    let (parts, pieces) = (field(payload, "audit_parts"), field(payload, "pieces"));
    // Each node checked a part of a slice each round: 3 inputs' eighths of
    // a ~245 KB slice, about 90 KB, where a whole slice's inputs were 735 KB.
    assert!(parts > 30e3 && parts < 200e3, "audit parts received per node per round: {parts}\n{summary}");
    assert!(pieces > 10.0 * parts, "{summary}");

    let liar_dir = tempfile::tempdir().unwrap();
    let sole = [big[0], big[1], "federation.replicas=1"];
    let (stdout, _) = simulate(liar_dir.path(), 4, 2, None, &sole, &["--attack", "lying-reducer"]);
    assert!(stdout.contains("lying-reducer"), "no audit caught the sole owner's wrong slices: {stdout}");
}

#[test]
fn a_slice_owner_that_never_claims_costs_one_standby_per_slice() {
    // Node 5 trains and serves its update but never claims the two slices
    // it owns, as an owner that crashed mid-round. No audits, so every
    // slice an honest node computes is its own or one it took over.
    let reduce = exchange("reduce");
    let settings = [reduce.as_str(), "federation.audit=0.0"];
    let dir = tempfile::tempdir().unwrap();
    let (stdout, records) = simulate(dir.path(), 6, 2, None, &settings, &["--attack", "lazy-reducer"]);
    let clean_dir = tempfile::tempdir().unwrap();
    let (_, clean) = simulate(clean_dir.path(), 6, 2, None, &settings, &[]);
    for (record, clean) in records.iter().zip(&clean) {
        // Its update is an input like any other: the same average as
        // without the attack, on every node.
        let averages = record["averages"].as_object().unwrap();
        assert!(averages.values().all(|a| *a == clean["average_hash"]), "not the clean average everywhere: {record}\n{stdout}");
        let computed: Vec<u64> = (0..5).map(|n| record["slices_computed"][n.to_string()].as_u64().unwrap()).collect();
        // 6 slices with 2 owners each: the honest nodes hold 10 owner
        // places, and the standbys of node 5's 2 slices take those over.
        // Every honest node computing both itself (the co-owners compute
        // one of them anyway) makes it 18.
        assert_eq!(computed.iter().sum::<u64>(), 12, "slices computed by nodes 0-4: {computed:?}\n{record}");
    }
}

#[test]
fn a_bad_scenario_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "name = \"bad\"\n[[event]]\nat_round = 1\naction = \"crash\"\nnodes = [7]\n").unwrap();
    let output = common::blossom(&["simulate", "--nodes", "3", "--rounds", "3", "--set", "model.source=tiny", "--scenario", bad.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("node 7 does not exist"), "{stderr}");
}

/// One of five nodes publishes noise instead of its update: plain FedAvg's
/// result is ruined, the coordinate-wise median stays near the clean run.
#[test]
fn robust_averaging_withstands_a_poisoning_node_and_fedavg_does_not() {
    let eval = |method: &str, attack: &[&str]| {
        let dir = tempfile::tempdir().unwrap();
        let set = format!("federation.aggregation=\"{method}\"");
        let (stdout, records) = simulate(dir.path(), 5, 3, None, &[&set], attack);
        assert!(stdout.contains("attack") || attack.is_empty(), "{stdout}");
        field(records.last().unwrap(), "eval_loss")
    };
    let clean = eval("fedavg", &[]);
    let poisoned_fedavg = eval("fedavg", &["--attack", "noise"]);
    let poisoned_median = eval("median", &["--attack", "noise"]);
    assert!(poisoned_fedavg > clean * 1.2, "FedAvg under attack {poisoned_fedavg} vs clean {clean}");
    assert!(poisoned_median < clean * 1.05, "median under attack {poisoned_median} vs clean {clean}");
}

/// `bench traffic` runs one simulation per size and exchange, each in its
/// own process (the gossip exchange up to `--gossip-max-nodes`), and writes
/// the table (JSONL) and the log-log plot. `--model tiny` gets the tiny
/// model's layer count, as no `--model` does.
#[test]
fn bench_traffic_measures_each_size_and_exchange() {
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("traffic.jsonl");
    let data_dir = format!("network.data_dir=\"{}\"", dir.path().display());
    let out = common::blossom(&[
        "-q", "--set", &data_dir, "--set", "train.local_steps=2", "bench", "traffic", "--model", "tiny", "--nodes", "2,3", "--gossip-max-nodes", "2", "--rounds", "1",
        "--compression", "none,int8", "--output", output.to_str().unwrap(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let records: Vec<Value> = std::fs::read_to_string(&output).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let runs: Vec<(&str, &str, u64)> = records.iter().map(|r| (r["exchange"].as_str().unwrap(), r["compression"].as_str().unwrap(), r["nodes"].as_u64().unwrap())).collect();
    assert_eq!(runs, [("gossip", "none", 2), ("gossip", "int8", 2), ("reduce", "none", 2), ("reduce", "none", 3), ("reduce", "int8", 2), ("reduce", "int8", 3)]);
    // int8 moves each run's payload in well under half the bytes.
    for (plain, int8) in [(0, 1), (2, 4), (3, 5)] {
        let mean = |i: usize| field(&records[i], "mean_node_bytes_per_round");
        assert!(mean(int8) < 0.5 * mean(plain), "{:?}: {} against {}", runs[int8], mean(int8), mean(plain));
    }
    assert!(stdout.contains("the gossip exchange ran up to 2 nodes"), "{stdout}");
    for record in &records {
        assert!(field(record, "largest_node_bytes_per_round") >= field(record, "mean_node_bytes_per_round"), "{record}");
        assert!(field(record, "mean_node_bytes_per_round") > 0.0 && field(record, "flower_client_bytes") > 0.0, "{record}");
        assert_eq!(field(record, "agreement"), 1.0, "{record}");
        // What the received bytes carried: whole adapters in the gossip
        // exchange, pieces (slice inputs) in the reduce exchange.
        let payload = &record["payload_received_per_node_round"];
        let (chunks, pieces) = (field(payload, "gossip_chunks"), field(payload, "pieces"));
        match record["exchange"].as_str() {
            Some("gossip") => assert!(chunks > 0.0 && pieces == 0.0, "{record}"),
            _ => assert!(pieces > 0.0 && chunks == 0.0, "{record}"),
        }
        assert!(field(payload, "updates") > 0.0 && field(record, "link_received_per_node_round") > 0.0, "{record}");
    }
    assert!(stdout.contains("x Flower") && stdout.contains("a Flower client moves"), "{stdout}");
    assert!(std::fs::read_to_string(output.with_extension("svg")).unwrap().contains("<svg"));
    // `--replot` draws the same table and plot from the records alone.
    std::fs::remove_file(output.with_extension("svg")).unwrap();
    let replot = common::blossom(&["-q", "bench", "traffic", "--replot", "--output", output.to_str().unwrap()]);
    let table = String::from_utf8_lossy(&replot.stdout).into_owned();
    assert!(replot.status.success(), "{table}");
    assert_eq!(table.lines().filter(|l| l.starts_with("reduce") || l.starts_with("gossip")).count(), 6, "{table}");
    assert!(std::fs::read_to_string(output.with_extension("svg")).unwrap().contains("<svg"));
    // A file that is not a bench traffic table is a clear error.
    let other = dir.path().join("other.jsonl");
    std::fs::write(&other, "{\"round\": 0}\n").unwrap();
    let refused = common::blossom(&["-q", "bench", "traffic", "--replot", "--output", other.to_str().unwrap()]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("not a bench traffic record"));
}

/// One run of the adversary suite (docs/SECURITY.md): five nodes of the
/// tiny model, four rounds, the last `attackers` attacking; the honest
/// nodes' records and the run's summary.
struct Attacked {
    stdout: String,
    records: Vec<Value>,
    summary: Value,
}

fn attacked(attack: Option<&str>, attackers: u32, scenario: Option<&str>, settings: &[&str]) -> Attacked {
    let dir = tempfile::tempdir().unwrap();
    let attackers = attackers.to_string();
    let extra: Vec<&str> = attack.map(|a| vec!["--attack", a, "--attackers", &attackers]).unwrap_or_default();
    let scenario = scenario.map(|s| s.to_owned());
    let (stdout, records) = simulate(dir.path(), 5, 4, scenario.as_deref(), settings, &extra);
    let text = std::fs::read_to_string(dir.path().join("metrics.jsonl")).unwrap();
    let summary = text.lines().map(|l| serde_json::from_str::<Value>(l).unwrap()).find(|r| r.get("summary").is_some()).unwrap();
    Attacked { stdout, records, summary }
}

/// The clean run's final eval loss for a scenario and method, computed once.
fn clean_eval(scenario: Option<&'static str>, method: &'static str) -> f64 {
    static CLEAN: std::sync::Mutex<Vec<(Option<&str>, &str, f64)>> = std::sync::Mutex::new(Vec::new());
    let mut known = CLEAN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, _, loss)) = known.iter().find(|(s, m, _)| *s == scenario && *m == method) {
        return *loss;
    }
    let set = format!("federation.aggregation=\"{method}\"");
    let loss = field(attacked(None, 1, scenario, &[&set]).records.last().unwrap(), "eval_loss");
    known.push((scenario, method, loss));
    loss
}

/// The honest nodes agree at the end, end within 5% of the clean run's
/// eval loss, and (with `kind`) every one of them quarantined the attacker
/// (node 4) for that kind of proof.
fn withstood(run: &Attacked, clean: f64, kind: Option<&str>) {
    let last = run.records.last().unwrap();
    assert_eq!(field(last, "agreement"), 1.0, "{}", run.stdout);
    let loss = field(last, "eval_loss");
    assert!((loss - clean).abs() <= 0.05 * clean, "eval loss {loss} vs {clean} clean\n{}", run.stdout);
    let quarantined = run.summary["quarantined"].as_array().unwrap();
    match kind {
        Some(kind) => {
            let expected = serde_json::json!([{"node": 4, "by": 4, "kind": kind}]);
            assert_eq!(run.summary["quarantined"], expected, "{}", run.stdout);
        }
        None => assert!(quarantined.is_empty(), "{}", run.stdout),
    }
}

#[test]
fn an_inflated_weight_is_rejected_and_its_author_quarantined() {
    withstood(&attacked(Some("inflate-weight"), 1, None, &[]), clean_eval(None, "fedavg"), Some("wrong-weight"));
}

#[test]
fn an_equivocating_node_is_quarantined_on_evidence() {
    withstood(&attacked(Some("equivocate"), 1, None, &[]), clean_eval(None, "fedavg"), Some("equivocation"));
}

#[test]
fn manifests_for_rounds_the_run_does_not_have_quarantine_their_author() {
    withstood(&attacked(Some("future-round"), 1, None, &[]), clean_eval(None, "fedavg"), Some("future-round"));
}

/// A subscriber that never publishes costs each node one deadline, not one
/// a round (nodes that meet it in different rounds pay in different rounds).
#[test]
fn a_silent_member_costs_each_node_one_deadline() {
    let run = attacked(Some("silent"), 1, None, &[]);
    withstood(&run, clean_eval(None, "fedavg"), None);
    let hits: f64 = run.records.iter().map(|r| field(r, "deadline_hits")).sum();
    assert!(hits <= 4.0, "{}", run.stdout);
    assert_eq!(field(run.records.last().unwrap(), "deadline_hits"), 0.0, "{}", run.stdout);
}

/// Late joiners take only certified averages: the attacker's self-certified
/// poison is refused, and each joiner starts from the honest average.
#[test]
fn late_joiners_refuse_a_fake_average_and_start_from_the_certified_one() {
    let run = attacked(Some("fake-average"), 1, Some("late-joiners"), &[]);
    withstood(&run, clean_eval(Some("late-joiners"), "fedavg"), None);
    let caught_up: Vec<&str> = run.stdout.lines().filter(|l| l.contains("caught up: trains from round")).collect();
    assert_eq!(caught_up.len(), 2, "{}", run.stdout);
    for line in caught_up {
        let round: usize = line.split("from round ").nth(1).unwrap().split(' ').next().unwrap().parse().unwrap();
        let hash = line.rsplit("average ").next().unwrap();
        assert_eq!(run.records[round - 1]["average_hash"].as_str(), Some(hash), "{line}\n{}", run.stdout);
    }
}

/// One attacker with k identities sending one poisoned update: the median
/// holds while they are a minority (2 of 5) and not once they are the
/// majority (3 of 5), the limit of robust averaging in an open run.
#[test]
fn sybil_identities_steer_the_median_only_as_a_majority() {
    let median = "federation.aggregation=\"median\"";
    let clean = clean_eval(None, "median");
    withstood(&attacked(Some("sybil"), 2, None, &[median]), clean, None);
    let majority = attacked(Some("sybil"), 3, None, &[median]);
    let loss = field(majority.records.last().unwrap(), "eval_loss");
    assert!(loss > clean * 1.1, "a Sybil majority moves the median: {loss} vs {clean}\n{}", majority.stdout);
}
