"""Tests of scripts/bench-report.py on small synthetic JSONL inputs.

Run: python -m pytest -q tests/bench_report   (pytest from the venv of scripts/venv.sh)
"""

import importlib.util
import json
import pathlib
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "bench-report.py"
SVG = "{http://www.w3.org/2000/svg}"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    writes_bytecode = sys.dont_write_bytecode
    sys.dont_write_bytecode = True  # no scripts/__pycache__ in the work tree
    try:
        spec.loader.exec_module(module)
    finally:
        sys.dont_write_bytecode = writes_bytecode
    return module


br = load_script()


def load_line(server, scenario, *, cpu=1.0, received=100_000, lost=0, duplicates=0, unexpected=0,
              p50=5.0, p99=20.0, sent=None, scheduled=2000, target_met=True, loadgen=None, round_=None,
              rate=None, clients=1000, rooms=10, **extra):
    """A load line shaped like the sweep's, with just the fields the report reads."""
    _, params = br.parse_scenario(scenario)
    rate = rate if rate is not None else params.get("r", 100)
    sent = scheduled if sent is None else sent
    line = {
        "server": server, "scenario": scenario, "mode": "load",
        "clients": clients, "rooms": rooms, "broadcast_rooms": 1, "rate_target": rate,
        "scheduled": scheduled, "sent": sent,
        "expected_deliveries": received + lost, "received_deliveries": received,
        "lost": lost, "duplicates": duplicates, "unexpected": unexpected,
        "deliveries_per_s": received / 20,
        "latency_ms": {"p50": p50, "p90": p99 * 0.8, "p99": p99, "max": p99 * 2},
        "servers_cpu_s": cpu, "loadgen_cpu_s": 2.0, "servers_rss_peak_mb": 60.0,
        "target_met": target_met, "noisy_machine": False,
        "bottleneck": "none: target met" if target_met else "target missed: machine CPU saturated",
    }
    if loadgen is not None:
        line["loadgen"] = loadgen
    if round_ is not None:
        line["round"] = round_
    line.update(extra)
    return line


def idle_line(server, kib, *, scenario="idle-c2000", loadgen=None):
    line = {"server": server, "scenario": scenario, "mode": "idle-memory", "clients": 2000,
            "servers_kib_per_connection": kib, "servers_total_kib_per_connection": kib * 3,
            "servers_rss_before_mb": 30.0, "servers_rss_after_mb": 80.0}
    if loadgen is not None:
        line["loadgen"] = loadgen
    return line


def smoke_line(server, ok=True):
    checks = [{"name": "GET /healthz 200", "ok": True}, {"name": "leave stops delivery", "ok": ok}]
    return {"server": server, "scenario": "protocol-smoke", "ok": ok, "checks": checks}


def write_jsonl(path, lines):
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def run_report(tmp_path, lines, baseline="chorus", out="out", name="bench.jsonl"):
    source = write_jsonl(tmp_path / name, lines)
    out_dir = tmp_path / out
    assert br.main(["--baseline", baseline, "--out-dir", str(out_dir), str(source)]) == 0
    return out_dir


def report_for(tmp_path, lines, baseline="chorus"):
    source = write_jsonl(tmp_path / "bench.jsonl", lines)
    return br.build_report(br.read_dataset([str(source)]), baseline, None)


def targets(report, peer, loadgen="node-loadgen"):
    rows = br.evaluate_targets(report.aggregates, report.dataset.runs, loadgen, report.baseline, peer)
    return {row.target.split(" (")[0]: row for row in rows}


def table_rows(markdown, heading):
    """The rows (lists of cells) of the first table after `heading`."""
    lines = markdown.splitlines()
    start = lines.index(heading)
    rows, inside = [], False
    for line in lines[start + 1:]:
        if line.startswith("|"):
            inside = True
            rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
        elif inside:
            break
    return rows[2:]  # without the header and the alignment row


# ------------------------------------------------------------------------------------------


def test_cpu_ratio_one_third_is_met(tmp_path):
    lines = [
        load_line("chorus", "socket-c1000-k10-r250", cpu=1.0, received=100_000),
        load_line("peer", "socket-c1000-k10-r250", cpu=3.0, received=100_000),
    ]
    report = report_for(tmp_path, lines)
    [row] = br.load_ratios(report.aggregates, "node-loadgen", "chorus", "peer")
    assert row.baseline.figures["servers_us_per_delivery"] == pytest.approx(10.0)
    assert row.peer.figures["servers_us_per_delivery"] == pytest.approx(30.0)
    assert row.cpu == pytest.approx(1 / 3)
    assert row.below_saturation
    cpu = targets(report, "peer")["servers CPU per delivery ≤ 1/3 of the peer's"]
    assert cpu.result == "met"
    assert "0.333" in cpu.measured

    markdown = (run_report(tmp_path, lines) / "results.md").read_text(encoding="utf-8")
    ratio_rows = table_rows(markdown, "### Ratios chorus / peer")
    assert ratio_rows[0][0] == "socket-c1000-k10-r250"
    assert ratio_rows[0][4] == "0.333"
    target_rows = table_rows(markdown, "### Targets: chorus against peer")
    assert target_rows[0][0].startswith("servers CPU per delivery")
    assert target_rows[0][2] == "met"


def servers(*sys_seconds):
    return [{"name": f"s{i}", "kind": "server", "cpu_s": 1.0, "cpu_sys_s": sys_s}
            for i, sys_s in enumerate(sys_seconds)] + [{"name": "loadgen", "kind": "loadgen", "cpu_sys_s": 9.0}]


def test_cpu_split_into_user_and_kernel_with_the_kernel_floor(tmp_path):
    lines = [
        # chorus: 1.0 s in all, 0.5 s of it kernel; the peer: 2.0 s, 0.6 s kernel
        load_line("chorus", "http-c1000-k10-r100", cpu=1.0, received=100_000, processes=servers(0.25, 0.25)),
        load_line("peer", "http-c1000-k10-r100", cpu=2.0, received=100_000, processes=servers(0.3, 0.3)),
        # a server process without cpu_sys_s: no split for that scenario
        load_line("chorus", "http-c1000-k10-r50", cpu=1.0, received=100_000,
                  processes=[{"name": "s0", "kind": "server", "cpu_s": 1.0}]),
        load_line("peer", "http-c1000-k10-r50", cpu=2.0, received=100_000, processes=servers(0.3)),
    ]
    report = report_for(tmp_path, lines)
    figures = report.aggregates[("node-loadgen", "chorus", "http-c1000-k10-r100")].figures
    assert figures["servers_sys_us_per_delivery"] == pytest.approx(5.0)
    assert figures["servers_user_us_per_delivery"] == pytest.approx(5.0)
    assert report.aggregates[("node-loadgen", "chorus", "http-c1000-k10-r50")].figures["servers_sys_s"] is None

    markdown = (run_report(tmp_path, lines) / "results.md").read_text(encoding="utf-8")
    heading = next(line for line in markdown.splitlines() if line.startswith("User and kernel CPU per delivery"))
    [row] = table_rows(markdown, heading)
    assert row[0] == "http-c1000-k10-r100"
    assert row[2:] == ["5.00 / 5.00", "14.0 / 6.00", "0.357", "0.250"]
    assert "the kernel floor is above 0.333 in 0 of 1 scenarios (median 0.250)" in markdown


def test_cpu_target_uses_the_worst_scenario_below_saturation(tmp_path):
    lines = [
        load_line("chorus", "socket-c1000-k10-r250", cpu=1.0),
        load_line("peer", "socket-c1000-k10-r250", cpu=4.0),  # 0.25
        load_line("chorus", "fanout-c2000-k1-r10", cpu=1.0),
        load_line("peer", "fanout-c2000-k1-r10", cpu=2.0),  # 0.5: the worst
        load_line("chorus", "multiroom-c1000-k10-r100", cpu=1.0),
        load_line("peer", "multiroom-c1000-k10-r100", cpu=5.0),  # 0.2
        # Saturated for the baseline (target missed): not counted, however bad.
        load_line("chorus", "fanout-c2000-k1-r50", cpu=9.0, target_met=False, sent=1500),
        load_line("peer", "fanout-c2000-k1-r50", cpu=1.0, target_met=False, sent=900),
    ]
    report = report_for(tmp_path, lines)
    cpu = targets(report, "peer")["servers CPU per delivery ≤ 1/3 of the peer's"]
    assert cpu.result == "not met"
    assert cpu.value == pytest.approx(0.5)
    assert "worst 0.500 (fanout-c2000-k1-r10)" in cpu.measured
    assert "median 0.250 over 3 scenarios" in cpu.measured


def test_max_clean_rate_picks_highest_clean_and_ignores_faster_unclean(tmp_path):
    lines = [
        load_line("chorus", "http-c1000-k10-r100", p99=5.0),
        load_line("chorus", "http-c1000-k10-r200", p99=30.0),
        load_line("chorus", "http-c1000-k10-r400", p99=60.0),
        # Faster but not clean: lost deliveries, then p99 over 100 ms, then sent < scheduled.
        load_line("chorus", "http-c1000-k10-r800", lost=10, target_met=False),
        load_line("chorus", "http-c1000-k10-r1600", p99=150.0),
        load_line("chorus", "http-c1000-k10-r3200", sent=1000, scheduled=64_000, target_met=False),
        load_line("peer", "http-c1000-k10-r100", p99=30.0),
        load_line("peer", "http-c1000-k10-r200", p99=250.0),
        load_line("peer", "http-c1000-k10-r400", p99=900.0),
    ]
    report = report_for(tmp_path, lines)
    group = (("c", 1000), ("k", 10))
    mine = br.max_clean_rate(report.aggregates, "node-loadgen", "chorus", group)
    theirs = br.max_clean_rate(report.aggregates, "node-loadgen", "peer", group)
    assert mine.rate == 400
    assert theirs.rate == 100
    assert not mine.at_highest_rate_tested
    rows = targets(report, "peer")
    rate = rows["max clean broadcast rate ≥ 3× the peer's"]
    assert rate.value == pytest.approx(4.0)
    assert rate.result == "met"
    p99 = rows["p99 latency at the peer's max clean rate ≤ 1/3 of the peer's"]
    assert p99.value == pytest.approx(5.0 / 30.0)
    assert p99.result == "met"
    # r800 lies above the baseline's max clean rate: not below saturation, so its loss does not count.
    assert rows["no lost, duplicate or unexpected delivery in any baseline run below saturation"].result == "met"

    markdown = (run_report(tmp_path, lines) / "results.md").read_text(encoding="utf-8")
    clean_rows = table_rows(markdown, "### Maximum clean broadcast rate")
    assert clean_rows[0][:3] == ["http c1000 k10", "chorus", "400"]
    assert clean_rows[1][:3] == ["http c1000 k10", "peer", "100"]


def test_max_clean_rate_lower_than_three_times_is_not_met(tmp_path):
    lines = [
        load_line("chorus", "http-c1000-k10-r100", p99=5.0),
        load_line("chorus", "http-c1000-k10-r200", p99=50.0),
        load_line("chorus", "http-c1000-k10-r400", p99=500.0),
        load_line("peer", "http-c1000-k10-r100", p99=20.0),
        load_line("peer", "http-c1000-k10-r200", p99=400.0),
    ]
    rows = targets(report_for(tmp_path, lines), "peer")
    rate = rows["max clean broadcast rate ≥ 3× the peer's"]
    assert (rate.value, rate.result) == (pytest.approx(2.0), "not met")
    assert rate.measured.startswith("2.00 (200 vs 100")


def test_noisy_and_error_lines_are_excluded_and_listed(tmp_path):
    lines = [
        load_line("chorus", "http-c1000-k10-r100", p99=5.0),
        # Would be the fastest clean run, but the machine was noisy.
        load_line("chorus", "http-c1000-k10-r400", p99=5.0, noisy_machine=True, other_cpu_cores=0.4),
        {"server": "chorus", "scenario": "http-c1000-k10-r200", "mode": "load", "error": "hard time limit"},
        load_line("peer", "http-c1000-k10-r100", p99=20.0),
    ]
    out_dir = run_report(tmp_path, lines)
    report = report_for(tmp_path, lines)
    assert {ex.scenario for ex in report.dataset.excluded} == {"http-c1000-k10-r400", "http-c1000-k10-r200"}
    assert len(report.dataset.runs) == 2
    best = br.max_clean_rate(report.aggregates, "node-loadgen", "chorus", (("c", 1000), ("k", 10)))
    assert best.rate == 100

    markdown = (out_dir / "results.md").read_text(encoding="utf-8")
    excluded = table_rows(markdown, "### Excluded lines")
    assert [row[0] for row in excluded] == ["bench.jsonl:2", "bench.jsonl:3"]
    assert "noisy machine" in excluded[0][3]
    assert "error: hard time limit" in excluded[1][3]
    assert "#### http-c1000-k10-r400" not in markdown


def test_repeated_rounds_are_combined_by_median(tmp_path):
    lines = [
        load_line("chorus", "socket-c1000-k10-r250", round_=1, cpu=1.0, p99=10.0),
        load_line("peer", "socket-c1000-k10-r250", round_=1, cpu=4.0, p99=40.0),
        load_line("chorus", "socket-c1000-k10-r250", round_=2, cpu=2.0, p99=90.0),
        load_line("peer", "socket-c1000-k10-r250", round_=2, cpu=4.0, p99=40.0),
        load_line("chorus", "socket-c1000-k10-r250", round_=3, cpu=9.0, p99=30.0),
        load_line("peer", "socket-c1000-k10-r250", round_=3, cpu=4.0, p99=40.0),
    ]
    report = report_for(tmp_path, lines)
    agg = report.aggregates[("node-loadgen", "chorus", "socket-c1000-k10-r250")]
    assert len(agg.runs) == 3
    assert agg.figures["servers_us_per_delivery"] == pytest.approx(20.0)  # median of 10, 20, 90 µs
    assert agg.figures["p99_ms"] == pytest.approx(30.0)
    [row] = br.load_ratios(report.aggregates, "node-loadgen", "chorus", "peer")
    assert row.cpu == pytest.approx(0.5)

    markdown = (run_report(tmp_path, lines) / "results.md").read_text(encoding="utf-8")
    rows = table_rows(markdown, "#### socket-c1000-k10-r250")
    assert rows[0][:2] == ["chorus", "3"]
    assert rows[0][9] == "20.0"


def test_target_met_over_rounds_needs_a_majority():
    assert br.majority([True, True, False]) is True
    assert br.majority([True, False]) is False
    assert br.majority([]) is None


def test_zero_loss_target_checks_every_baseline_run_below_saturation(tmp_path):
    lines = [
        load_line("chorus", "socket-c1000-k10-r250", round_=1),
        load_line("chorus", "socket-c1000-k10-r250", round_=2, duplicates=3),
        load_line("chorus", "socket-c1000-k10-r250", round_=3),
        load_line("peer", "socket-c1000-k10-r250", round_=1, cpu=5.0),
    ]
    row = targets(report_for(tmp_path, lines), "peer")[
        "no lost, duplicate or unexpected delivery in any baseline run below saturation"]
    assert row.result == "not met"
    assert "1 of 3 runs" in row.measured
    assert "round 2: duplicates 3" in row.measured


def test_idle_memory_ratio(tmp_path):
    lines = [idle_line("chorus", 3.0), idle_line("peer", 12.0), load_line("chorus", "socket-c1000-k10-r250"),
             load_line("peer", "socket-c1000-k10-r250")]
    row = targets(report_for(tmp_path, lines), "peer")["idle RSS per connection ≤ 1/3 of the peer's"]
    assert row.value == pytest.approx(0.25)
    assert row.result == "met"
    assert row.measured.startswith("0.250 (3.00 vs 12.0 KiB")


def test_defaults_for_missing_loadgen_and_server_and_loadgen_sections(tmp_path):
    lines = [
        load_line("chorus", "socket-c1000-k10-r250"),
        load_line("peer", "socket-c1000-k10-r250", cpu=3.0),
        load_line("chorus", "socket-c1000-k10-r250", loadgen="chorus-bench", cpu=0.5),
        load_line("peer", "socket-c1000-k10-r250", loadgen="chorus-bench", cpu=3.0),
        {key: value for key, value in load_line("x", "socket-c1000-k10-r250").items() if key != "server"},
    ]
    out_dir = run_report(tmp_path, lines)
    markdown = (out_dir / "results.md").read_text(encoding="utf-8")
    assert "## Load generator: node-loadgen" in markdown
    assert "## Load generator: chorus-bench" in markdown
    assert markdown.index("## Load generator: chorus-bench") < markdown.index("## Load generator: node-loadgen")
    assert "| unknown | 1 |" in markdown
    for name in ("latency-vs-rate-node-loadgen.svg", "latency-vs-rate-chorus-bench.svg",
                 "cpu-per-delivery-node-loadgen.svg", "cpu-per-delivery-chorus-bench.svg",
                 "memory-per-connection.svg"):
        assert (out_dir / name).is_file(), name
    report = report_for(tmp_path, lines)
    assert targets(report, "peer", "chorus-bench")["servers CPU per delivery ≤ 1/3 of the peer's"].value == \
        pytest.approx(1 / 6)


def test_smoke_lines_only_reported(tmp_path):
    lines = [smoke_line("chorus"), smoke_line("peer", ok=False), load_line("chorus", "socket-c1000-k10-r250"),
             load_line("peer", "socket-c1000-k10-r250")]
    markdown = (run_report(tmp_path, lines) / "results.md").read_text(encoding="utf-8")
    rows = table_rows(markdown, "## Protocol smoke check")
    assert rows[0][:2] == ["chorus", "ok"]
    assert rows[1][:2] == ["peer", "failed"]
    assert "leave stops delivery" in rows[1][2]
    assert "protocol-smoke" not in markdown.split("## Load generator")[1]


def sweep_lines():
    lines = [smoke_line("chorus"), smoke_line("peer-a"), idle_line("chorus", 4.0), idle_line("peer-a", 12.0),
             idle_line("peer-b", 10.0)]
    for server, factor in (("chorus", 1.0), ("peer-a", 3.0), ("peer-b", 2.0)):
        for rate, p99 in ((100, 5.0), (250, 40.0), (500, 400.0), (2000, 3000.0)):
            p99 = p99 * factor
            lines.append(load_line(server, f"http-c1000-k10-r{rate}", cpu=factor * rate / 100, p50=p99 / 4, p99=p99,
                                   received=rate * 2000, scheduled=rate * 20, target_met=rate < 2000,
                                   sent=rate * 20 if rate < 2000 else rate * 5))
        lines.append(load_line(server, "fanout-c2000-k1-r10", cpu=factor, clients=2000, rooms=1))
    return lines


def test_svgs_are_well_formed_with_one_series_per_server(tmp_path):
    out_dir = run_report(tmp_path, sweep_lines())
    servers = {"chorus", "peer-a", "peer-b"}

    latency = ET.parse(out_dir / "latency-vs-rate-node-loadgen.svg").getroot()
    assert latency.tag == f"{SVG}svg"
    assert latency.find(f"{SVG}title").text.startswith("Broadcast latency")
    series = [g for g in latency.iter(f"{SVG}g") if g.get("class") == "series"]
    assert sorted((g.get("data-server"), g.get("data-percentile")) for g in series) == sorted(
        (server, percentile) for server in servers for percentile in ("p50", "p99"))
    for g in series:
        path = g.find(f"{SVG}path")
        dashed = path.get("stroke-dasharray") is not None
        assert dashed == (g.get("data-percentile") == "p50")
        markers = [child for child in g if child.tag != f"{SVG}path"]
        assert len(markers) == 4
        # The r500 and r2000 runs are not clean: hollow markers.
        assert sum(marker.get("fill") == "#ffffff" for marker in markers) >= 2
    colours = {g.get("data-server"): g.find(f"{SVG}path").get("stroke") for g in series}
    assert len(set(colours.values())) == 3
    texts = [text.text for text in latency.iter(f"{SVG}text")]
    assert "latency, ms (log scale)" in texts
    assert "chorus p99" in texts and "peer-b p50" in texts

    for name in ("cpu-per-delivery-node-loadgen.svg", "memory-per-connection.svg"):
        root = ET.parse(out_dir / name).getroot()
        bars = [g for g in root.iter(f"{SVG}g") if g.get("class") == "series"]
        assert sorted(g.get("data-server") for g in bars) == sorted(servers), name
        fills = {g.get("data-server"): g.find(f"{SVG}rect").get("fill") for g in bars}
        assert len(set(fills.values())) == 3, name
    cpu = ET.parse(out_dir / "cpu-per-delivery-node-loadgen.svg").getroot()
    chorus = next(g for g in cpu.iter(f"{SVG}g") if g.get("data-server") == "chorus")
    assert len(chorus.findall(f"{SVG}rect")) == 5  # four HTTP rates and the fan-out


def test_output_is_deterministic(tmp_path):
    lines = sweep_lines()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    # Same input file name in another directory, another output directory: the same bytes.
    first = run_report(tmp_path / "a", lines)
    second = run_report(tmp_path / "b", lines)
    names = sorted(path.name for path in first.iterdir())
    assert names == sorted(path.name for path in second.iterdir())
    assert "results.md" in names and len(names) == 4
    for name in names:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name


def test_command_line(tmp_path):
    source = write_jsonl(tmp_path / "in.jsonl", sweep_lines())
    out_dir = tmp_path / "docs"
    done = subprocess.run([sys.executable, str(SCRIPT), "--baseline", "chorus", "--title", "My title",
                           "--out-dir", str(out_dir), str(source)], capture_output=True, text=True, check=True)
    assert done.stdout.count("\n") == 1  # one paragraph
    assert "chorus / peer-a met 4 of 5 targets" in done.stdout
    assert (out_dir / "results.md").read_text(encoding="utf-8").startswith("# My title\n")

    done = subprocess.run([sys.executable, str(SCRIPT), "--baseline", "nope", "--out-dir", str(out_dir),
                           str(source)], capture_output=True, text=True)
    assert done.returncode == 2
    assert "baseline 'nope' not in the input" in done.stderr


def test_real_results_render(tmp_path):
    files = sorted((ROOT / "bench" / "results").glob("*.jsonl"))
    if not files:
        pytest.skip("no bench/results/*.jsonl")
    out_dir = tmp_path / "real"
    assert br.main(["--baseline", "chorus", "--out-dir", str(out_dir)] + [str(path) for path in files]) == 0
    assert (out_dir / "results.md").read_text(encoding="utf-8").startswith("# Benchmark comparison")
    for svg in out_dir.glob("*.svg"):
        ET.parse(svg)


def test_committed_report_is_current(tmp_path):
    # the arguments of scripts/generate.sh
    source = ROOT / "bench" / "results" / "2026-11-26-compare.jsonl"
    committed = ROOT / "docs" / "benchmarks"
    out_dir = tmp_path / "report"
    title = "chorus-server against Node Socket.IO and Sails, and before/after (2026-11-26)"
    assert br.main(["--baseline", "chorus", "--out-dir", str(out_dir), "--title", title, str(source)]) == 0
    fresh = sorted(p.name for p in out_dir.iterdir())
    assert fresh == sorted(p.name for p in committed.iterdir()), "run scripts/generate.sh"
    for name in fresh:
        assert (out_dir / name).read_bytes() == (committed / name).read_bytes(), (
            f"docs/benchmarks/{name} is stale: run scripts/generate.sh")


def test_significant_digits():
    assert br.sig(1 / 3) == "0.333"
    assert br.sig(0.9002) == "0.900"
    assert br.sig(2.4175) == "2.42"
    assert br.sig(0.0513) == "0.0513"
    assert br.sig(12_345) == "12,300"
    assert br.sig(0.99951) == "1.00"
    assert br.sig(None) == "—"
