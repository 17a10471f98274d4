#!/usr/bin/env python3
"""Comparison tables and SVG plots from benchmark JSON lines.

Reads the JSONL files written by the benchmark sweep (one JSON object per line; fields described
in shared/bench/README.md, "What the numbers mean") and writes, into --out-dir:

  results.md                       tables per load generator: per scenario, ratios baseline/peer,
                                   maximum clean broadcast rate, targets, excluded lines
  latency-vs-rate-<loadgen>.svg    p50/p99 latency against offered deliveries/s (HTTP broadcast)
  cpu-per-delivery-<loadgen>.svg   servers' CPU µs per delivery, grouped bars per scenario
  memory-per-connection.svg        idle KiB per connection per server

and prints a one-paragraph summary. Python 3.11 standard library only; the output depends only on
the input lines (file base names, no timestamps), so committed copies can be checked for staleness.

    python3 scripts/bench-report.py --baseline chorus --out-dir docs/benchmarks FILE.jsonl ...
"""

import argparse
import json
import math
import os
import re
import statistics
import sys
from dataclasses import dataclass, field
from xml.sax.saxutils import escape

DEFAULT_LOADGEN = "node-loadgen"
DEFAULT_SERVER = "unknown"
SMOKE_SCENARIO = "protocol-smoke"
CLEAN_P99_LIMIT_MS = 100.0
TARGET_FRACTION = 1.0 / 3.0
TARGET_RATE_FACTOR = 3.0
# Ratios are compared with a little slack so that 1/3 computed in floating point counts as 1/3.
RATIO_SLACK = 1e-9

# Scenario kinds in report order; unknown kinds come after these, alphabetically.
KIND_ORDER = ["http", "socket", "fanout", "multiroom", "idle"]
KIND_LABELS = {
    "http": "HTTP broadcast",
    "socket": "socket publish (sender excluded)",
    "fanout": "HTTP broadcast to one large room",
    "multiroom": "HTTP broadcast to several rooms, clients in several rooms",
    "idle": "idle connections",
}

# Okabe-Ito colours (readable for colour-blind readers; yellow left out, it vanishes on white).
PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#999999"]
MARKERS = ["circle", "square", "triangle", "diamond", "triangle-down", "pentagon", "hexagon", "star"]


# --------------------------------------------------------------------------------------------
# Reading and classifying lines
# --------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One usable measurement line."""

    source: str  # "file.jsonl:LINE"
    server: str
    loadgen: str
    scenario: str
    mode: str
    round: int | None
    raw: dict
    figures: dict = field(default_factory=dict)


@dataclass
class Excluded:
    source: str
    server: str
    loadgen: str
    scenario: str
    reason: str


@dataclass
class SmokeResult:
    source: str
    server: str
    loadgen: str
    ok: bool
    checks: int
    failed_checks: list


@dataclass
class Dataset:
    runs: list
    excluded: list
    smoke: list
    inputs: list  # (base name, number of non-empty lines)
    servers_seen: set


def number(value):
    """The value as a float if it is a JSON number (not a boolean), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return float(value)


def ratio(numerator, denominator):
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def parse_scenario(name):
    """Split "http-c1000-k10-r500" into ("http", {"c": 1000, "k": 10, "r": 500}).

    Names of another shape give (name, {}).
    """
    parts = name.split("-")
    params = {}
    for part in parts[1:]:
        match = re.fullmatch(r"([a-z]+)(\d+)", part)
        if not match:
            return name, {}
        params[match.group(1)] = int(match.group(2))
    if not re.fullmatch(r"[a-z]+", parts[0]):
        return name, {}
    return parts[0], params


def scenario_sort_key(name):
    kind, params = parse_scenario(name)
    kind_rank = KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER)
    return (kind_rank, kind, sorted(params.items()), name)


def is_http_broadcast(name):
    kind, params = parse_scenario(name)
    return kind == "http" and {"c", "k", "r"} <= params.keys()


def http_group(name):
    """The HTTP-broadcast family of a scenario: every parameter except the rate, e.g. (("c", 1000), ("k", 10))."""
    _, params = parse_scenario(name)
    return tuple(sorted((key, value) for key, value in params.items() if key != "r"))


def group_label(group):
    return " ".join(f"{key}{value}" for key, value in group)


def load_figures(line):
    """Per-run figures of a load line, including the derived ones."""
    latency = line.get("latency_ms") if isinstance(line.get("latency_ms"), dict) else {}
    figures = {
        "sent": number(line.get("sent")),
        "scheduled": number(line.get("scheduled")),
        "expected_deliveries": number(line.get("expected_deliveries")),
        "received_deliveries": number(line.get("received_deliveries")),
        "deliveries_per_s": number(line.get("deliveries_per_s")),
        "lost": number(line.get("lost")),
        "duplicates": number(line.get("duplicates")),
        "unexpected": number(line.get("unexpected")),
        "p50_ms": number(latency.get("p50")),
        "p99_ms": number(latency.get("p99")),
        "servers_cpu_s": number(line.get("servers_cpu_s")),
        "loadgen_cpu_s": number(line.get("loadgen_cpu_s")),
        "servers_rss_peak_mb": number(line.get("servers_rss_peak_mb")),
        "rate_target": number(line.get("rate_target")),
    }
    figures["servers_sys_s"] = servers_sys_s(line)
    cpu, kernel = figures["servers_cpu_s"], figures["servers_sys_s"]
    figures["servers_user_s"] = None if cpu is None or kernel is None else cpu - kernel
    received = figures["received_deliveries"]
    for seconds, name in [("servers_cpu_s", "servers_us_per_delivery"), ("loadgen_cpu_s", "loadgen_us_per_delivery"),
                          ("servers_user_s", "servers_user_us_per_delivery"),
                          ("servers_sys_s", "servers_sys_us_per_delivery")]:
        per_delivery = ratio(figures[seconds], received)
        figures[name] = None if per_delivery is None else per_delivery * 1e6
    figures["offered_deliveries_per_s"] = offered_deliveries_per_s(line)
    return figures


def servers_sys_s(line):
    """Kernel (system) CPU seconds of the server processes, when every one reports `cpu_sys_s`."""
    processes = line.get("processes") if isinstance(line.get("processes"), list) else []
    servers = [p for p in processes if isinstance(p, dict) and p.get("kind") == "server"]
    values = [number(p.get("cpu_sys_s")) for p in servers]
    if not values or None in values:
        return None
    return sum(values)


def offered_deliveries_per_s(line):
    """Deliveries per second the scenario asks for: broadcasts/s × sockets that must get each one.

    Sockets per broadcast come from the run itself (expected_deliveries over the acknowledged
    broadcasts it was summed over, which is the same for every server); without acknowledged
    broadcasts, from clients / rooms × broadcast rooms.
    """
    rate = number(line.get("rate_target"))
    if rate is None:
        return None
    per_broadcast = ratio(number(line.get("expected_deliveries")), number(line.get("sent")))
    if per_broadcast is None:
        clients, rooms = number(line.get("clients")), number(line.get("rooms"))
        broadcast_rooms = number(line.get("broadcast_rooms")) or 1.0
        per_room = ratio(clients, rooms)
        per_broadcast = None if per_room is None else per_room * broadcast_rooms
    return None if per_broadcast is None else rate * per_broadcast


def idle_figures(line):
    return {
        "servers_kib_per_connection": number(line.get("servers_kib_per_connection")),
        "servers_total_kib_per_connection": number(line.get("servers_total_kib_per_connection")),
        "servers_rss_before_mb": number(line.get("servers_rss_before_mb")),
        "servers_rss_after_mb": number(line.get("servers_rss_after_mb")),
        "clients": number(line.get("clients")),
    }


def exclusion_reason(line):
    reasons = []
    error = line.get("error")
    if error not in (None, False, ""):
        text = error if isinstance(error, str) else json.dumps(error, sort_keys=True)
        reasons.append(f"error: {text}")
    if line.get("noisy_machine") is True:
        other = number(line.get("other_cpu_cores"))
        reasons.append("noisy machine" + (f" (other processes {other:g} cores)" if other is not None else ""))
    mode = line.get("mode")
    if not reasons and mode not in ("load", "idle-memory"):
        reasons.append(f"unknown mode {mode!r}")
    return "; ".join(reasons)


def read_dataset(paths):
    runs, excluded, smoke, inputs, servers_seen = [], [], [], [], set()
    for path in paths:
        base = os.path.basename(path)
        count = 0
        with open(path, encoding="utf-8") as handle:
            for number_, text in enumerate(handle, start=1):
                if not text.strip():
                    continue
                count += 1
                source = f"{base}:{number_}"
                try:
                    line = json.loads(text)
                except json.JSONDecodeError as err:
                    excluded.append(Excluded(source, "?", "?", "?", f"not JSON ({err.msg})"))
                    continue
                if not isinstance(line, dict):
                    excluded.append(Excluded(source, "?", "?", "?", "not a JSON object"))
                    continue
                server = str(line.get("server") or DEFAULT_SERVER)
                loadgen = str(line.get("loadgen") or DEFAULT_LOADGEN)
                scenario = str(line.get("scenario") or "?")
                servers_seen.add(server)
                if scenario == SMOKE_SCENARIO:
                    smoke.append(smoke_result(source, server, loadgen, line))
                    continue
                reason = exclusion_reason(line)
                if reason:
                    excluded.append(Excluded(source, server, loadgen, scenario, reason))
                    continue
                mode = line["mode"]
                round_ = line.get("round") if isinstance(line.get("round"), int) else None
                figures = load_figures(line) if mode == "load" else idle_figures(line)
                runs.append(Run(source, server, loadgen, scenario, mode, round_, line, figures))
        inputs.append((base, count))
    return Dataset(runs, excluded, smoke, inputs, servers_seen)


def smoke_result(source, server, loadgen, line):
    checks = line.get("checks") if isinstance(line.get("checks"), list) else []
    failed = [str(check.get("name", "?")) for check in checks if isinstance(check, dict) and not check.get("ok")]
    if line.get("error") not in (None, False, ""):
        failed.append(f"error: {line['error']}")
    return SmokeResult(source, server, loadgen, line.get("ok") is True and not failed, len(checks), failed)


# --------------------------------------------------------------------------------------------
# Aggregation of repeated runs
# --------------------------------------------------------------------------------------------


@dataclass
class Aggregate:
    """The runs of one (loadgen, server, scenario), each figure the median over the runs."""

    loadgen: str
    server: str
    scenario: str
    mode: str
    runs: list
    figures: dict
    target_met: bool | None
    bottleneck: str | None

    @property
    def clean_problems(self):
        return clean_problems(self.figures, self.target_met)

    @property
    def clean(self):
        return self.mode == "load" and not self.clean_problems


def median_or_none(values):
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def majority(values):
    """A yes/no figure over runs: yes when more than half of the runs say yes; None if none say."""
    present = [value for value in values if isinstance(value, bool)]
    if not present:
        return None
    return sum(present) * 2 > len(present)


def aggregate_runs(runs):
    groups = {}
    for run in runs:
        groups.setdefault((run.loadgen, run.server, run.scenario, run.mode), []).append(run)
    aggregates = {}
    for (loadgen, server, scenario, mode), members in groups.items():
        keys = sorted({key for run in members for key in run.figures})
        figures = {key: median_or_none([run.figures.get(key) for run in members]) for key in keys}
        target_met = majority([run.raw.get("target_met") for run in members])
        # The bottleneck text of the median run by deliveries/s (lower median for an even count).
        ordered = sorted(members, key=lambda run: (run.figures.get("deliveries_per_s") or 0.0, run.source))
        bottleneck = ordered[(len(ordered) - 1) // 2].raw.get("bottleneck")
        aggregates[(loadgen, server, scenario)] = Aggregate(
            loadgen, server, scenario, mode, members, figures, target_met,
            bottleneck if isinstance(bottleneck, str) else None)
    return aggregates


def clean_problems(figures, target_met):
    """Why a load run is not clean (empty list: clean).

    Clean: target met (when reported), nothing lost, duplicated or unexpected, everything
    scheduled was sent, p99 latency under 100 ms.
    """
    problems = []
    if target_met is False:
        problems.append("target missed")
    for key, label in (("lost", "lost"), ("duplicates", "duplicates"), ("unexpected", "unexpected")):
        value = figures.get(key)
        if value is None:
            problems.append(f"no {label} count")
        elif value != 0:
            problems.append(label)
    sent, scheduled = figures.get("sent"), figures.get("scheduled")
    if sent is None or scheduled is None or sent != scheduled:
        problems.append("sent < scheduled")
    p99 = figures.get("p99_ms")
    if p99 is None or not p99 < CLEAN_P99_LIMIT_MS:
        problems.append(f"p99 ≥ {CLEAN_P99_LIMIT_MS:g} ms")
    return problems


# --------------------------------------------------------------------------------------------
# Comparisons
# --------------------------------------------------------------------------------------------


@dataclass
class MaxClean:
    group: tuple
    rates: list  # [(rate, clean, aggregate)], ascending
    best: Aggregate | None  # the run at the highest clean rate

    @property
    def rate(self):
        return None if self.best is None else parse_scenario(self.best.scenario)[1]["r"]

    @property
    def at_highest_rate_tested(self):
        return self.best is not None and self.rate == self.rates[-1][0]


def aggregates_of(aggregates, loadgen, server=None, mode=None):
    return [agg for (lg, srv, _), agg in sorted(aggregates.items(), key=lambda item: item_sort_key(item[0]))
            if lg == loadgen and (server is None or srv == server) and (mode is None or agg.mode == mode)]


def item_sort_key(key):
    loadgen, server, scenario = key
    return (loadgen, scenario_sort_key(scenario), server)


def http_groups(aggregates, loadgen):
    return sorted({http_group(agg.scenario) for agg in aggregates_of(aggregates, loadgen, mode="load")
                   if is_http_broadcast(agg.scenario)})


def max_clean_rate(aggregates, loadgen, server, group):
    """The highest rate R of "http-c<C>-k<K>-r<R>" whose (aggregated) run is clean."""
    rates = []
    for agg in aggregates_of(aggregates, loadgen, server, "load"):
        if is_http_broadcast(agg.scenario) and http_group(agg.scenario) == group:
            rates.append((parse_scenario(agg.scenario)[1]["r"], agg.clean, agg))
    rates.sort(key=lambda item: item[0])
    clean = [agg for _, is_clean, agg in rates if is_clean]
    return MaxClean(group, rates, clean[-1] if clean else None)


def http_run_at_rate(aggregates, loadgen, server, group, rate):
    for agg in aggregates_of(aggregates, loadgen, server, "load"):
        if is_http_broadcast(agg.scenario) and http_group(agg.scenario) == group \
                and parse_scenario(agg.scenario)[1]["r"] == rate:
            return agg
    return None


def below_saturation(aggregates, loadgen, baseline, scenario):
    """Whether the baseline ran the scenario below saturation.

    HTTP broadcast: its rate is at most the baseline's maximum clean rate of the same family.
    Other scenarios: the baseline met the target.
    """
    agg = aggregates.get((loadgen, baseline, scenario))
    if agg is None or agg.mode != "load":
        return False
    if is_http_broadcast(scenario):
        best = max_clean_rate(aggregates, loadgen, baseline, http_group(scenario))
        return best.rate is not None and parse_scenario(scenario)[1]["r"] <= best.rate
    return agg.target_met is True


@dataclass
class LoadRatio:
    scenario: str
    below_saturation: bool
    baseline: Aggregate
    peer: Aggregate
    cpu: float | None
    p50: float | None
    p99: float | None


def load_ratios(aggregates, loadgen, baseline, peer):
    rows = []
    for agg in aggregates_of(aggregates, loadgen, baseline, "load"):
        other = aggregates.get((loadgen, peer, agg.scenario))
        if other is None or other.mode != "load":
            continue
        rows.append(LoadRatio(
            agg.scenario, below_saturation(aggregates, loadgen, baseline, agg.scenario), agg, other,
            ratio(agg.figures.get("servers_us_per_delivery"), other.figures.get("servers_us_per_delivery")),
            ratio(agg.figures.get("p50_ms"), other.figures.get("p50_ms")),
            ratio(agg.figures.get("p99_ms"), other.figures.get("p99_ms"))))
    return rows


@dataclass
class IdleRatio:
    scenario: str
    baseline: Aggregate
    peer: Aggregate
    kib_per_connection: float | None


def idle_ratios(aggregates, loadgen, baseline, peer):
    rows = []
    for agg in aggregates_of(aggregates, loadgen, baseline, "idle-memory"):
        other = aggregates.get((loadgen, peer, agg.scenario))
        if other is None or other.mode != "idle-memory":
            continue
        mine, theirs = agg.figures.get("servers_kib_per_connection"), other.figures.get("servers_kib_per_connection")
        value = ratio(mine, theirs) if theirs is not None and theirs > 0 and mine is not None and mine >= 0 else None
        rows.append(IdleRatio(agg.scenario, agg, other, value))
    return rows


@dataclass
class TargetRow:
    target: str
    measured: str
    result: str  # "met", "not met", "n/a", "inconclusive"
    value: float | None = None
    short: str = ""  # name in the summary paragraph


def at_most(value, limit):
    return value <= limit * (1 + RATIO_SLACK)


def at_least(value, limit):
    return value >= limit * (1 - RATIO_SLACK)


def evaluate_targets(aggregates, runs, loadgen, baseline, peer):
    """The performance targets of the baseline against one peer, as table rows."""
    rows = [cpu_target(load_ratios(aggregates, loadgen, baseline, peer))]
    several_groups = len(http_groups(aggregates, loadgen)) > 1
    for group in http_groups(aggregates, loadgen):
        mine = max_clean_rate(aggregates, loadgen, baseline, group)
        theirs = max_clean_rate(aggregates, loadgen, peer, group)
        if not mine.rates or not theirs.rates:
            continue
        suffix = f" (http {group_label(group)})" if several_groups else ""
        rows.append(with_short(max_rate_target(group, mine, theirs), f"max clean rate ratio{suffix} {{v}}"))
        rows.append(with_short(p99_target(aggregates, loadgen, baseline, peer, group, theirs),
                               f"p99 ratio at the peer's max clean rate{suffix} {{v}}"))
    idle_rows = idle_ratios(aggregates, loadgen, baseline, peer)
    for row in idle_rows:
        suffix = f" ({row.scenario})" if len(idle_rows) > 1 else ""
        rows.append(with_short(idle_target(row), f"idle RSS per connection ratio{suffix} {{v}}"))
    rows.append(with_short(zero_loss_target(aggregates, runs, loadgen, baseline),
                           "{v} baseline runs below saturation with lost, duplicate or unexpected deliveries"))
    return rows


def with_short(row, short):
    row.short = short
    return row


def cpu_target(ratios):
    target = "servers CPU per delivery ≤ 1/3 of the peer's (worst load scenario below saturation)"
    short = "CPU per delivery ratio {v} (worst below saturation)"
    usable = [row for row in ratios if row.below_saturation and row.cpu is not None]
    if not usable:
        return TargetRow(target, "n/a (no load scenario below saturation)", "n/a", short=short)
    worst = max(usable, key=lambda row: (row.cpu, row.scenario))
    middle = statistics.median(row.cpu for row in usable)
    measured = (f"worst {sig(worst.cpu)} ({worst.scenario}); median {sig(middle)} over "
                f"{len(usable)} scenario{'s' if len(usable) != 1 else ''}")
    return TargetRow(target, measured, met(at_most(worst.cpu, TARGET_FRACTION)), worst.cpu, short)


def max_rate_target(group, mine, theirs):
    target = f"max clean broadcast rate ≥ 3× the peer's (http {group_label(group)})"
    if mine.rate is None:
        return TargetRow(target, f"n/a (baseline never clean; peer {rate_text(theirs.rate)})", "not met", 0.0)
    if theirs.rate is None:
        return TargetRow(target, f"∞ (peer never clean; baseline {mine.rate:,}/s)", "met", math.inf)
    value = mine.rate / theirs.rate
    bound = "≥ " if mine.at_highest_rate_tested else ""
    measured = f"{bound}{sig(value)} ({mine.rate:,} vs {theirs.rate:,} broadcasts/s)"
    if at_least(value, TARGET_RATE_FACTOR):
        return TargetRow(target, measured, "met", value)
    if mine.at_highest_rate_tested:
        return TargetRow(target, measured + "; baseline clean at the highest rate tested", "inconclusive", value)
    return TargetRow(target, measured, "not met", value)


def p99_target(aggregates, loadgen, baseline, peer, group, theirs):
    target = f"p99 latency at the peer's max clean rate ≤ 1/3 of the peer's (http {group_label(group)})"
    if theirs.best is None:
        return TargetRow(target, "n/a (peer never clean)", "n/a")
    mine = http_run_at_rate(aggregates, loadgen, baseline, group, theirs.rate)
    if mine is None:
        return TargetRow(target, f"n/a (baseline did not run {theirs.best.scenario})", "n/a")
    value = ratio(mine.figures.get("p99_ms"), theirs.best.figures.get("p99_ms"))
    if value is None:
        return TargetRow(target, "n/a (no p99)", "n/a")
    measured = (f"{sig(value)} ({ms(mine.figures['p99_ms'])} vs {ms(theirs.best.figures['p99_ms'])} ms "
                f"at {theirs.rate:,}/s)")
    return TargetRow(target, measured, met(at_most(value, TARGET_FRACTION)), value)


def idle_target(row):
    target = f"idle RSS per connection ≤ 1/3 of the peer's ({row.scenario})"
    mine = row.baseline.figures.get("servers_kib_per_connection")
    theirs = row.peer.figures.get("servers_kib_per_connection")
    if row.kib_per_connection is None:
        return TargetRow(target, f"n/a ({sig(mine)} vs {sig(theirs)} KiB)", "n/a")
    measured = f"{sig(row.kib_per_connection)} ({sig(mine)} vs {sig(theirs)} KiB per connection)"
    return TargetRow(target, measured, met(at_most(row.kib_per_connection, TARGET_FRACTION)),
                     row.kib_per_connection)


def zero_loss_target(aggregates, runs, loadgen, baseline):
    target = "no lost, duplicate or unexpected delivery in any baseline run below saturation"
    checked = [run for run in runs
               if run.loadgen == loadgen and run.server == baseline and run.mode == "load"
               and below_saturation(aggregates, loadgen, baseline, run.scenario)]
    if not checked:
        return TargetRow(target, "n/a (no baseline run below saturation)", "n/a")
    bad = []
    for run in checked:
        counts = {key: run.figures.get(key) for key in ("lost", "duplicates", "unexpected")}
        problems = [f"{key} {'?' if value is None else f'{value:,.0f}'}"
                    for key, value in counts.items() if value is None or value != 0]
        if problems:
            bad.append(f"{run.scenario} {run_label(run)}: {', '.join(problems)}")
    scenarios = len({run.scenario for run in checked})
    measured = f"{len(bad)} of {len(checked)} runs ({scenarios} scenarios)"
    if bad:
        measured += ": " + "; ".join(bad)
    return TargetRow(target, measured, met(not bad), float(len(bad)))


def met(condition):
    return "met" if condition else "not met"


def run_label(run):
    return f"round {run.round}" if run.round is not None else run.source


# --------------------------------------------------------------------------------------------
# Number formatting
# --------------------------------------------------------------------------------------------


def sig(value, digits=3):
    """A number with `digits` significant digits, trailing zeros kept ("0.900"); thousands separated."""
    if value is None:
        return "—"
    if math.isinf(value):
        return "∞"
    if value == 0:
        return "0"
    decimals = digits - 1 - math.floor(math.log10(abs(value)))
    rounded = round(value, decimals)
    if rounded != 0:
        decimals = digits - 1 - math.floor(math.log10(abs(rounded)))
    if decimals > 0:
        return f"{rounded:.{decimals}f}"
    return f"{round(rounded, decimals):,.0f}"


def integer(value):
    return "—" if value is None else f"{value:,.0f}"


def ms(value):
    """Latency in ms: three significant digits below 1000, whole milliseconds above."""
    if value is None:
        return "—"
    return f"{value:,.0f}" if abs(value) >= 1000 else sig(value)


def one_decimal(value):
    return "—" if value is None else f"{value:,.1f}"


def rate_text(rate):
    return "never clean" if rate is None else f"{rate:,}/s"


def md_cell(text):
    return str(text).replace("|", "\\|").replace("\n", " ")


def md_table(header, rows, align=None):
    align = align or ["left"] * len(header)
    marks = {"left": "---", "right": "---:", "center": ":---:"}
    lines = ["| " + " | ".join(md_cell(cell) for cell in header) + " |",
             "| " + " | ".join(marks[a] for a in align) + " |"]
    lines += ["| " + " | ".join(md_cell(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Markdown report
# --------------------------------------------------------------------------------------------


@dataclass
class Report:
    title: str
    baseline: str
    peers: list
    loadgens: list
    dataset: Dataset
    aggregates: dict
    svg_files: list


def ordered_servers(servers, baseline):
    return ([baseline] if baseline in servers else []) + sorted(server for server in servers if server != baseline)


def build_report(dataset, baseline, title):
    aggregates = aggregate_runs(dataset.runs)
    loadgens = sorted({run.loadgen for run in dataset.runs}
                      | {ex.loadgen for ex in dataset.excluded if ex.loadgen != "?"})
    servers = {run.server for run in dataset.runs}
    peers = [server for server in ordered_servers(servers, baseline) if server != baseline]
    title = title or f"Benchmark comparison: {baseline} against {', '.join(peers) or 'no peer'}"
    svg_files = ([f"latency-vs-rate-{slug(lg)}.svg" for lg in loadgens]
                 + [f"cpu-per-delivery-{slug(lg)}.svg" for lg in loadgens] + ["memory-per-connection.svg"])
    return Report(title, baseline, peers, loadgens, dataset, aggregates, svg_files)


def slug(text):
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def scenario_description(report, loadgen, scenario):
    kind, params = parse_scenario(scenario)
    parts = [KIND_LABELS.get(kind, kind)]
    if "c" in params:
        parts.append(f"{params['c']:,} clients")
    if "k" in params:
        parts.append(f"{params['k']:,} room{'s' if params['k'] != 1 else ''}")
    if "r" in params:
        parts.append(f"{params['r']:,} broadcasts/s")
    offered = median_or_none([agg.figures.get("offered_deliveries_per_s")
                              for (lg, _, sc), agg in report.aggregates.items() if lg == loadgen and sc == scenario])
    if offered is not None:
        parts.append(f"offered {offered:,.0f} deliveries/s")
    return ", ".join(parts)


def render_markdown(report):
    out = [f"# {report.title}", ""]
    inputs = ", ".join(f"`{name}` ({count} lines)" for name, count in report.dataset.inputs)
    out += [f"Generated by `scripts/bench-report.py` from {inputs}.", ""]
    out += [f"Baseline: **{report.baseline}**; peers: {', '.join(report.peers) or 'none'}. "
            "Ratios are baseline / peer: below 1 the baseline uses less CPU or memory, or has lower "
            "latency; for the maximum clean rate, above 1 the baseline sustains more.", ""]
    out += [
        "How to read the tables:",
        "",
        "- *deliveries/s*: first-copy deliveries per second; *offered*: broadcasts/s asked for × sockets "
        "that must receive each broadcast.",
        "- *servers µs/delivery*: `servers_cpu_s / received_deliveries × 1e6` (all replicas together); "
        "*loadgen µs/delivery* the same for the load generator.",
        "- *clean* run: `target_met` (when reported), nothing lost, duplicated or unexpected, "
        f"`sent == scheduled` and p99 latency < {CLEAN_P99_LIMIT_MS:g} ms. The *maximum clean rate* is the "
        "highest broadcast rate R of the `http-c<C>-k<K>-r<R>` scenarios (same C and K) whose run is clean; "
        "it is only as fine as the rates in the sweep.",
        "- *below saturation*: an HTTP-broadcast scenario whose rate is at most the baseline's maximum clean "
        "rate; any other scenario whose baseline run met its target.",
        "- Repeated runs of the same (server, load generator, scenario) are combined: every figure is the "
        "median over the runs (*runs* column), a yes/no figure is yes when more than half of the runs say yes, "
        "and the bottleneck shown is that of the run with the median deliveries/s.",
        "- Lines with an `error` or `noisy_machine: true` are not used; they are listed under *Excluded lines*.",
        "",
    ]
    out += render_smoke(report)
    for loadgen in report.loadgens:
        out += render_loadgen(report, loadgen)
    unreadable = [ex for ex in report.dataset.excluded if ex.loadgen == "?"]
    if unreadable:
        out += ["## Unreadable lines", ""]
        out += [md_table(["line", "reason"], [[ex.source, ex.reason] for ex in unreadable]), ""]
    out += ["## Plots", ""]
    out += [f"![{name}]({name})" for name in report.svg_files]
    out += [""]
    return "\n".join(out)


def render_smoke(report):
    out = ["## Protocol smoke check", ""]
    if not report.dataset.smoke:
        return out + ["No `protocol-smoke` line.", ""]
    rows = []
    by_server = {}
    for result in report.dataset.smoke:
        by_server.setdefault(result.server, []).append(result)
    for server in ordered_servers(by_server.keys(), report.baseline):
        results = by_server[server]
        passed = sum(result.ok for result in results)
        failed = sorted({name for result in results for name in result.failed_checks})
        checks = max(result.checks for result in results)
        verdict = "ok" if passed == len(results) else "failed"
        detail = f"{passed} of {len(results)} run{'s' if len(results) != 1 else ''} passed, {checks} checks"
        if failed:
            detail += "; failed: " + "; ".join(failed)
        rows.append([server, verdict, detail])
    return out + [md_table(["server", "result", "detail"], rows), ""]


def render_loadgen(report, loadgen):
    out = [f"## Load generator: {loadgen}", ""]
    out += render_scenario_tables(report, loadgen)
    out += render_idle_table(report, loadgen)
    for peer in report.peers:
        out += render_ratio_tables(report, loadgen, peer)
    out += render_max_clean(report, loadgen)
    for peer in report.peers:
        out += render_targets(report, loadgen, peer)
    out += render_excluded(report, loadgen)
    return out


def render_scenario_tables(report, loadgen):
    out = ["### Load scenarios", ""]
    scenarios = sorted({agg.scenario for agg in aggregates_of(report.aggregates, loadgen, mode="load")},
                       key=scenario_sort_key)
    if not scenarios:
        return out + ["No usable load line.", ""]
    header = ["server", "runs", "sent / scheduled", "deliveries/s", "lost", "duplicates", "unexpected",
              "p50 ms", "p99 ms", "servers µs/delivery", "loadgen µs/delivery", "servers peak RSS MB",
              "clean", "bottleneck"]
    align = ["left", "right", "right", "right", "right", "right", "right", "right", "right", "right",
             "right", "right", "left", "left"]
    for scenario in scenarios:
        rows = []
        present = {srv for (lg, srv, sc) in report.aggregates if lg == loadgen and sc == scenario}
        for server in ordered_servers(present, report.baseline):
            agg = report.aggregates[(loadgen, server, scenario)]
            if agg.mode != "load":
                continue
            f = agg.figures
            problems = agg.clean_problems
            rows.append([
                server, len(agg.runs), f"{integer(f.get('sent'))} / {integer(f.get('scheduled'))}",
                integer(f.get("deliveries_per_s")), integer(f.get("lost")), integer(f.get("duplicates")),
                integer(f.get("unexpected")), ms(f.get("p50_ms")), ms(f.get("p99_ms")),
                sig(f.get("servers_us_per_delivery")), sig(f.get("loadgen_us_per_delivery")),
                one_decimal(f.get("servers_rss_peak_mb")),
                "yes" if not problems else "no: " + ", ".join(problems), agg.bottleneck or "—"])
        out += [f"#### {scenario}", "", scenario_description(report, loadgen, scenario), ""]
        out += [md_table(header, rows, align), ""]
    return out


def render_idle_table(report, loadgen):
    idle = aggregates_of(report.aggregates, loadgen, mode="idle-memory")
    if not idle:
        return ["### Idle memory", "", "No usable idle-memory line.", ""]
    rows = []
    for scenario in sorted({agg.scenario for agg in idle}, key=scenario_sort_key):
        present = {agg.server for agg in idle if agg.scenario == scenario}
        for server in ordered_servers(present, report.baseline):
            f = report.aggregates[(loadgen, server, scenario)].figures
            rows.append([scenario, server, len(report.aggregates[(loadgen, server, scenario)].runs),
                         sig(f.get("servers_kib_per_connection")), sig(f.get("servers_total_kib_per_connection")),
                         one_decimal(f.get("servers_rss_before_mb")), one_decimal(f.get("servers_rss_after_mb"))])
    header = ["scenario", "server", "runs", "KiB per added connection", "total KiB per connection",
              "servers RSS before MB", "servers RSS after MB"]
    return ["### Idle memory", "",
            "Replicas' RSS growth per added connection after a full GC (`servers_kib_per_connection`), and "
            "their whole RSS over all clients.", "",
            md_table(header, rows, ["left", "left", "right", "right", "right", "right", "right"]), ""]


def render_ratio_tables(report, loadgen, peer):
    base = report.baseline
    out = [f"### Ratios {base} / {peer}", ""]
    rows = []
    for row in load_ratios(report.aggregates, loadgen, base, peer):
        rows.append([row.scenario, "yes" if row.below_saturation else "no",
                     sig(row.baseline.figures.get("servers_us_per_delivery")),
                     sig(row.peer.figures.get("servers_us_per_delivery")), sig(row.cpu),
                     f"{ms(row.baseline.figures.get('p50_ms'))} / {ms(row.peer.figures.get('p50_ms'))}", sig(row.p50),
                     f"{ms(row.baseline.figures.get('p99_ms'))} / {ms(row.peer.figures.get('p99_ms'))}", sig(row.p99)])
    if rows:
        header = ["scenario", "below saturation", f"{base} µs/delivery", f"{peer} µs/delivery", "CPU ratio",
                  "p50 ms", "p50 ratio", "p99 ms", "p99 ratio"]
        out += ["Servers' CPU seconds per delivery and latency at the same offered rate (same scenario).", "",
                md_table(header, rows, ["left", "left"] + ["right"] * 7), ""]
    else:
        out += ["No load scenario run by both.", ""]
    out += render_cpu_split(report, loadgen, peer)
    idle_rows = [[row.scenario, sig(row.baseline.figures.get("servers_kib_per_connection")),
                  sig(row.peer.figures.get("servers_kib_per_connection")), sig(row.kib_per_connection)]
                 for row in idle_ratios(report.aggregates, loadgen, base, peer)]
    if idle_rows:
        out += [md_table(["idle scenario", f"{base} KiB/connection", f"{peer} KiB/connection", "ratio"],
                         idle_rows, ["left", "right", "right", "right"]), ""]
    return out


def render_cpu_split(report, loadgen, peer):
    """User and kernel CPU per delivery: what a server's own code costs, and the kernel's floor.

    The *kernel floor* is the baseline's kernel time per delivery over the peer's whole CPU per
    delivery: however little its own code cost, the baseline's CPU ratio could not go below it
    without fewer or cheaper system calls per delivery.
    """
    base = report.baseline
    rows, floors = [], []
    for row in load_ratios(report.aggregates, loadgen, base, peer):
        mine, theirs = row.baseline.figures, row.peer.figures
        if mine.get("servers_sys_us_per_delivery") is None or theirs.get("servers_sys_us_per_delivery") is None:
            continue
        user = ratio(mine.get("servers_user_us_per_delivery"), theirs.get("servers_user_us_per_delivery"))
        floor = ratio(mine.get("servers_sys_us_per_delivery"), theirs.get("servers_us_per_delivery"))
        if row.below_saturation and floor is not None:
            floors.append(floor)
        rows.append([row.scenario, "yes" if row.below_saturation else "no",
                     f"{sig(mine.get('servers_user_us_per_delivery'))} / {sig(mine.get('servers_sys_us_per_delivery'))}",
                     f"{sig(theirs.get('servers_user_us_per_delivery'))} / {sig(theirs.get('servers_sys_us_per_delivery'))}",
                     sig(user), sig(floor)])
    if not rows:
        return []
    out = [f"User and kernel CPU per delivery (µs, from each server process's `cpu_sys_s`). *Kernel floor*: "
           f"{base}'s kernel µs per delivery over {peer}'s whole CPU µs per delivery, the lowest CPU ratio "
           f"{base} could reach with its own code free and the same system calls.", "",
           md_table(["scenario", "below saturation", f"{base} user / kernel", f"{peer} user / kernel",
                     "user ratio", "kernel floor"], rows, ["left", "left"] + ["right"] * 4), ""]
    if floors:
        above = sum(1 for floor in floors if floor > TARGET_FRACTION * (1 + RATIO_SLACK))
        out += [f"Below saturation the kernel floor is above {sig(TARGET_FRACTION)} in {above} of "
                f"{len(floors)} scenarios (median {sig(statistics.median(floors))}).", ""]
    return out


def render_max_clean(report, loadgen):
    out = ["### Maximum clean broadcast rate", ""]
    groups = http_groups(report.aggregates, loadgen)
    if not groups:
        return out + ["No HTTP-broadcast scenario.", ""]
    servers = ordered_servers({agg.server for agg in aggregates_of(report.aggregates, loadgen, mode="load")},
                              report.baseline)
    rows = []
    for group in groups:
        for server in servers:
            best = max_clean_rate(report.aggregates, loadgen, server, group)
            if not best.rates:
                continue
            tested = " ".join(f"{rate:,}{'✓' if clean else '✗'}" for rate, clean, _ in best.rates)
            if best.best is None:
                rows.append([f"http {group_label(group)}", server, "none", "—", "—", tested])
            else:
                f = best.best.figures
                rows.append([f"http {group_label(group)}", server, f"{best.rate:,}",
                             integer(f.get("deliveries_per_s")), ms(f.get("p99_ms")), tested])
    out += ["Rates tested: ✓ clean, ✗ not clean.", ""]
    out += [md_table(["family", "server", "max clean broadcasts/s", "deliveries/s there", "p99 ms there",
                      "rates tested"], rows, ["left", "left", "right", "right", "right", "left"]), ""]
    ratio_rows = []
    for peer in report.peers:
        for group in groups:
            mine = max_clean_rate(report.aggregates, loadgen, report.baseline, group)
            theirs = max_clean_rate(report.aggregates, loadgen, peer, group)
            if not mine.rates or not theirs.rates:
                continue
            rate_ratio = "—"
            if mine.rate is not None and theirs.rate is not None:
                rate_ratio = ("≥ " if mine.at_highest_rate_tested else "") + sig(mine.rate / theirs.rate)
            elif mine.rate is not None:
                rate_ratio = "∞"
            p99_mine = p99_theirs = p99_ratio = "—"
            if theirs.best is not None:
                at_rate = http_run_at_rate(report.aggregates, loadgen, report.baseline, group, theirs.rate)
                p99_theirs = ms(theirs.best.figures.get("p99_ms"))
                if at_rate is not None:
                    p99_mine = ms(at_rate.figures.get("p99_ms"))
                    p99_ratio = sig(ratio(at_rate.figures.get("p99_ms"), theirs.best.figures.get("p99_ms")))
            ratio_rows.append([peer, f"http {group_label(group)}", rate_text(mine.rate), rate_text(theirs.rate),
                               rate_ratio, p99_mine, p99_theirs, p99_ratio])
    if ratio_rows:
        base = report.baseline
        out += [md_table(["peer", "family", f"{base} max clean", "peer max clean", "ratio",
                          f"{base} p99 ms at peer's max", "peer p99 ms there", "p99 ratio"],
                         ratio_rows, ["left", "left", "right", "right", "right", "right", "right", "right"]), ""]
        if any(row[4].startswith("≥") for row in ratio_rows):
            out += ["\"≥\": the baseline was clean at the highest rate tested, so its real maximum may be "
                    "higher.", ""]
    return out


def render_targets(report, loadgen, peer):
    rows = evaluate_targets(report.aggregates, report.dataset.runs, loadgen, report.baseline, peer)
    table = md_table(["target", "measured (baseline / peer)", "result"],
                     [[row.target, row.measured, row.result] for row in rows], ["left", "left", "left"])
    return [f"### Targets: {report.baseline} against {peer}", "", table, ""]


def render_excluded(report, loadgen):
    excluded = [ex for ex in report.dataset.excluded if ex.loadgen == loadgen]
    out = ["### Excluded lines", ""]
    if not excluded:
        return out + ["None.", ""]
    rows = [[ex.source, ex.server, ex.scenario, shorten(ex.reason, 160)] for ex in excluded]
    return out + [md_table(["line", "server", "scenario", "reason"], rows), ""]


def shorten(text, limit):
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------------------------
# SVG plots
# --------------------------------------------------------------------------------------------


@dataclass
class Style:
    colour: str
    marker: str


def server_styles(servers, baseline):
    """Colour and marker shape per server, the same in every plot (baseline first)."""
    styles = {}
    for index, server in enumerate(ordered_servers(servers, baseline)):
        styles[server] = Style(PALETTE[index % len(PALETTE)], MARKERS[(index + index // len(MARKERS)) % len(MARKERS)])
    return styles


def c(value):
    """A coordinate, formatted the same way everywhere (byte-identical output)."""
    text = f"{value:.1f}"
    return "0.0" if text == "-0.0" else text


def attr(value):
    return escape(str(value), {'"': "&quot;"})


def svg_text(x, y, text, size=12, anchor="start", weight=None, rotate=None, colour="#222"):
    extra = f' font-weight="{weight}"' if weight else ""
    if rotate is not None:
        extra += f' transform="rotate({rotate} {c(x)} {c(y)})"'
    return (f'<text x="{c(x)}" y="{c(y)}" font-size="{size}" text-anchor="{anchor}" fill="{colour}"{extra}>'
            f"{escape(text)}</text>")


def svg_line(x1, y1, x2, y2, **attributes):
    """<line>; keyword attributes with "_" for "-" (stroke_width → stroke-width)."""
    extra = "".join(f' {key.replace("_", "-")}="{attr(value)}"' for key, value in attributes.items())
    return f'<line x1="{c(x1)}" y1="{c(y1)}" x2="{c(x2)}" y2="{c(y2)}"{extra}/>'


def marker_svg(shape, x, y, colour, filled=True, size=4.5):
    fill = colour if filled else "#ffffff"
    common = f'fill="{fill}" stroke="{colour}" stroke-width="1.6"'
    if shape == "circle":
        return f'<circle cx="{c(x)}" cy="{c(y)}" r="{c(size)}" {common}/>'
    if shape == "square":
        side = size * 1.7
        return f'<rect x="{c(x - side / 2)}" y="{c(y - side / 2)}" width="{c(side)}" height="{c(side)}" {common}/>'
    points = marker_points(shape, x, y, size)
    return f'<polygon points="{" ".join(f"{c(px)},{c(py)}" for px, py in points)}" {common}/>'


def marker_points(shape, x, y, size):
    def regular(count, radius, start_deg):
        return [(x + radius * math.cos(math.radians(start_deg + 360 * i / count)),
                 y + radius * math.sin(math.radians(start_deg + 360 * i / count))) for i in range(count)]

    if shape == "triangle":
        return regular(3, size * 1.3, -90)
    if shape == "triangle-down":
        return regular(3, size * 1.3, 90)
    if shape == "diamond":
        return regular(4, size * 1.35, -90)
    if shape == "pentagon":
        return regular(5, size * 1.15, -90)
    if shape == "hexagon":
        return regular(6, size * 1.1, 0)
    if shape == "star":
        outer = regular(5, size * 1.45, -90)
        inner = regular(5, size * 0.6, -54)
        return [point for pair in zip(outer, inner) for point in pair]
    return regular(4, size, 45)


def svg_document(width, height, title, body):
    head = [
        '<?xml version="1.0" encoding="UTF-8"?>',
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif">',
        f"<title>{escape(title)}</title>",
        f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
        svg_text(width / 2, 26, title, size=16, anchor="middle", weight="bold"),
    ]
    return "\n".join(head + body + ["</svg>", ""])


@dataclass
class Axis:
    """Maps data values to pixels along one direction, linear or log10."""

    low: float
    high: float
    start: float  # pixel of `low`
    end: float  # pixel of `high`
    log: bool = False
    pad: float = 0.0  # pixels kept free at both ends, so that markers at the bounds stay inside

    def __call__(self, value):
        if self.log:
            low, high, value = math.log10(self.low), math.log10(self.high), math.log10(value)
        else:
            low, high = self.low, self.high
        direction = 1 if self.end >= self.start else -1
        start, end = self.start + direction * self.pad, self.end - direction * self.pad
        if high == low:
            return (start + end) / 2
        return start + (value - low) / (high - low) * (end - start)


def log_range(values, steps=(1,)):
    """Bounds around positive values on a log axis: powers of ten, or with steps=(1, 2, 5) the
    nearest 1-2-5 values."""
    positive = [value for value in values if value is not None and value > 0]
    if not positive:
        return 1.0, 10.0
    smallest, largest = min(positive), max(positive)
    exponent = math.floor(math.log10(smallest))
    low = max(step * 10.0 ** exponent for step in steps if step * 10.0 ** exponent <= smallest * (1 + 1e-9))
    exponent = math.floor(math.log10(largest))
    candidates = [step * 10.0 ** e for e in (exponent, exponent + 1) for step in steps]
    high = min(value for value in candidates if value >= largest * (1 - 1e-9))
    if high <= low:
        high = low * 10
    return low, high


def log_ticks(low, high):
    """(major labelled ticks, minor ticks) for a log axis; 2 and 5 labelled when it spans ≤ 2 decades."""
    decades = round(math.log10(high / low))
    labelled_steps = (1, 2, 5) if decades <= 2 else (1,)
    major, minor = [], []
    exponent = round(math.log10(low))
    while 10 ** exponent <= high * (1 + 1e-9):
        for step in range(1, 10):
            value = step * 10.0 ** exponent
            if value < low * (1 - 1e-9) or value > high * (1 + 1e-9):
                continue
            (major if step in labelled_steps else minor).append(value)
        exponent += 1
    return major, minor


def nice_step(span, count=5):
    raw = span / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw)) if raw > 0 else 1.0
    for factor in (1, 2, 2.5, 5, 10):
        if raw <= factor * magnitude:
            return factor * magnitude
    return 10 * magnitude


def linear_ticks(low, high, count=5):
    """About `count` evenly spaced round ticks covering [low, high]."""
    step = nice_step(high - low, count)
    first = math.floor(low / step + 1e-9)
    last = math.ceil(high / step - 1e-9)
    return [round(index * step, 10) for index in range(first, last + 1)], step


def short_number(value):
    """10000 → "10k", 2500000 → "2.5M", 0.5 → "0.5"."""
    for divisor, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(value) >= divisor:
            return f"{value / divisor:g}{suffix}"
    return f"{value:g}"


def plain_number(value):
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:g}"


def plot_frame(x_axis, y_axis, x_major, x_minor, y_major, y_minor, x_format, y_format, x_label, y_label):
    """Grid, axes, ticks and axis labels."""
    left, right = x_axis.start, x_axis.end
    bottom, top = y_axis.start, y_axis.end
    parts = ['<g class="grid" stroke-width="1">']
    for values, colour in ((y_minor, "#f0f0f0"), (y_major, "#d9d9d9")):
        parts += [svg_line(left, y_axis(value), right, y_axis(value), stroke=colour) for value in values]
    for values, colour in ((x_minor, "#f0f0f0"), (x_major, "#d9d9d9")):
        parts += [svg_line(x_axis(value), top, x_axis(value), bottom, stroke=colour) for value in values]
    parts.append("</g>")
    parts.append('<g class="axes" stroke="#333" stroke-width="1.2">')
    parts.append(svg_line(left, bottom, right, bottom))
    parts.append(svg_line(left, bottom, left, top))
    parts += [svg_line(x_axis(value), bottom, x_axis(value), bottom + 6) for value in x_major]
    parts += [svg_line(left - 6, y_axis(value), left, y_axis(value)) for value in y_major]
    parts.append("</g>")
    for value in x_major:
        parts.append(svg_text(x_axis(value), bottom + 20, x_format(value), size=11, anchor="middle"))
    for value in y_major:
        parts.append(svg_text(left - 9, y_axis(value) + 4, y_format(value), size=11, anchor="end"))
    parts.append(svg_text((left + right) / 2, bottom + 42, x_label, size=13, anchor="middle"))
    parts.append(svg_text(left - 58, (top + bottom) / 2, y_label, size=13, anchor="middle", rotate=-90))
    return parts


def no_data(width, height, message):
    return [svg_text(width / 2, height / 2, message, size=14, anchor="middle", colour="#666")]


@dataclass
class LatencySeries:
    server: str
    percentile: str  # "p50" | "p99"
    group: tuple
    points: list  # [(offered deliveries/s, latency ms, clean)]


def latency_series(report, loadgen):
    groups = http_groups(report.aggregates, loadgen)
    series = []
    servers = ordered_servers({agg.server for agg in aggregates_of(report.aggregates, loadgen, mode="load")},
                              report.baseline)
    for server in servers:
        for group in groups:
            runs = [agg for agg in aggregates_of(report.aggregates, loadgen, server, "load")
                    if is_http_broadcast(agg.scenario) and http_group(agg.scenario) == group]
            for percentile in ("p99", "p50"):
                points = sorted((agg.figures.get("offered_deliveries_per_s"), agg.figures.get(f"{percentile}_ms"),
                                 agg.clean) for agg in runs)
                points = [(x, y, clean) for x, y, clean in points if x and y and x > 0 and y > 0]
                if points:
                    series.append(LatencySeries(server, percentile, group, points))
    return series


def svg_latency_vs_rate(report, loadgen, styles):
    width, height = 940, 540
    title = f"Broadcast latency against offered load, HTTP broadcast ({loadgen})"
    series = latency_series(report, loadgen)
    if not series:
        return svg_document(width, height, title, no_data(width, height, "no HTTP-broadcast runs"))
    several_groups = len({item.group for item in series}) > 1
    x_low, x_high = log_range([x for item in series for x, _, _ in item.points], steps=(1, 2, 5))
    y_low, y_high = log_range([y for item in series for _, y, _ in item.points] + [CLEAN_P99_LIMIT_MS])
    x_axis = Axis(x_low, x_high, 80, 690, log=True, pad=14)
    y_axis = Axis(y_low, y_high, height - 70, 50, log=True)
    x_major, x_minor = log_ticks(x_low, x_high)
    y_major, y_minor = log_ticks(y_low, y_high)
    body = plot_frame(x_axis, y_axis, x_major, x_minor, y_major, y_minor, short_number, plain_number,
                      "offered deliveries per second (log scale)", "latency, ms (log scale)")
    limit_y = y_axis(CLEAN_P99_LIMIT_MS)
    body.append(f'<line class="limit" x1="{c(x_axis.start)}" y1="{c(limit_y)}" x2="{c(x_axis.end)}" '
                f'y2="{c(limit_y)}" stroke="#b00020" stroke-width="1" stroke-dasharray="2,3"/>')
    body.append(svg_text(x_axis.end - 4, limit_y - 5, f"p99 limit of a clean run ({CLEAN_P99_LIMIT_MS:g} ms)",
                         size=10, anchor="end", colour="#b00020"))
    legend = []
    legend_y = 60
    for item in series:
        style = styles[item.server]
        dash = ' stroke-dasharray="7,4"' if item.percentile == "p50" else ""
        path = " ".join(f"{'M' if i == 0 else 'L'}{c(x_axis(x))},{c(y_axis(y))}"
                        for i, (x, y, _) in enumerate(item.points))
        label = f"{item.server} {item.percentile}" + (f" ({group_label(item.group)})" if several_groups else "")
        body.append(f'<g class="series" data-server="{attr(item.server)}" data-percentile="{item.percentile}">')
        body.append(f'<path d="{path}" fill="none" stroke="{style.colour}" stroke-width="2"{dash}/>')
        for x, y, clean in item.points:
            body.append(marker_svg(style.marker, x_axis(x), y_axis(y), style.colour, filled=clean))
        body.append("</g>")
        legend.append(f'<line x1="712" y1="{c(legend_y)}" x2="748" y2="{c(legend_y)}" stroke="{style.colour}" '
                      f'stroke-width="2"{dash}/>')
        legend.append(marker_svg(style.marker, 730, legend_y, style.colour))
        legend.append(svg_text(756, legend_y + 4, label, size=12))
        legend_y += 22
    legend_y += 8
    grey = "#555555"
    legend.append(marker_svg("circle", 730, legend_y, grey, filled=True))
    legend.append(svg_text(756, legend_y + 4, "clean run", size=11))
    legend.append(marker_svg("circle", 730, legend_y + 20, grey, filled=False))
    legend.append(svg_text(756, legend_y + 24, "not clean (hollow)", size=11))
    legend.append(svg_line(712, legend_y + 42, 748, legend_y + 42, stroke=grey, stroke_width=2))
    legend.append(svg_text(756, legend_y + 46, "p99 (solid)", size=11))
    legend.append(svg_line(712, legend_y + 62, 748, legend_y + 62, stroke=grey, stroke_width=2,
                           stroke_dasharray="7,4"))
    legend.append(svg_text(756, legend_y + 66, "p50 (dashed)", size=11))
    body.append('<g class="legend">')
    body += legend
    body.append("</g>")
    return svg_document(width, height, title, body)


def svg_grouped_bars(title, groups, servers, styles, values, y_label, value_format, empty_message):
    """Grouped bars: `groups` along x, one bar per server; values[(group, server)] → number or None."""
    bar_width = 24
    group_width = max(70, max(len(servers), 1) * bar_width + 26)
    plot_left = 80
    plot_width = max(300, len(groups) * group_width)
    legend_x = plot_left + plot_width + 25
    width = legend_x + 170
    label_chars = max(6, int(group_width / 6.4))
    label_lines = {group: wrap_label(group, label_chars) for group in groups}
    plot_bottom = 330
    height = plot_bottom + 30 + 14 * max((len(lines) for lines in label_lines.values()), default=1)
    if not groups or not any(value is not None for value in values.values()):
        return svg_document(width, height, title, no_data(width, height, empty_message))
    present = [value for value in values.values() if value is not None]
    low, high = min(0.0, min(present)), max(0.0, max(present))
    if high == low:
        high = low + 1
    ticks, step = linear_ticks(low, high * 1.08, 5)
    y_axis = Axis(ticks[0], ticks[-1], plot_bottom, 50)
    x_axis = Axis(0, 1, plot_left, plot_left + plot_width)
    body = plot_frame(x_axis, y_axis, [], [], ticks, [], lambda v: "", lambda v: plain_number(v),
                      "", y_label)
    zero = y_axis(0.0)
    for index, group in enumerate(groups):
        centre = plot_left + (index + 0.5) * (plot_width / len(groups))
        body.append(svg_line(centre, plot_bottom, centre, plot_bottom + 5, stroke="#333"))
        for line_index, line in enumerate(label_lines[group]):
            body.append(svg_text(centre, plot_bottom + 20 + 14 * line_index, line, size=11, anchor="middle"))
    for position, server in enumerate(servers):
        style = styles[server]
        body.append(f'<g class="series" data-server="{attr(server)}">')
        for index, group in enumerate(groups):
            value = values.get((group, server))
            if value is None:
                continue
            centre = plot_left + (index + 0.5) * (plot_width / len(groups))
            x = centre - len(servers) * bar_width / 2 + position * bar_width
            top = y_axis(value)
            y, bar_height = min(top, zero), abs(zero - top)
            body.append(f'<rect x="{c(x + 1)}" y="{c(y)}" width="{c(bar_width - 2)}" height="{c(bar_height)}" '
                        f'fill="{style.colour}" fill-opacity="0.85"/>')
            body.append(marker_svg(style.marker, x + bar_width / 2, top, style.colour, filled=False, size=3.5))
            label_y = top - 8 if value >= 0 else top + 16
            body.append(svg_text(x + bar_width / 2, label_y, value_format(value), size=9, anchor="middle"))
        body.append("</g>")
    body.append('<g class="legend">')
    for position, server in enumerate(servers):
        y = 62 + position * 22
        style = styles[server]
        body.append(f'<rect x="{c(legend_x)}" y="{c(y - 8)}" width="22" height="16" fill="{style.colour}" '
                    'fill-opacity="0.85"/>')
        body.append(marker_svg(style.marker, legend_x + 11, y, style.colour, filled=False, size=3.5))
        body.append(svg_text(legend_x + 30, y + 4, server, size=12))
    body.append("</g>")
    return svg_document(width, height, title, body)


def wrap_label(text, width):
    """Split a name like "multiroom-c1000-k10-r100" after hyphens (or spaces) into lines of at most
    `width` characters where possible."""
    tokens = re.findall(r"[^-\s]+-?\s*", text) or [text]
    lines = [""]
    for token in tokens:
        if lines[-1] and len(lines[-1]) + len(token.rstrip()) > width:
            lines.append("")
        lines[-1] += token
    return [line.strip() for line in lines]


def svg_cpu_per_delivery(report, loadgen, styles):
    loads = aggregates_of(report.aggregates, loadgen, mode="load")
    groups = sorted({agg.scenario for agg in loads}, key=scenario_sort_key)
    servers = ordered_servers({agg.server for agg in loads}, report.baseline)
    values = {(agg.scenario, agg.server): agg.figures.get("servers_us_per_delivery") for agg in loads}
    return svg_grouped_bars(f"Servers' CPU per delivery ({loadgen})", groups, servers, styles, values,
                            "servers' CPU µs per delivery (all replicas)", sig, "no load runs")


def svg_memory_per_connection(report, styles):
    idle = [agg for agg in report.aggregates.values() if agg.mode == "idle-memory"]
    scenarios = {agg.scenario for agg in idle}
    def label(agg):
        return agg.loadgen if len(scenarios) == 1 else f"{agg.loadgen} {agg.scenario}"
    groups = sorted({label(agg) for agg in idle})
    servers = ordered_servers({agg.server for agg in idle}, report.baseline)
    values = {(label(agg), agg.server): agg.figures.get("servers_kib_per_connection") for agg in idle}
    title = "Idle memory per connection" + (f" ({next(iter(scenarios))})" if len(scenarios) == 1 else "")
    return svg_grouped_bars(title, groups, servers, styles, values,
                            "KiB per added connection (after GC)", sig, "no idle-memory runs")


def render_svgs(report):
    """{file name: SVG text}."""
    servers = {run.server for run in report.dataset.runs}
    styles = server_styles(servers, report.baseline)
    files = {}
    for loadgen in report.loadgens:
        files[f"latency-vs-rate-{slug(loadgen)}.svg"] = svg_latency_vs_rate(report, loadgen, styles)
        files[f"cpu-per-delivery-{slug(loadgen)}.svg"] = svg_cpu_per_delivery(report, loadgen, styles)
    files["memory-per-connection.svg"] = svg_memory_per_connection(report, styles)
    return files


# --------------------------------------------------------------------------------------------
# Summary and entry point
# --------------------------------------------------------------------------------------------


def summary_paragraph(report, out_dir):
    used = len(report.dataset.runs)
    excluded = len(report.dataset.excluded)
    parts = [f"Compared {report.baseline} against {', '.join(report.peers) or 'no peer'} "
             f"from {used} usable line{'s' if used != 1 else ''} ({excluded} excluded, "
             f"{len(report.dataset.smoke)} smoke)."]
    smoke_failed = sorted({result.server for result in report.dataset.smoke if not result.ok})
    if smoke_failed:
        parts.append(f"Protocol smoke check failed for {', '.join(smoke_failed)}.")
    for loadgen in report.loadgens:
        for peer in report.peers:
            rows = evaluate_targets(report.aggregates, report.dataset.runs, loadgen, report.baseline, peer)
            met_count = sum(row.result == "met" for row in rows)
            details = "; ".join(f"{row.short.replace('{v}', summary_value(row))}: {row.result}" for row in rows)
            parts.append(f"With {loadgen}, {report.baseline} / {peer} met {met_count} of {len(rows)} targets: "
                         f"{details}.")
    parts.append(f"Wrote results.md and {len(report.svg_files)} SVG plots to {out_dir}.")
    return " ".join(parts)


def summary_value(row):
    if row.value is None:
        return "n/a"
    if row.short.startswith("{v} baseline runs"):
        return f"{row.value:.0f}"
    return sig(row.value)


def write_outputs(report, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    files = {"results.md": render_markdown(report)}
    files.update(render_svgs(report))
    for name, text in files.items():
        with open(os.path.join(out_dir, name), "w", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
    return sorted(files)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Comparison tables (results.md) and SVG plots from benchmark JSON lines.")
    parser.add_argument("files", nargs="+", metavar="FILE.jsonl", help="benchmark result lines")
    parser.add_argument("--baseline", required=True,
                        help="server whose ratios are reported against every other server (the peers)")
    parser.add_argument("--out-dir", required=True, help="directory for results.md and the SVG files")
    parser.add_argument("--title", help="title of results.md")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        dataset = read_dataset(args.files)
    except OSError as err:
        print(f"bench-report: {err}", file=sys.stderr)
        return 2
    if args.baseline not in dataset.servers_seen:
        seen = ", ".join(sorted(dataset.servers_seen)) or "none"
        print(f"bench-report: baseline {args.baseline!r} not in the input (servers: {seen})", file=sys.stderr)
        return 2
    report = build_report(dataset, args.baseline, args.title)
    write_outputs(report, args.out_dir)
    print(summary_paragraph(report, args.out_dir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
