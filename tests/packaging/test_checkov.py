"""checkov's Kubernetes checks over everything Chorus puts in a cluster: the chart with default
values and with the namespaced option set of test_packaging.py, manifests/install.yaml, and what
`chorus-operator render` makes of every manifests/examples/*.yaml (in a namespace `apps`, as a
user would apply them; the operator puts the children in the RealtimeApp's namespace).

Every finding must be in ALLOWED below, with the reason it stays (docs/security.md, "Static checks
of the manifests (checkov)"); a new finding fails, and so does an entry that no longer occurs.
checkov runs from its own pinned venv (scripts/venv.sh exports $CHORUS_CHECKOV); under CI=true a
missing checkov fails, elsewhere the module is skipped.
"""

import json
import os
import pathlib
import subprocess

import pytest
import yaml

import chorus_chart as chart
from test_packaging import NON_DEFAULT, OPERATOR, example_paths

ROOT = chart.ROOT
CHECKOV = os.environ.get("CHORUS_CHECKOV", "")
EXAMPLE_NAMESPACE = "apps"

# (check, reason, objects as "Kind/name"): each finding allowed to stay, and why. An object is
# the chart's (Deployment/chorus, in both option sets and in install.yaml) or one an example
# makes; a pod-level finding names the Deployment or StatefulSet whose pod template it is about.
_ALLOW = [
    ("CKV_K8S_43", "images are referenced by tag: the installer (image.tag, serverImage, "
     "redisImage) or the app's author (spec.image, spec.redis.image) chooses them and may give "
     "a digest; the defaults follow the chart's appVersion and a pinned Redis release",
     ["Deployment/chorus", "Deployment/chat", "StatefulSet/chat-redis", "Deployment/dev-chat",
      "StatefulSet/dev-chat-redis", "Deployment/notifications", "Deployment/live-scores",
      "StatefulSet/live-scores-redis", "Deployment/sails-app", "StatefulSet/sails-app-redis",
      "Deployment/node-chat", "StatefulSet/node-chat-redis"]),
    ("CKV_K8S_15", "imagePullPolicy is IfNotPresent (the chart's default, image.pullPolicy) or "
     "Kubernetes' default for a tagged image: tags are pinned, and Always makes every pod start "
     "depend on the registry",
     ["Deployment/chorus", "Deployment/chat", "StatefulSet/chat-redis", "Deployment/dev-chat",
      "StatefulSet/dev-chat-redis", "Deployment/notifications", "Deployment/live-scores",
      "StatefulSet/live-scores-redis", "Deployment/sails-app", "StatefulSet/sails-app-redis",
      "Deployment/node-chat", "StatefulSet/node-chat-redis"]),
    ("CKV_K8S_11", "no CPU limits: CFS throttling adds latency to the operator, the realtime "
     "servers and Redis; CPU requests are set, and memory limits where memory is bounded",
     ["Deployment/chorus", "Deployment/chat", "StatefulSet/chat-redis", "Deployment/dev-chat",
      "StatefulSet/dev-chat-redis", "Deployment/notifications", "Deployment/live-scores",
      "StatefulSet/live-scores-redis", "Deployment/sails-app", "StatefulSet/sails-app-redis",
      "Deployment/node-chat", "StatefulSet/node-chat-redis"]),
    ("CKV_K8S_13", "chorus-server gets no default memory limit: its memory grows with its "
     "connections (up to limits.maxConnections, 100000 by default), which only the user can "
     "size with spec.resources",
     ["Deployment/chat", "Deployment/dev-chat", "Deployment/notifications",
      "Deployment/live-scores"]),
    ("CKV_K8S_38", "the operator is a Kubernetes API client: it needs its service-account token "
     "(every pod it creates has automountServiceAccountToken: false)",
     ["Deployment/chorus"]),
    ("CKV_K8S_35", "the servers read their settings from the environment (chorus-server's "
     "JWT_SECRET, API_TOKEN, REDIS_URL; Sails' sails_sockets__pass; Socket.IO apps' REDIS_URL), "
     "and Redis gets its password through $(REDIS_PASSWORD) and REDISCLI_AUTH; the values never "
     "appear in the pod spec",
     ["Deployment/chat", "StatefulSet/chat-redis", "Deployment/dev-chat",
      "StatefulSet/dev-chat-redis", "Deployment/notifications", "Deployment/live-scores",
      "StatefulSet/live-scores-redis", "Deployment/sails-app", "StatefulSet/sails-app-redis",
      "Deployment/node-chat", "StatefulSet/node-chat-redis"]),
    ("CKV2_K8S_6", "the server pods take client traffic from wherever their Service is exposed "
     "(ingress controllers, load balancers, the app's backends), which the operator cannot know; "
     "their Redis has a NetworkPolicy admitting only them",
     ["Deployment/chat", "Deployment/dev-chat", "Deployment/notifications",
      "Deployment/live-scores", "Deployment/sails-app", "Deployment/node-chat"]),
    ("CKV_K8S_22", "Sails and Socket.IO apps are the user's images and commonly write to their "
     "own folders (Sails builds its assets into .tmp/ when it lifts): their root filesystem stays "
     "writable (chorus-server's and Redis's are read-only)",
     ["Deployment/sails-app", "Deployment/node-chat"]),
    ("CKV_K8S_40", "Sails and Socket.IO apps run as 1000, the node user of the official Node.js "
     "images, which owns the app's files in images built on them (chorus-server runs as 65532, "
     "Redis as 10999)",
     ["Deployment/sails-app", "Deployment/node-chat"]),
    ("CKV_K8S_8", "a Sails or Socket.IO app's health endpoint is unknown: it gets a TCP readiness "
     "probe, and the kubelet restarts a process that exits; a liveness probe could kill an app "
     "that is slow to lift",
     ["Deployment/sails-app", "Deployment/node-chat"]),
]
ALLOWED = {(check, obj): reason for check, reason, objs in _ALLOW for obj in objs}

# A pod checkov must flag, scanned with the rest: proves that the scan finds what it should.
CANARY = {
    "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "canary", "namespace": EXAMPLE_NAMESPACE},
    "spec": {"containers": [{"name": "c", "image": "busybox", "securityContext": {"privileged": True}}]},
}


def _checkov():
    if CHECKOV and os.access(CHECKOV, os.X_OK):
        return CHECKOV
    reason = f"checkov not found (CHORUS_CHECKOV={CHECKOV!r}): source scripts/venv.sh"
    if os.environ.get("CI") == "true":
        pytest.fail(f"cannot run under CI=true: {reason}")
    pytest.skip(reason)


def _render_example(path):
    app = yaml.safe_load(path.read_text())
    app["metadata"]["namespace"] = EXAMPLE_NAMESPACE
    env = {k: v for k, v in os.environ.items() if k not in ("CHORUS_SERVER_IMAGE", "CHORUS_REDIS_IMAGE")}
    out = subprocess.run([str(OPERATOR), "render", "-f", "-"], input=yaml.safe_dump(app),
                         capture_output=True, text=True, check=True, env=env)
    return out.stdout


def _documents(text):
    """(first line, last line, object) of each YAML document, lines numbered from 1 as checkov does."""
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line == "---" or line.startswith("--- ")]
    if not starts or starts[0] != 0:
        starts.insert(0, 0)
    out = []
    for n, start in enumerate(starts):
        end = starts[n + 1] if n + 1 < len(starts) else len(lines)
        doc = yaml.safe_load("\n".join(lines[start:end]))
        if doc:
            out.append((start + 1, end, doc))
    return out


@pytest.fixture(scope="module")
def scan(tmp_path_factory):
    checkov = _checkov()
    assert OPERATOR.exists(), f"{OPERATOR} not built (cargo build -p chorus-operator)"
    files = {
        "chart-default.yaml": yaml.safe_dump_all([d for _, d in chart.documents(chart.render())], sort_keys=False),
        "chart-namespaced.yaml": yaml.safe_dump_all(
            [d for _, d in chart.documents(chart.render(NON_DEFAULT))], sort_keys=False),
        "install.yaml": (ROOT / "manifests" / "install.yaml").read_text(),
        "canary.yaml": yaml.safe_dump(CANARY),
    }
    for path in example_paths():
        files[f"example-{path.name}"] = _render_example(path)
    where = tmp_path_factory.mktemp("checkov")
    docs = {}
    for name, text in files.items():
        (where / name).write_text(text)
        docs[name] = _documents(text)
    env = dict(os.environ, BC_SKIP_MAPPING="TRUE", CKV_SKIP_PACKAGE_UPDATE_CHECK="TRUE")
    # --skip-download: nothing is fetched (no guidelines, no policies from a platform).
    run = subprocess.run([checkov, "--framework", "kubernetes", "--directory", str(where), "--skip-download",
                          "--compact", "--output", "json"], capture_output=True, text=True, env=env, cwd=where)
    assert run.returncode in (0, 1), f"checkov exited {run.returncode}: {run.stderr[-2000:]}"
    reports = json.loads(run.stdout)
    reports = reports if isinstance(reports, list) else [reports]
    assert [r["check_type"] for r in reports] == ["kubernetes"], run.stdout[:500]
    report = reports[0]
    assert report["summary"]["parsing_errors"] == 0, report["results"].get("parsing_errors")

    def owner(result):
        """The file and the "Kind/name" of the object (for a pod, of its workload) a result is about."""
        name = result["file_path"].lstrip("/")
        first = result["file_line_range"][0]
        for start, end, doc in docs[name]:
            if start <= first <= end:
                kind = result["resource"].split(".")[0]
                assert kind in (doc["kind"], "Pod"), f"{name}:{first}: {result['resource']} is in a {doc['kind']}"
                return name, f"{doc['kind']}/{doc['metadata']['name']}"
        raise AssertionError(f"{name}:{first} is in no document ({result['resource']})")

    failed = [(r["check_id"], *owner(r), r["check_name"]) for r in report["results"]["failed_checks"]]
    passed = [(r["check_id"], *owner(r)) for r in report["results"]["passed_checks"]]
    return {"docs": docs, "failed": failed, "passed": passed, "version": report["summary"]["checkov_version"]}


def test_checkov_is_the_pinned_version(scan):
    pinned = next(line.split("==")[1] for line in (ROOT / "tests" / "packaging" / "requirements-checkov.txt")
                  .read_text().splitlines() if line.startswith("checkov=="))
    assert scan["version"] == pinned


def test_every_workload_was_scanned_and_the_canary_is_caught(scan):
    checked = {(f, obj) for _, f, obj in scan["passed"]} | {(f, obj) for _, f, obj, _ in scan["failed"]}
    for name, docs in scan["docs"].items():
        for _, _, doc in docs:
            if doc["kind"] in ("Deployment", "StatefulSet", "Pod"):
                assert (name, f"{doc['kind']}/{doc['metadata']['name']}") in checked, f"{name}: not scanned"
    canary = {check for check, f, _, _ in scan["failed"] if f == "canary.yaml"}
    assert "CKV_K8S_16" in canary, f"a privileged container was not flagged: {sorted(canary)}"


def test_every_finding_is_allowed_with_a_reason_and_every_allowance_still_occurs(scan):
    findings = [(check, f, obj, title) for check, f, obj, title in scan["failed"] if f != "canary.yaml"]
    new = sorted({f"{check} {obj} in {f}: {title}" for check, f, obj, title in findings
                  if (check, obj) not in ALLOWED})
    seen = {(check, obj) for check, _, obj, _ in findings}
    stale = sorted(f"{check} {obj}" for check, obj in ALLOWED if (check, obj) not in seen)
    assert not new and not stale, (
        "checkov findings differ from the allow-list in tests/packaging/test_checkov.py "
        "(fix the manifests, or add the finding with its reason there and to docs/security.md):\n"
        + "".join(f"  new: {line}\n" for line in new)
        + "".join(f"  allowed but no longer found (remove it): {line}\n" for line in stale))


def test_docs_list_the_same_findings_and_version():
    """docs/security.md's table of remaining findings names exactly the allowed checks."""
    text = (ROOT / "docs" / "security.md").read_text()
    section = text.split("## Static checks of the manifests (checkov)", 1)[1]
    remaining = section.split("### Findings that remain", 1)[1]
    documented = {row.split("|")[1].split()[0] for row in remaining.splitlines() if row.startswith("| CKV")}
    assert documented == {check for check, _, _ in _ALLOW}
    pinned = next(line.split("==")[1] for line in (ROOT / "tests" / "packaging" / "requirements-checkov.txt")
                  .read_text().splitlines() if line.startswith("checkov=="))
    assert f"checkov {pinned} " in section
