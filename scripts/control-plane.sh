#!/usr/bin/env bash
# A real Kubernetes control plane on 127.0.0.1 for the project's tests: etcd, kube-apiserver,
# kube-controller-manager, kube-scheduler and kwok (fake nodes whose pods turn Ready without
# containers), plus kubectl and helm, all built with `go build` from the Go modules pinned in
# tools/k8s/*/go.mod. See docs/control-plane.md.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: scripts/control-plane.sh COMMAND [ARGS]

  build               build the missing binaries into the cache (see below); a no-op when cached
  start [--dir DIR] [--audit-policy FILE]
                      build if needed, start etcd, kube-apiserver, kube-controller-manager,
                      kube-scheduler, kwok and metrics-server on free 127.0.0.1 ports, create
                      the fake nodes,
                      wait until all is ready, then print shell exports on stdout:
                        eval "$(scripts/control-plane.sh start)"
                      DIR (default: a new mktemp dir) holds certificates, kubeconfigs, logs, pids;
                      with an audit policy, the apiserver writes its audit log to DIR/audit.log
  stop [DIR]          stop every process started in DIR (default $CHORUS_K8S_DIR): TERM, then
                      KILL after 10 s; then remove DIR
  env [DIR]           print the exports of a started DIR again (default $CHORUS_K8S_DIR)
  status [DIR]        one line per component: running or not
  smoke               start a cluster in a new dir, check what the tests rely on (nodes Ready,
                      Deployment, scale, StatefulSet, EndpointSlices, HPA, metrics and an HPA
                      scaling on them, garbage collection, TokenRequest and RBAC, helm), stop
                      it; exit 1 if a check failed
  clean               remove cached builds other than the current one
  -h, --help          this text

environment:
  CHORUS_K8S_CACHE          cache root (default ${XDG_CACHE_HOME:-$HOME/.cache}/chorus-k8s);
                            binaries in <root>/modules/<module>-<hash>/bin (build logs beside,
                            in logs/), linked together in <root>/<key>/bin; the hashes cover
                            tools/k8s/<module>, the build flags and the Go version
  CHORUS_K8S_NODES          number of fake nodes (default 3, 110 pods / 32 CPU / 128Gi each)
  CHORUS_K8S_START_TIMEOUT  seconds allowed to each readiness wait (default 120)
  CHORUS_K8S_POD_CIDR       range kwok takes the fake pod IPs from (default 10.244.0.0/16; no
                            packet ever goes there: never dial a pod IP or a ClusterIP; a range
                            in 127.0.0.0/8 makes pod IPs dialable on loopback, but then
                            EndpointSlices refuse them and Services have no endpoints)
  CHORUS_K8S_METRICS        1 (default): run metrics-server too, behind the APIService
                            v1beta1.metrics.k8s.io, so `kubectl top` and CPU/memory HPAs work on
                            kwok's fake usage; 0: no metrics-server
  CHORUS_K8S_GOCACHE        Go compile cache for the builds (default <root>/go-build, removed
                            after a complete build unless CHORUS_K8S_KEEP_GOCACHE=1; a
                            CHORUS_K8S_GOCACHE given is never removed)
EOF
}

say() { printf 'control-plane: %s\n' "$*" >&2; }
die() { say "$*"; exit 1; }

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
TOOLS=$ROOT/tools/k8s
# Bump when the way binaries are built changes beyond what pkg_of and ldflags_of print.
BUILD_REV=1
K8S_VERSION=v1.37.2
# One Go module dir per upstream under tools/k8s, each built and cached on its own.
MODULES=(etcd kubernetes kwok helm metrics-server)

components_of() {
  case $1 in
    kubernetes) echo kube-apiserver kube-controller-manager kube-scheduler kubectl ;;
    *) echo "$1" ;;
  esac
}

# component -> "module-dir package"
pkg_of() {
  case $1 in
    etcd) echo "etcd ./cmd/etcd" ;;
    kube-apiserver | kube-controller-manager | kube-scheduler | kubectl)
      echo "kubernetes k8s.io/kubernetes/cmd/$1" ;;
    kwok) echo "kwok sigs.k8s.io/kwok/cmd/kwok" ;;
    helm) echo "helm helm.sh/helm/v4/cmd/helm" ;;
    metrics-server) echo "metrics-server sigs.k8s.io/metrics-server/cmd/metrics-server" ;;
    *) return 1 ;;
  esac
}

ldflags_of() {
  local f="-s -w" p
  case $1 in
    kube-apiserver | kube-controller-manager | kube-scheduler | kubectl)
      # What hack/lib/version.sh stamps in a release build, so /version and
      # `kubectl version` say v1.37.2 instead of v0.0.0-master.
      for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
        f+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=37"
        f+=" -X $p.gitTreeState=clean -X $p.buildDate=2026-10-27T12:01:04Z"
      done ;;
    helm) f+=" -X helm.sh/helm/v4/internal/version.version=v4.3.2" ;;
    metrics-server) # as its Makefile does
      f+=" -X k8s.io/client-go/pkg/version.gitVersion=v0.8.0 -X k8s.io/client-go/pkg/version.gitMajor=0"
      f+=" -X k8s.io/client-go/pkg/version.gitMinor=8" ;;
  esac
  echo "$f"
}

# Cache layout under CACHE_ROOT:
#   modules/<module>-<modkey>/{bin,logs}  one module's binaries, modkey = hash of its go.mod,
#                                         go.sum and .go files, `go version`, and what
#                                         pkg_of/ldflags_of say for its components
#   <key>/bin                             hard links to all modules' binaries (the PATH dir),
#   <key>/share/kwok-stages.yaml          key = hash of the modkeys and of kwok_stages
# so a change to one module rebuilds that module only.
cache_paths() {
  command -v go >/dev/null || die "go is not on PATH (Go 1.26 is needed to build the control plane)"
  local gov m c k all=""
  gov=$(go version)
  CACHE_ROOT=${CHORUS_K8S_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/chorus-k8s}
  declare -gA MODDIR=()
  for m in "${MODULES[@]}"; do
    k=$(
      cd "$TOOLS/$m" &&
        { echo "rev=$BUILD_REV $gov"
          for c in $(components_of "$m"); do echo "$c|$(pkg_of "$c")|$(ldflags_of "$c")"; done
          find . -type f \( -name go.mod -o -name go.sum -o -name '*.go' \) -print0 | sort -z |
            xargs -0 sha256sum; } | sha256sum | cut -c1-16
    )
    MODDIR[$m]=$CACHE_ROOT/modules/$m-$k
    all+="$m=$k "
  done
  k=$({ echo "$all"; declare -f kwok_stages; } | sha256sum | cut -c1-16)
  CACHE=$CACHE_ROOT/$k
  BIN=$CACHE/bin
  SHARE=$CACHE/share
}

built() {
  local m c
  for m in "${MODULES[@]}"; do
    for c in $(components_of "$m"); do [[ -x $BIN/$c ]] || return 1; done
  done
  [[ -s $SHARE/kwok-stages.yaml ]]
}

# The kwok controller takes its Stage, Metric and ResourceUsage definitions from a config
# file: kwok's own defaults (what kwokctl uses: fast node init, heartbeat with lease, fast pod
# ready/complete/delete), the kubelet-like /metrics/resource that metrics-server scrapes, and
# per-pod usage from the annotations kwok.x-k8s.io/usage-cpu and usage-memory, all taken
# from the pinned module.
kwok_stages() {
  local log=$CACHE/kwok-stages.log dir f
  if ! dir=$(cd "$TOOLS/kwok" && go list -mod=readonly -m -f '{{.Dir}}' sigs.k8s.io/kwok 2>"$log") ||
    [[ -z $dir ]]; then
    die "build of kwok-stages failed; log: $log"
  fi
  {
    for f in stage/node/fast/node-initialize.yaml \
      stage/node/heartbeat-with-lease/node-heartbeat-with-lease.yaml \
      stage/pod/fast/pod-ready.yaml stage/pod/fast/pod-complete.yaml stage/pod/fast/pod-delete.yaml \
      metrics/resource/metrics-resource.yaml metrics/usage/usage-from-annotation.yaml; do
      echo "---"
      cat "$dir/kustomize/$f"
    done
  } >"$SHARE/.kwok-stages.yaml.tmp" 2>>"$log" || die "build of kwok-stages failed; log: $log"
  mv "$SHARE/.kwok-stages.yaml.tmp" "$SHARE/kwok-stages.yaml"
}

do_build() {
  cache_paths
  built && return 0
  mkdir -p "$CACHE_ROOT"
  exec 8>"$CACHE_ROOT/.lock"
  flock 8 # one build at a time per cache root
  built && { exec 8>&-; return 0; }
  # A compile cache of its own (not the user's), so it can be dropped after the build.
  export GOCACHE=${CHORUS_K8S_GOCACHE:-$CACHE_ROOT/go-build}
  export GOFLAGS="${GOFLAGS:-} -buildvcs=false"
  local m c mod pkg log rc d
  mkdir -p "$BIN" "$SHARE"
  for m in "${MODULES[@]}"; do
    d=${MODDIR[$m]}
    mkdir -p "$d/bin" "$d/logs"
    for c in $(components_of "$m"); do
      if [[ ! -x $d/bin/$c ]]; then
        read -r mod pkg < <(pkg_of "$c")
        log=$d/logs/$c.log
        say "building $c (log: $log)"
        rc=0
        {
          echo "GOCACHE=$GOCACHE: go build $pkg in $TOOLS/$mod"
          TIMEFORMAT="go build of $c: %R s wall, %U s user, %S s sys"
          time (
            cd "$TOOLS/$mod" &&
              nice -n 10 go build -mod=readonly -trimpath -ldflags="$(ldflags_of "$c")" \
                -o "$d/bin/.$c.tmp" "$pkg"
          )
        } >"$log" 2>&1 || rc=$?
        if ((rc != 0)); then
          rm -f "$d/bin/.$c.tmp"
          die "build of $c failed (go build exit $rc); log: $log"
        fi
        mv "$d/bin/.$c.tmp" "$d/bin/$c"
      fi
      ln -f "$d/bin/$c" "$BIN/$c" 2>/dev/null || cp -f "$d/bin/$c" "$BIN/$c"
    done
  done
  [[ -s $SHARE/kwok-stages.yaml ]] || kwok_stages
  # The compile cache of these builds is 5-6 GB and only serves a rebuild of the same
  # versions, which the binaries already are: drop it unless asked to keep it.
  if [[ -z ${CHORUS_K8S_GOCACHE:-} && ${CHORUS_K8S_KEEP_GOCACHE:-0} != 1 ]]; then
    go clean -cache >/dev/null 2>&1 || true
    rm -rf -- "$GOCACHE"
  fi
  exec 8>&-
}

do_clean() { # everything but the current key and its modules
  cache_paths
  local d keep m
  for d in "$CACHE_ROOT"/* "$CACHE_ROOT"/modules/*; do
    [[ -e $d || -L $d ]] || continue
    [[ $d == "$CACHE" || $d == "$CACHE_ROOT/modules" ]] && continue
    keep=0
    for m in "${MODULES[@]}"; do [[ $d == "${MODDIR[$m]}" ]] && keep=1; done
    ((keep)) && continue
    say "removing $d"
    rm -rf -- "$d"
  done
}

# ---------------------------------------------------------------------------------------------
# State dir layout: .chorus-k8s (marker), pki/, *.kubeconfig, logs/<component>.log,
# pids/<n>-<component> ("pid starttime"), env (the exports), etcd-data/, kwok.yaml, nodes.yaml.

STOP_ORDER=(metrics-server kwok kube-scheduler kube-controller-manager kube-apiserver etcd)

start_time_of() { # field 22 of /proc/PID/stat; tells a reused pid from ours
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  # shellcheck disable=SC2086
  set -- $stat
  echo "${20}"
}

alive() { # pid starttime: our process, still running (a zombie counts as gone)
  local st state
  st=$(start_time_of "$1") || return 1
  [[ $st == "$2" ]] || return 1
  state=$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p' "/proc/$1/status" 2>/dev/null) || return 1
  [[ $state != Z ]]
}

free_port() { # a free 127.0.0.1 TCP port below the ephemeral range, not yet handed out
  local p hex i
  for ((i = 0; i < 200; i++)); do
    p=$((20000 + RANDOM % 12000))
    [[ " ${USED_PORTS:-} " == *" $p "* ]] && continue
    printf -v hex ':%04X ' "$p"
    if ! grep -qi "$hex" /proc/net/tcp /proc/net/tcp6 2>/dev/null; then
      USED_PORTS="${USED_PORTS:-} $p"
      echo "$p"
      return 0
    fi
  done
  die "no free port found on 127.0.0.1"
}

# Launch NAME: stdin from /dev/null and output to its log, so `$(start)` does not wait on it.
launch() {
  local name=$1
  shift
  "$@" </dev/null >"$DIR/logs/$name.log" 2>&1 &
  local pid=$! st
  disown "$pid" # no job report from this shell when a stop kills it
  st=$(start_time_of "$pid") || st=gone
  echo "$pid $st" >"$DIR/pids/$name"
  PIDS[$name]="$pid $st"
}

tail_log() {
  local f=$DIR/logs/$1.log
  [[ -f $f ]] || return 0
  say "last lines of $f:"
  tail -n 25 "$f" | sed 's/^/    /' >&2
}

START_OK=0
fail_start() { # component message
  say "$1 did not come up: $2"
  tail_log "$1"
  say "stopping what was started; state and logs kept in $DIR"
  stop_pids
  exit 1
}

check_alive() {
  local name=$1
  # shellcheck disable=SC2086
  alive ${PIDS[$name]} || fail_start "$name" "the process exited"
}

# wait_for COMPONENT WHAT COMMAND...: poll COMMAND every 0.2 s until it succeeds, fail after the
# timeout, or at once if the component's process is gone.
wait_for() {
  local name=$1 what=$2 deadline=$((SECONDS + TIMEOUT))
  shift 2
  until "$@" >/dev/null 2>&1; do
    check_alive "$name"
    ((SECONDS < deadline)) || fail_start "$name" "no $what after ${TIMEOUT} s"
    sleep 0.2
  done
  local us=$((${EPOCHREALTIME/./} - START_US))
  printf '%d.%01d s: %s: %s\n' $((us / 1000000)) $((us % 1000000 / 100000)) "$name" "$what" \
    >>"$DIR/logs/start.log"
}

stop_pids() { # uses $DIR/pids
  local name pid st f deadline left killed=0
  local -a pending=()
  [[ -d $DIR/pids ]] || return 0
  for name in "${STOP_ORDER[@]}"; do
    f=$DIR/pids/$name
    [[ -f $f ]] || continue
    read -r pid st <"$f" || continue
    if [[ $st != gone ]] && alive "$pid" "$st"; then
      kill -TERM "$pid" 2>/dev/null || true
      pending+=("$pid:$st:$name")
    fi
    rm -f "$f"
  done
  ((${#pending[@]})) || return 0
  deadline=$((SECONDS + 10))
  while :; do
    left=()
    for f in "${pending[@]}"; do
      IFS=: read -r pid st name <<<"$f"
      alive "$pid" "$st" && left+=("$f")
    done
    ((${#left[@]})) || return 0
    if ((SECONDS >= deadline)); then
      if ((killed)); then
        for f in "${left[@]}"; do say "${f##*:} (pid ${f%%:*}) is still there after KILL"; done
        return 1
      fi
      for f in "${left[@]}"; do
        IFS=: read -r pid st name <<<"$f"
        say "$name (pid $pid) ignored TERM for 10 s: KILL"
        alive "$pid" "$st" && kill -KILL "$pid" 2>/dev/null || true
      done
      killed=1
      deadline=$((SECONDS + 10))
    fi
    pending=("${left[@]}")
    sleep 0.1
  done
}

b64() { base64 -w0 <"$1"; }

kubeconfig() { # file user cert key
  cat >"$1" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: chorus
  cluster:
    server: $APISERVER
    certificate-authority-data: $(b64 "$PKI/ca.crt")
users:
- name: $2
  user:
    client-certificate-data: $(b64 "$3")
    client-key-data: $(b64 "$4")
contexts:
- name: chorus
  context:
    cluster: chorus
    user: $2
current-context: chorus
EOF
  chmod 600 "$1"
}

make_pki() {
  local o=$PKI
  mkdir -p "$o"
  (
    set -e
    cd "$o"
    key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }
    ca() { # name cn
      key "$1.key"
      openssl req -x509 -new -key "$1.key" -subj "/CN=$2" -days 3650 -out "$1.crt" \
        -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign"
    }
    cert() { # name ca subject extendedKeyUsage [subjectAltName]
      key "$1.key"
      openssl req -new -key "$1.key" -subj "$3" -out "$1.csr"
      {
        echo "basicConstraints=critical,CA:FALSE"
        echo "keyUsage=critical,digitalSignature,keyEncipherment"
        echo "extendedKeyUsage=$4"
        [[ -z ${5:-} ]] || echo "subjectAltName=$5"
      } >"$1.ext"
      openssl x509 -req -in "$1.csr" -CA "$2.crt" -CAkey "$2.key" -CAcreateserial -days 3650 \
        -extfile "$1.ext" -out "$1.crt" 2>/dev/null
      rm -f "$1.csr" "$1.ext"
    }
    ca ca chorus-k8s-ca
    ca front-proxy-ca chorus-k8s-front-proxy-ca
    cert apiserver ca "/CN=kube-apiserver" serverAuth \
      "IP:127.0.0.1,DNS:localhost,IP:10.96.0.1,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local"
    cert admin ca "/O=system:masters/CN=chorus-admin" clientAuth
    cert apiserver-kubelet-client ca "/O=system:masters/CN=kube-apiserver-kubelet-client" clientAuth
    cert controller-manager ca "/CN=system:kube-controller-manager" clientAuth
    cert scheduler ca "/CN=system:kube-scheduler" clientAuth
    cert kwok ca "/O=system:masters/CN=kwok-controller" clientAuth,serverAuth "IP:127.0.0.1,DNS:localhost"
    cert front-proxy-client front-proxy-ca "/CN=front-proxy-client" clientAuth
    cert metrics-server ca "/O=system:masters/CN=metrics-server" clientAuth,serverAuth \
      "DNS:metrics-server.kube-system.svc,DNS:localhost,IP:127.0.0.1"
    openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:2048 -out sa.key 2>/dev/null
    openssl pkey -in sa.key -pubout -out sa.pub
    chmod 600 ./*.key
  ) >"$DIR/logs/pki.log" 2>&1 &
  # waited for, not tested with ||, so that set -e holds inside the subshell
  wait $! || { say "making certificates with openssl failed"; tail_log pki; exit 1; }
}

print_env() {
  q() { printf '%q' "$1"; }
  echo "export KUBECONFIG=$(q "$DIR/admin.kubeconfig")"
  echo "export PATH=$(q "$BIN"):\"\$PATH\""
  echo "export CHORUS_K8S_DIR=$(q "$DIR")"
  echo "export CHORUS_K8S_BIN=$(q "$BIN")"
  echo "export CHORUS_K8S_APISERVER=$(q "$APISERVER")"
  echo "export CHORUS_K8S_CA_FILE=$(q "$PKI/ca.crt")"
  echo "export CHORUS_K8S_ADMIN_CERT=$(q "$PKI/admin.crt")"
  echo "export CHORUS_K8S_ADMIN_KEY=$(q "$PKI/admin.key")"
  echo "export CHORUS_K8S_ETCD=$(q "$ETCD_URL")"
  echo "export CHORUS_K8S_NODE_NAMES=$(q "$NODE_NAMES")"
  echo "export CHORUS_K8S_SA_ISSUER=$(q "$SA_ISSUER")"
  echo "export CHORUS_K8S_POD_CIDR=$(q "$POD_CIDR")"
  echo "export CHORUS_K8S_SERVICE_CIDR=10.96.0.0/16"
  echo "export CHORUS_K8S_METRICS=$(q "$METRICS")"
}

nodes_yaml() {
  local i n
  for ((i = 0; i < NODES; i++)); do
    n=kwok-node-$i
    NODE_NAMES+="${NODE_NAMES:+ }$n"
    cat <<EOF
---
apiVersion: v1
kind: Node
metadata:
  name: $n
  annotations:
    kwok.x-k8s.io/node: fake
    node.alpha.kubernetes.io/ttl: "0"
    metrics.k8s.io/resource-metrics-path: /metrics/nodes/$n/metrics/resource
  labels:
    type: kwok
    kubernetes.io/arch: amd64
    kubernetes.io/os: linux
    kubernetes.io/hostname: $n
    topology.kubernetes.io/zone: zone-$((i % 3))
    node-role.kubernetes.io/agent: ""
status:
  allocatable: {cpu: "32", memory: 128Gi, pods: "110", ephemeral-storage: 100Gi}
  capacity: {cpu: "32", memory: 128Gi, pods: "110", ephemeral-storage: 100Gi}
  nodeInfo:
    architecture: amd64
    operatingSystem: linux
    kubeletVersion: $K8S_VERSION
    kubeProxyVersion: $K8S_VERSION
    containerRuntimeVersion: kwok-fake
    kernelVersion: kwok-fake
    osImage: kwok fake node
    bootID: ""
    machineID: ""
    systemUUID: ""
EOF
  done
}

kc() { "$BIN/kubectl" --kubeconfig "$DIR/admin.kubeconfig" --request-timeout=10s "$@"; }

curl_ok() { # url expected-body [curl args]
  local url=$1 want=$2 got
  shift 2
  got=$(curl -sS --max-time 3 "$@" "$url") && [[ $got == "$want" ]]
}

do_start() {
  DIR= AUDIT_POLICY=
  while (($#)); do
    case $1 in
      --dir) DIR=${2:?--dir needs a directory}; shift 2 ;;
      --dir=*) DIR=${1#--dir=}; shift ;;
      --audit-policy) AUDIT_POLICY=${2:?--audit-policy needs a file}; shift 2 ;;
      --audit-policy=*) AUDIT_POLICY=${1#--audit-policy=}; shift ;;
      -h | --help) usage; exit 0 ;;
      *) die "start: unknown argument $1 (see -h)" ;;
    esac
  done
  NODES=${CHORUS_K8S_NODES:-3}
  POD_CIDR=${CHORUS_K8S_POD_CIDR:-10.244.0.0/16}
  METRICS=${CHORUS_K8S_METRICS:-1}
  [[ $METRICS == [01] ]] || die "CHORUS_K8S_METRICS must be 0 or 1"
  TIMEOUT=${CHORUS_K8S_START_TIMEOUT:-120}
  [[ $NODES =~ ^[1-9][0-9]*$ ]] || die "CHORUS_K8S_NODES must be a positive number"
  [[ $POD_CIDR =~ ^[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+/[0-9]+$ ]] ||
    die "CHORUS_K8S_POD_CIDR must be an IPv4 CIDR such as 10.244.0.0/16"
  command -v openssl >/dev/null || die "openssl is needed to make the certificates"
  command -v curl >/dev/null || die "curl is needed to poll readiness"

  do_build
  local t0=$SECONDS
  START_US=${EPOCHREALTIME/./}
  if [[ -z $DIR ]]; then
    DIR=$(mktemp -d "${TMPDIR:-/tmp}/chorus-k8s.XXXXXX")
  else
    mkdir -p "$DIR"
    DIR=$(cd "$DIR" && pwd)
    [[ -z $(ls -A "$DIR") ]] || die "start: $DIR is not empty (stop the cluster in it first, or pick another dir)"
  fi
  touch "$DIR/.chorus-k8s"
  mkdir -p "$DIR/logs" "$DIR/pids" "$DIR/etcd-data"
  chmod 700 "$DIR/etcd-data"
  PKI=$DIR/pki
  declare -gA PIDS=()
  trap 'rc=$?; if ((rc != 0 && START_OK == 0)); then stop_pids; fi' EXIT
  trap 'say "interrupted"; exit 130' INT TERM

  make_pki
  local etcd_port etcd_peer api_port kcm_port sched_port kwok_port ms_port
  etcd_port=$(free_port); etcd_peer=$(free_port); api_port=$(free_port)
  kcm_port=$(free_port); sched_port=$(free_port); kwok_port=$(free_port); ms_port=$(free_port)
  ETCD_URL=http://127.0.0.1:$etcd_port
  APISERVER=https://127.0.0.1:$api_port
  SA_ISSUER=https://kubernetes.default.svc.cluster.local
  kubeconfig "$DIR/admin.kubeconfig" chorus-admin "$PKI/admin.crt" "$PKI/admin.key"
  kubeconfig "$DIR/controller-manager.kubeconfig" system:kube-controller-manager \
    "$PKI/controller-manager.crt" "$PKI/controller-manager.key"
  kubeconfig "$DIR/scheduler.kubeconfig" system:kube-scheduler "$PKI/scheduler.crt" "$PKI/scheduler.key"
  kubeconfig "$DIR/kwok.kubeconfig" kwok-controller "$PKI/kwok.crt" "$PKI/kwok.key"
  kubeconfig "$DIR/metrics-server.kubeconfig" metrics-server "$PKI/metrics-server.crt" \
    "$PKI/metrics-server.key"

  launch etcd "$BIN/etcd" --name=chorus --data-dir="$DIR/etcd-data" \
    --listen-client-urls="$ETCD_URL" --advertise-client-urls="$ETCD_URL" \
    --listen-peer-urls="http://127.0.0.1:$etcd_peer" \
    --initial-advertise-peer-urls="http://127.0.0.1:$etcd_peer" \
    --initial-cluster="chorus=http://127.0.0.1:$etcd_peer" --initial-cluster-state=new \
    --unsafe-no-fsync --quota-backend-bytes=2147483648 --log-level=warn
  wait_for etcd "healthy etcd at $ETCD_URL/health" \
    curl_ok "$ETCD_URL/health" '{"health":"true","reason":""}'

  # An audit log only when asked: the end-to-end suite lists the requests the API refused.
  local audit=()
  if [[ -n $AUDIT_POLICY ]]; then
    [[ -r $AUDIT_POLICY ]] || die "start: audit policy $AUDIT_POLICY cannot be read"
    audit=(--audit-policy-file="$(cd "$(dirname "$AUDIT_POLICY")" && pwd)/$(basename "$AUDIT_POLICY")"
      --audit-log-path="$DIR/audit.log" --audit-log-format=json --audit-log-mode=blocking)
  fi
  launch kube-apiserver "$BIN/kube-apiserver" \
    --etcd-servers="$ETCD_URL" \
    --bind-address=127.0.0.1 --advertise-address=127.0.0.1 --secure-port="$api_port" \
    --endpoint-reconciler-type=none \
    --tls-cert-file="$PKI/apiserver.crt" --tls-private-key-file="$PKI/apiserver.key" \
    --client-ca-file="$PKI/ca.crt" \
    --authorization-mode=Node,RBAC \
    --service-account-issuer="$SA_ISSUER" \
    --service-account-key-file="$PKI/sa.pub" --service-account-signing-key-file="$PKI/sa.key" \
    --service-cluster-ip-range=10.96.0.0/16 \
    --kubelet-client-certificate="$PKI/apiserver-kubelet-client.crt" \
    --kubelet-client-key="$PKI/apiserver-kubelet-client.key" \
    --kubelet-preferred-address-types=InternalIP \
    --requestheader-client-ca-file="$PKI/front-proxy-ca.crt" \
    --requestheader-allowed-names=front-proxy-client \
    --requestheader-username-headers=X-Remote-User \
    --requestheader-group-headers=X-Remote-Group \
    --requestheader-extra-headers-prefix=X-Remote-Extra- \
    --proxy-client-cert-file="$PKI/front-proxy-client.crt" \
    --proxy-client-key-file="$PKI/front-proxy-client.key" \
    --allow-privileged=true --profiling=false --v=1 "${audit[@]}"
  wait_for kube-apiserver "ok from $APISERVER/readyz" curl_ok "$APISERVER/readyz" ok \
    --cacert "$PKI/ca.crt" --cert "$PKI/admin.crt" --key "$PKI/admin.key"

  launch kube-controller-manager "$BIN/kube-controller-manager" \
    --kubeconfig="$DIR/controller-manager.kubeconfig" \
    --authentication-kubeconfig="$DIR/controller-manager.kubeconfig" \
    --authorization-kubeconfig="$DIR/controller-manager.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port="$kcm_port" \
    --leader-elect=false --use-service-account-credentials=true \
    --service-account-private-key-file="$PKI/sa.key" --root-ca-file="$PKI/ca.crt" \
    --cluster-signing-cert-file="$PKI/ca.crt" --cluster-signing-key-file="$PKI/ca.key" \
    --cluster-name=chorus --horizontal-pod-autoscaler-sync-period=5s \
    --profiling=false --v=1
  launch kube-scheduler "$BIN/kube-scheduler" \
    --kubeconfig="$DIR/scheduler.kubeconfig" \
    --authentication-kubeconfig="$DIR/scheduler.kubeconfig" \
    --authorization-kubeconfig="$DIR/scheduler.kubeconfig" \
    --bind-address=127.0.0.1 --secure-port="$sched_port" --leader-elect=false \
    --profiling=false --v=1
  cp "$SHARE/kwok-stages.yaml" "$DIR/kwok.yaml"
  launch kwok "$BIN/kwok" --kubeconfig="$DIR/kwok.kubeconfig" --config="$DIR/kwok.yaml" \
    --manage-all-nodes=false --manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake \
    --node-ip=127.0.0.1 --node-name=localhost --node-port="$kwok_port" \
    --server-address="127.0.0.1:$kwok_port" \
    --tls-cert-file="$PKI/kwok.crt" --tls-private-key-file="$PKI/kwok.key" \
    --node-lease-duration-seconds=40 --cidr="$POD_CIDR"

  wait_for kube-controller-manager "ok from https://127.0.0.1:$kcm_port/healthz" \
    curl_ok "https://127.0.0.1:$kcm_port/healthz" ok -k
  wait_for kube-scheduler "ok from https://127.0.0.1:$sched_port/healthz" \
    curl_ok "https://127.0.0.1:$sched_port/healthz" ok -k
  NODE_NAMES=
  nodes_yaml >"$DIR/nodes.yaml"
  kc apply -f "$DIR/nodes.yaml" >"$DIR/logs/nodes.log" 2>&1 ||
    fail_start kube-apiserver "creating the fake nodes failed: $(tail -n 3 "$DIR/logs/nodes.log")"
  local n
  for n in $NODE_NAMES; do
    wait_for kwok "Ready node $n" node_ready "$n"
  done
  wait_for kube-controller-manager "ServiceAccount default/default" kc get serviceaccount default -n default
  if ((METRICS)); then
    # metrics-server runs here on loopback, not in a pod: the APIService points at an
    # ExternalName Service "localhost", so the aggregator dials 127.0.0.1, never a ClusterIP.
    launch metrics-server "$BIN/metrics-server" \
      --kubeconfig="$DIR/metrics-server.kubeconfig" \
      --authentication-kubeconfig="$DIR/metrics-server.kubeconfig" \
      --authorization-kubeconfig="$DIR/metrics-server.kubeconfig" \
      --bind-address=127.0.0.1 --secure-port="$ms_port" \
      --tls-cert-file="$PKI/metrics-server.crt" --tls-private-key-file="$PKI/metrics-server.key" \
      --kubelet-preferred-address-types=InternalIP --kubelet-use-node-status-port \
      --kubelet-certificate-authority="$PKI/ca.crt" --metric-resolution=10s \
      --kubelet-request-timeout=5s --profiling=false
    metrics_apiservice "$ms_port" >"$DIR/metrics-apiservice.yaml"
    kc apply -f "$DIR/metrics-apiservice.yaml" >>"$DIR/logs/nodes.log" 2>&1 ||
      fail_start kube-apiserver "creating the metrics APIService failed: $(tail -n 3 "$DIR/logs/nodes.log")"
    wait_for metrics-server "Available APIService v1beta1.metrics.k8s.io" apiservice_available
  fi
  print_env >"$DIR/env"
  START_OK=1
  cat "$DIR/env"
  say "started in $((SECONDS - t0)) s: apiserver $APISERVER, etcd $ETCD_URL, nodes: $NODE_NAMES"
  say "state, logs and pids in $DIR; stop with: scripts/control-plane.sh stop $DIR"
}

metrics_apiservice() { # port
  cat <<EOF
apiVersion: v1
kind: Service
metadata: {name: metrics-server, namespace: kube-system}
spec:
  type: ExternalName
  externalName: localhost
  ports: [{name: https, port: $1, protocol: TCP}]
---
apiVersion: apiregistration.k8s.io/v1
kind: APIService
metadata: {name: v1beta1.metrics.k8s.io}
spec:
  group: metrics.k8s.io
  version: v1beta1
  groupPriorityMinimum: 100
  versionPriority: 100
  caBundle: $(b64 "$PKI/ca.crt")
  service: {name: metrics-server, namespace: kube-system, port: $1}
EOF
}

apiservice_available() {
  [[ $(kc get apiservice v1beta1.metrics.k8s.io -o 'jsonpath={.status.conditions[?(@.type=="Available")].status}') == True ]]
}

node_ready() {
  [[ $(kc get node "$1" -o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}') == True ]] &&
    # the node lifecycle controller has lifted its not-ready taint, so pods can be scheduled
    [[ $(kc get node "$1" -o 'jsonpath={.spec.taints[*].key}') != *node.kubernetes.io/not-ready* ]]
}

state_dir() { # from an argument or $CHORUS_K8S_DIR
  DIR=${1:-${CHORUS_K8S_DIR:-}}
  [[ -n $DIR ]] || die "$CMD: no state dir given and CHORUS_K8S_DIR is not set"
  if [[ ! -e $DIR && $CMD == stop ]]; then
    say "stop: $DIR does not exist: nothing to stop"
    exit 0
  fi
  [[ -d $DIR ]] || die "$CMD: $DIR does not exist"
  [[ -f $DIR/.chorus-k8s ]] || die "$CMD: $DIR is not a control-plane state dir (no .chorus-k8s)"
  DIR=$(cd "$DIR" && pwd)
}

do_stop() {
  state_dir "${1:-}"
  stop_pids
  rm -rf -- "$DIR"
  say "stopped; removed $DIR"
}

do_env() {
  state_dir "${1:-}"
  [[ -f $DIR/env ]] || die "env: $DIR has no env (was start successful?)"
  cat "$DIR/env"
}

do_status() {
  state_dir "${1:-}"
  local name pid st
  for name in etcd kube-apiserver kube-controller-manager kube-scheduler kwok metrics-server; do
    [[ $name != metrics-server || -f $DIR/pids/$name ]] || continue
    if [[ -f $DIR/pids/$name ]] && read -r pid st <"$DIR/pids/$name" && alive "$pid" "$st"; then
      echo "$name running (pid $pid)"
    else
      echo "$name not running"
    fi
  done
}

# ---------------------------------------------------------------------------------------------
# smoke: a self-check of a fresh cluster, run by hand (docs/control-plane.md).

SMOKE_PASS=0
SMOKE_FAIL=0
check() { # description command...: passes when the command succeeds
  local what=$1
  shift
  if "$@" >>"$SMOKE_LOG" 2>&1; then
    SMOKE_PASS=$((SMOKE_PASS + 1))
    say "ok    $what"
  else
    SMOKE_FAIL=$((SMOKE_FAIL + 1))
    say "FAIL  $what (see $SMOKE_LOG)"
  fi
}

eventually() { # seconds command...: retry every 0.2 s
  local deadline=$((SECONDS + $1))
  shift
  until "$@"; do
    ((SECONDS < deadline)) || return 1
    sleep 0.2
  done
}

jp() { kubectl -n smoke get "$1" -o "jsonpath=$2"; }
nodes_ready() {
  local want
  want=$(printf 'True %.0s' $(seq "${CHORUS_K8S_NODES:-3}"))
  [[ $(kubectl get nodes -o 'jsonpath={range .items[*]}{.status.conditions[?(@.type=="Ready")].status} {end}') == "$want" ]]
}
ready_replicas() { [[ $(jp "$1" '{.status.readyReplicas}') == "$2" ]]; }
rs_owned_by_deployment() {
  [[ $(kubectl -n smoke get rs -l app=x -o 'jsonpath={.items[0].metadata.ownerReferences[0].kind}/{.items[0].metadata.ownerReferences[0].name}') == Deployment/x ]] &&
    [[ $(kubectl -n smoke get pods -l app=x -o 'jsonpath={.items[*].status.phase}') == "Running Running Running" ]]
}
hpa_able_to_scale() {
  [[ $(jp hpa/x '{.status.conditions[?(@.type=="AbleToScale")].status}') == True ]]
}
gc_done() { [[ -z $(kubectl -n smoke get rs,pods -l app=x -o name) ]]; }
slice_has_two() {
  [[ $(kubectl -n smoke get endpointslices -l kubernetes.io/service-name=web \
    -o 'jsonpath={range .items[*].endpoints[*]}{.addresses[0]} {end}' | wc -w) == 2 ]]
}
sa_forbidden() {
  local out
  out=$(kubectl --kubeconfig "$SMOKE_DIR/sa.kubeconfig" -n smoke get pods 2>&1) && return 1
  echo "$out"
  [[ $out == *Forbidden* ]]
}
sa_allowed() { kubectl --kubeconfig "$SMOKE_DIR/sa.kubeconfig" -n smoke get pods; }

# kwok reports each pod's usage from its annotations; 400m on a request of 200m is 200 %.
SMOKE_HOT='apiVersion: apps/v1
kind: Deployment
metadata: {name: hot}
spec:
  replicas: 2
  selector: {matchLabels: {app: hot}}
  template:
    metadata:
      labels: {app: hot}
      annotations: {kwok.x-k8s.io/usage-cpu: 400m, kwok.x-k8s.io/usage-memory: 64Mi}
    spec:
      containers: [{name: c, image: nginx, resources: {requests: {cpu: 200m}}}]
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata: {name: hot}
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: hot}
  minReplicas: 2
  maxReplicas: 4
  metrics:
  - type: Resource
    resource: {name: cpu, target: {type: Utilization, averageUtilization: 50}}'
top_shows_usage() { [[ $(kubectl -n smoke top pods -l app=hot --no-headers) == *400m*64Mi* ]]; }

SMOKE_MANIFEST='apiVersion: apps/v1
kind: StatefulSet
metadata: {name: web}
spec:
  serviceName: web
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: web, image: nginx, ports: [{containerPort: 80}]}]
---
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: None
  selector: {app: web}
  ports: [{port: 80}]
---
apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata: {name: x}
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: x}
  minReplicas: 2
  maxReplicas: 6
  metrics:
  - type: Resource
    resource: {name: cpu, target: {type: Utilization, averageUtilization: 50}}'

do_smoke() {
  local env token t0=$SECONDS
  SMOKE_DIR=$(mktemp -d "${TMPDIR:-/tmp}/chorus-k8s-smoke.XXXXXX")
  SMOKE_LOG=$SMOKE_DIR/smoke.log
  env=$("$0" start --dir "$SMOKE_DIR/cluster") || die "smoke: start failed (state in $SMOKE_DIR)"
  eval "$env"
  # shellcheck disable=SC2064
  trap "'$0' stop '$SMOKE_DIR/cluster' || true" EXIT
  check "$(kubectl get nodes --no-headers | wc -l) kwok nodes Ready" nodes_ready
  kubectl create namespace smoke >>"$SMOKE_LOG" 2>&1
  kubectl -n smoke create deployment x --image=nginx --replicas=3 >>"$SMOKE_LOG" 2>&1
  check "Deployment x: 3 pods Ready" eventually 60 ready_replicas deploy/x 3
  check "its ReplicaSet made by the deployment controller, pods Running" rs_owned_by_deployment
  kubectl -n smoke scale deployment x --replicas=5 >>"$SMOKE_LOG" 2>&1
  check "kubectl scale to 5: 5 Ready" eventually 60 ready_replicas deploy/x 5
  echo "$SMOKE_MANIFEST" | kubectl -n smoke apply -f - >>"$SMOKE_LOG" 2>&1
  if ((CHORUS_K8S_METRICS)); then
    echo "$SMOKE_HOT" | kubectl -n smoke apply -f - >>"$SMOKE_LOG" 2>&1
  fi
  check "StatefulSet web: 2 pods Ready" eventually 60 ready_replicas statefulset/web 2
  if [[ $CHORUS_K8S_POD_CIDR == 127.* ]]; then
    say "skip  EndpointSlice (loopback pod IPs are refused in EndpointSlices)"
  else
    check "EndpointSlice of Service web lists its 2 pods" eventually 30 slice_has_two
  fi
  check "HPA x (autoscaling/v2) picked up: AbleToScale=True" eventually 30 hpa_able_to_scale
  if ((CHORUS_K8S_METRICS)); then
    check "kubectl top pods: kwok's fake usage through metrics-server" eventually 90 top_shows_usage
    check "HPA hot scales 2 -> 4 on that CPU usage (200 % of the request)" \
      eventually 120 ready_replicas deploy/hot 4
  fi
  kubectl -n smoke delete hpa x >>"$SMOKE_LOG" 2>&1
  kubectl -n smoke delete deployment x >>"$SMOKE_LOG" 2>&1
  check "Deployment deleted: the garbage collector removed its ReplicaSet and pods" eventually 60 gc_done
  token=$(kubectl -n smoke create token default --duration=10m 2>>"$SMOKE_LOG") || token=
  check "kubectl create token (TokenRequest)" test -n "$token"
  printf '%s\n' "apiVersion: v1" "kind: Config" \
    "clusters: [{name: c, cluster: {server: \"$CHORUS_K8S_APISERVER\", certificate-authority: \"$CHORUS_K8S_CA_FILE\"}}]" \
    "users: [{name: sa, user: {token: \"$token\"}}]" \
    "contexts: [{name: c, context: {cluster: c, user: sa}}]" \
    "current-context: c" >"$SMOKE_DIR/sa.kubeconfig"
  check "the token is refused (403 Forbidden) to list pods without a RoleBinding" sa_forbidden
  kubectl -n smoke create rolebinding sa-view --clusterrole=view --serviceaccount=smoke:default >>"$SMOKE_LOG" 2>&1
  check "and allowed after a RoleBinding to view" eventually 10 sa_allowed
  check "helm version: $(helm version --template '{{.Version}}' 2>/dev/null)" helm version
  trap - EXIT
  "$0" stop "$SMOKE_DIR/cluster"
  say "smoke: $SMOKE_PASS passed, $SMOKE_FAIL failed in $((SECONDS - t0)) s (log: $SMOKE_LOG)"
  ((SMOKE_FAIL == 0)) || exit 1
  rm -rf -- "$SMOKE_DIR"
}

CMD=${1:-}
(($#)) && shift
case $CMD in
  build) do_build; say "binaries in $BIN" ;;
  start) do_start "$@" ;;
  stop) do_stop "$@" ;;
  env) do_env "$@" ;;
  status) do_status "$@" ;;
  smoke) do_smoke ;;
  clean) do_clean ;;
  -h | --help | help) usage ;;
  '') usage >&2; exit 2 ;;
  *) say "unknown command $CMD"; usage >&2; exit 2 ;;
esac
