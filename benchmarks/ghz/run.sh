#!/usr/bin/env bash
# ghz straight at the ext_proc gRPC service: epp, the Python floor and the Go floor.
#
#   benchmarks/ghz/run.sh [--quick] [--json] [--duration 10s] [--concurrency "1 16 64"]
#                         [--setups "floor-go floor-py epp"] [--sequences "buffered-json duplex-json duplex-sse"]
#                         [--sse-chunks 64] [--fixed-request-id] [--out-dir benchmarks/results/ghz]
#   benchmarks/ghz/run.sh --build-only      # build ghz (once) and print its path: workers_bench.py uses it
#
# One ghz "request" is one ext_proc stream, i.e. the messages Envoy sends for one HTTP
# request (benchmarks/ghz/messages.py writes them); streams/s and latency are per stream.
# ghz sends all of a stream's messages without waiting for replies: that is what
# FULL_DUPLEX_STREAMED allows, not Envoy's BUFFERED ping-pong. Each row also gives the CPU per
# stream of the processor (all its threads, /proc/<pid>/stat) and of ghz itself: on 2 cores the
# client's share tells how far a row is bounded by ghz rather than by the processor. A unique
# x-request-id per stream is a ghz template, which doubles ghz's CPU per stream;
# --fixed-request-id sends one constant id instead (see messages.py).
#
# ghz v0.121.0 is built once with `go install` into ~/.cache/epp/ghz/ and reused. ghz finds
# the method by server reflection (no protoset): epp serves it (src/epp/extproc/reflection.py);
# the floors serve no reflection, so ghz gets a protoset for them (the same descriptors, from
# xds-protos: floor_protoset below). ghz resolves the method once per run either way.
#
# Every process binds 127.0.0.1 port 0 and says its port in a JSON ready line; epp runs with
# scraping off (--refresh-metrics-interval 0) over 8 loopback endpoints nothing listens on
# (nothing dials them). Each ghz JSON report is saved, without its per-call details, as
# <out-dir>/<setup>_<sequence>_c<concurrency>.json; the table (and with --json one JSON
# object per row on stdout) comes from benchmarks/ghz/summarise.py.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
GHZ_VERSION=v0.121.0
GHZ_DIR=${XDG_CACHE_HOME:-$HOME/.cache}/epp/ghz
GHZ=$GHZ_DIR/ghz
GO=$(command -v go || echo /usr/local/go/bin/go)
CALL=envoy.service.ext_proc.v3.ExternalProcessor/Process
ENDPOINTS=127.0.1.1:8000,127.0.1.2:8000,127.0.1.3:8000,127.0.1.4:8000,127.0.1.5:8000,127.0.1.6:8000,127.0.1.7:8000,127.0.1.8:8000

duration=10s
warmup=2s
concurrency="1 16 64"
setups="floor-go floor-py epp"
sequences="lean-json buffered-json duplex-json duplex-sse"
sse_chunks=64
id_flag=()
json=()
build_only=""
out_dir=$ROOT/benchmarks/results/ghz

usage() { sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }
while [[ $# -gt 0 ]]; do
    case $1 in
        --quick) duration=2s; warmup=1s; shift ;;
        --json) json=(--json); shift ;;
        --duration) duration=${2:?}; shift 2 ;;
        --concurrency) concurrency=${2:?}; shift 2 ;;
        --setups) setups=${2:?}; shift 2 ;;
        --sequences) sequences=${2:?}; shift 2 ;;
        --sse-chunks) sse_chunks=${2:?}; shift 2 ;;
        --fixed-request-id) id_flag=(--fixed-request-id); shift ;;
        --build-only) build_only=1; shift ;;
        --out-dir) out_dir=${2:?}; shift 2 ;;
        -h|--help) usage ;;
        *) echo "run.sh: unknown argument $1 (--help for usage)" >&2; exit 2 ;;
    esac
done

say() { echo "[ghz-bench] $*" >&2; }

work=$(mktemp -d "${TMPDIR:-/tmp}/ghz-bench.XXXXXX")
proc_pid=""
proc_out=""
stop_proc() {
    if [[ -n $proc_pid ]] && kill -0 "$proc_pid" 2>/dev/null; then
        kill -TERM "$proc_pid" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$proc_pid" 2>/dev/null || break; sleep 0.1; done  # bounded wait for a foreign process
        kill -KILL "$proc_pid" 2>/dev/null || true
        wait "$proc_pid" 2>/dev/null || true
    fi
    if [[ -n $proc_out ]]; then exec {proc_out}<&-; fi
    proc_pid=""
    proc_out=""
}
cleanup() { stop_proc; rm -rf "$work"; }
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---- tools ---------------------------------------------------------------------------------
build_ghz() {
    [[ -x $GHZ ]] && return
    mkdir -p "$GHZ_DIR"
    exec {lock}>"$GHZ_DIR/.build.lock"
    flock "$lock"
    if [[ ! -x $GHZ ]]; then
        say "building ghz $GHZ_VERSION into $GHZ_DIR (once)"
        if ! (cd "$work" && GOBIN=$GHZ_DIR "$GO" install "github.com/bojand/ghz/cmd/ghz@$GHZ_VERSION" >&2); then
            # the module proxy's deprecation lookup can fail `go install pkg@version`; a scratch module works
            say "go install failed; building in a scratch module"
            mkdir -p "$work/ghz-build"
            (cd "$work/ghz-build" && "$GO" mod init ghz-build >&2 && "$GO" get "github.com/bojand/ghz@$GHZ_VERSION" >&2 \
                && "$GO" build -o "$GHZ.partial" github.com/bojand/ghz/cmd/ghz >&2 && mv "$GHZ.partial" "$GHZ")
        fi
    fi
    exec {lock}>&-
}

floor_protoset() {  # the ext_proc service's descriptors with their imports, for servers without reflection
    local out=$work/extproc.protoset
    "$PY" "$ROOT/benchmarks/ghz/protoset.py" "$out"
    echo "$out"
}

cpu_ticks() {  # utime + stime of every thread of a process (fields 14 and 15 of proc(5))
    sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'
}
CLK_TCK=$(getconf CLK_TCK)
TIME=$(command -v /usr/bin/time || true)  # GNU time: ghz's own CPU (a row says null without it)

# ---- processors ----------------------------------------------------------------------------
# start_proc ARGV...: start ARGV, read its JSON ready line (30 s bound) and echo it
start_proc() {
    local log=$work/processor.log
    exec {proc_out}< <(exec "$@" 2>"$log")
    proc_pid=$!
    local line=""
    if ! read -r -t 30 -u "$proc_out" line; then
        say "no ready line from $1 within 30 s; its log:"; tail -20 "$log" >&2; return 1
    fi
    echo "$line"
}

ready_field() {  # ready_field KEY: a field of the last ready line
    "$PY" -c 'import json, sys; r = json.load(open(sys.argv[1])); assert r["event"] == "ready"; print(r[sys.argv[2]])' \
        "$work/ready" "$1"
}

epp_check() {  # what epp says it did: routed requests, rejections, requests still in flight (must be 0)
    "$PY" - "http://127.0.0.1:$(ready_field metrics_port)/metrics" <<'EOF'
import sys
import urllib.request

totals = {"inference_model_request_total": 0.0, "epp_rejections_total": 0.0, "inference_model_running_requests": 0.0}
with urllib.request.urlopen(sys.argv[1], timeout=10) as page:
    for line in page.read().decode().splitlines():
        name = line.split("{")[0].split(" ")[0]
        if name in totals:
            totals[name] += float(line.rsplit(" ", 1)[1])
print("routed %d requests, rejected %d, in flight after the runs: %d" % tuple(totals.values()))
EOF
}

start_setup() {
    case $1 in
        epp)
            printf 'pool:\n  name: bench\n  endpoints: [%s]\n' "$ENDPOINTS" > "$work/pool.yaml"
            start_proc "$PY" -m epp serve --pool-file "$work/pool.yaml" --bind-address 127.0.0.1 \
                --grpc-port 0 --grpc-health-port 0 --metrics-port 0 --secure-serving=false \
                --refresh-metrics-interval 0 --log-level warning ;;
        floor-py) start_proc "$PY" "$ROOT/benchmarks/baselines/floor_py.py" --address 127.0.0.1:0 --endpoints "$ENDPOINTS" ;;
        floor-go) start_proc "$floor_go" --address 127.0.0.1:0 --endpoints "$ENDPOINTS" ;;
        *) say "unknown setup $1 (epp, floor-py, floor-go)"; return 2 ;;
    esac
}

build_ghz
if [[ -n $build_only ]]; then echo "$GHZ"; exit 0; fi
floor_go=""
if [[ " $setups " == *" floor-go "* ]]; then
    floor_go=$("$PY" "$ROOT/benchmarks/baselines/build.py")
fi
protoset=$(floor_protoset)
"$PY" "$ROOT/benchmarks/ghz/messages.py" "$work/data" --sse-chunks "$sse_chunks" "${id_flag[@]}" >/dev/null
say "ghz $("$GHZ" --version), $(nproc) cores, duration $duration per run, concurrency $concurrency"

reports=()
for setup in $setups; do
    start_setup "$setup" > "$work/ready" || exit 1
    port_key=port
    [[ $setup == epp ]] && port_key=grpc_port
    port=$(ready_field "$port_key")
    describe=(--protoset "$protoset")
    [[ $setup == epp ]] && describe=()  # epp: server reflection
    # --duration-stop=wait: streams still open when the duration ends finish and count
    common=(--insecure --call "$CALL" "${describe[@]}" --count-errors --duration-stop=wait)
    say "$setup on 127.0.0.1:$port: warm-up $warmup"
    "$GHZ" "${common[@]}" -D "$work/data/duplex-json.json" -c 16 -z "$warmup" -O json -o "$work/warmup.json" \
        "127.0.0.1:$port" >/dev/null
    for sequence in $sequences; do
        for c in $concurrency; do
            report=$work/$setup-$sequence-c$c.json
            say "$setup $sequence c=$c"
            tags=$(printf '{"setup": "%s", "sequence": "%s"}' "$setup" "$sequence")
            timing=()
            [[ -n $TIME ]] && timing=("$TIME" -f "%U %S" -o "$report.time")
            before=$(cpu_ticks "$proc_pid")
            if "${timing[@]}" "$GHZ" "${common[@]}" -D "$work/data/$sequence.json" -c "$c" -z "$duration" \
                --tags "$tags" -O json -o "$report" "127.0.0.1:$port" >/dev/null; then
                after=$(cpu_ticks "$proc_pid")
                ghz_cpu=null
                [[ -s $report.time ]] && ghz_cpu=$(awk '{print $1 + $2}' "$report.time")
                printf '{"proc_cpu_s": %s, "ghz_cpu_s": %s}\n' \
                    "$(awk -v a="$before" -v b="$after" -v t="$CLK_TCK" 'BEGIN {print (b - a) / t}')" "$ghz_cpu" \
                    > "$report.cpu"
                reports+=("$report")
            else
                say "ghz failed for $setup $sequence c=$c"
            fi
        done
    done
    if ! kill -0 "$proc_pid" 2>/dev/null; then
        say "$setup exited during the run; its log:"; tail -20 "$work/processor.log" >&2
    elif [[ $setup == epp ]]; then
        say "epp: $(epp_check)"
    fi
    if grep -q Traceback "$work/processor.log"; then
        say "$setup logged errors (last lines):"; tail -5 "$work/processor.log" >&2
    fi
    stop_proc
done

[[ ${#reports[@]} -gt 0 ]] || { say "no ghz report"; exit 1; }
"$PY" "$ROOT/benchmarks/ghz/summarise.py" "${json[@]}" --out-dir "$out_dir" "${reports[@]}"
