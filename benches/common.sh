# Shared by the shell benchmarks (callgrind.sh, syscalls.sh, flame.sh, pgo.sh): free
# ports, waiting for a listener or for a gofe to be ready, the nginx origin and a one-hop
# HAProxy. Source it after setting `work` (a scratch directory the caller removes) and
# `me` (the script's name, for messages).

# Background processes to stop on exit (callers append), and the exit handler that
# stops them and the origin and removes $work (kept with KEEP=1).
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  stop_origin
  if [ "${KEEP:-0}" = 1 ]; then echo "$me: work directory kept: $work" >&2; else rm -rf "$work"; fi
}

port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# wait_port PORT: returns once something accepts on 127.0.0.1:PORT (60 s at most: a
# proxy under valgrind starts slowly).
wait_port() {
  for _ in $(seq 1 1200); do
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
    sleep 0.05
  done
  echo "$me: nothing listens on $1" >&2
  exit 1
}

# wait_ready ADMIN_PORT: returns once the gofe with that admin port answers /ready (20 s
# at most); otherwise keeps $work (its logs) and exits.
wait_ready() {
  for _ in $(seq 1 400); do
    curl -fsS "http://127.0.0.1:$1/ready" >/dev/null 2>&1 && return 0
    sleep 0.05
  done
  echo "$me: the sidecar with admin port $1 did not become ready (see $work/*.log)" >&2
  KEEP=1
  exit 1
}

# start_origin H1_PORT H2_PORT [COMMAND PREFIX...]: nginx answering every request with
# 32 bytes, HTTP/1.1 on H1_PORT and HTTP/2 (prior knowledge) on H2_PORT; its pid file
# is $work/nginx.pid. A prefix (`taskset -c 1`) runs nginx under it. Under /read-body
# it reads a request's body before answering (by passing the request on to `/`):
# answering an HTTP/2 POST at once, without reading its body, nginx closes the
# connection under load (GOAWAY), failing the streams in flight on it.
start_origin() {
  local h1=$1 h2=$2
  shift 2
  mkdir -p "$work/nginx"
  cat >"$work/nginx.conf" <<CONF
daemon on; worker_processes 1; pid $work/nginx.pid; error_log $work/nginx/error.log;
events { worker_connections 1024; }
http {
  access_log off;
  # Request bodies in memory: the worker (nobody) may not write temporary files in $work.
  client_body_buffer_size 1m;
  client_body_temp_path $work/nginx; proxy_temp_path $work/nginx;
  fastcgi_temp_path $work/nginx; uwsgi_temp_path $work/nginx; scgi_temp_path $work/nginx;
  keepalive_requests 100000000;
  server { listen 127.0.0.1:$h1; location / { return 200 "0123456789abcdef0123456789abcdef"; }
    location /read-body { proxy_pass http://127.0.0.1:$h1/; } }
  server { listen 127.0.0.1:$h2 http2; location / { return 200 "0123456789abcdef0123456789abcdef"; }
    location /read-body { proxy_pass http://127.0.0.1:$h1/; } }
}
CONF
  "$@" nginx -c "$work/nginx.conf"
  wait_port "$h1"
  wait_port "$h2"
}

# start_origins [COMMAND PREFIX...]: start_origin on two free ports, kept in $origin
# (HTTP/1.1) and $origin2 (HTTP/2); origin_for PROTO (h1 or h2) names the one a proxy
# speaking PROTO to its client speaks to, as gofe does.
start_origins() {
  origin=$(port)
  origin2=$(port)
  start_origin "$origin" "$origin2" "$@"
}
origin_for() { if [ "$1" = h2 ]; then echo "$origin2"; else echo "$origin"; fi; }

stop_origin() {
  [ -f "$work/nginx.pid" ] && kill "$(cat "$work/nginx.pid")" 2>/dev/null || true
}

# haproxy_config FILE PROTO LISTEN ORIGIN: one HAProxy thread from LISTEN to ORIGIN,
# speaking PROTO (h1 or h2) on both sides, reusing its upstream connections.
haproxy_config() {
  local file=$1 proto=$2 listen=$3 origin=$4
  local bind="bind 127.0.0.1:$listen" server="server o 127.0.0.1:$origin"
  if [ "$proto" = h2 ]; then bind="$bind proto h2"; server="$server proto h2"; fi
  cat >"$file" <<CONF
global
  nbthread 1
defaults
  mode http
  timeout connect 5s
  timeout client 30s
  timeout server 30s
  http-reuse always
frontend f
  $bind
  default_backend b
backend b
  $server
CONF
}
