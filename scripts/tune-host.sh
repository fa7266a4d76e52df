#!/usr/bin/env bash
# Kernel settings for a host holding very many mostly idle WebSocket connections.
# Prints each setting, its current value and the recommended one; changes nothing
# unless run with --apply (as root), which sets them now and writes
# /etc/sysctl.d/90-ringgate.conf so they survive a reboot.
#
#   scripts/tune-host.sh                      # show what would change
#   scripts/tune-host.sh --apply              # change it
#   scripts/tune-host.sh --ports 8080,9090    # ringgate's listen ports (default 8080,9090,9091)
#
# It never lowers a limit the host already has higher: each number of a setting is
# raised to the recommendation or kept. The one exception is the point of the
# tuning: the default (middle) size of tcp_rmem and tcp_wmem, which is what every
# idle socket starts with. tcp_mem is sized from this host's memory. When the
# ephemeral port range is widened over ringgate's listen ports, those ports are
# reserved (ip_local_reserved_ports) so no outgoing connection can take them.
#
# TUNE_HOST_ROOT (default /) and TUNE_HOST_CONF (default /etc/sysctl.d/90-ringgate.conf)
# let tests run it against a copy of /proc.
set -euo pipefail

root="${TUNE_HOST_ROOT:-/}"
conf_file="${TUNE_HOST_CONF:-/etc/sysctl.d/90-ringgate.conf}"
apply=0
ports="8080,9090,9091"
while [ $# -gt 0 ]; do
  case "$1" in
    --apply) apply=1 ;;
    --ports)
      [ $# -ge 2 ] || { echo "tune-host.sh: --ports needs a list (8080,9090)" >&2; exit 2; }
      ports="$2"; shift ;;
    -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
    *) echo "tune-host.sh: unknown argument $1 (use --apply, --ports LIST or nothing)" >&2; exit 2 ;;
  esac
  shift
done
if ! [[ "$ports" =~ ^[0-9]+(,[0-9]+)*$ ]]; then
  echo "tune-host.sh: --ports takes port numbers separated by commas, not '$ports'" >&2
  exit 2
fi

proc_sys() { printf '%s/proc/sys/%s' "${root%/}" "${1//.//}"; }

# tcp_mem from this host's memory, in pages: pressure starts at 1/16 of RAM,
# the hard limit is 1/8 (the kernel's own defaults are about 1/32 to 1/16).
mem_kib=$(awk '/^MemTotal:/ {print $2}' "${root%/}/proc/meminfo")
page_kib=$(( $(getconf PAGESIZE 2>/dev/null || echo 4096) / 1024 ))
pages=$((mem_kib / page_kib))
tcp_mem="$((pages / 24)) $((pages / 16)) $((pages / 8))"

# name | recommended | why | how: max (never lower any number), keep-max-but-default (tcp_rmem/wmem)
settings=(
  "fs.nr_open|1048576|most fds (and fixed-file slots per ring, via RLIMIT_NOFILE) one process may have|max"
  "fs.file-max|4194304|system-wide open files: each socket, direct descriptor or not, has a struct file|max"
  "net.core.somaxconn|65535|accept backlog ceiling: absorbs reconnect storms after a restart|max"
  "net.ipv4.tcp_max_syn_backlog|65535|half-open connections queued during a connect storm|max"
  "net.core.netdev_max_backlog|131072|packets queued per CPU before the stack drops them: keepalive probes (--tcp-keepalive) of connections accepted together fire in one timer run, and on loopback each waits here|max"
  "net.ipv4.ip_local_port_range|1024 65535|ephemeral ports, for load generators and proxies on this host|range"
  "net.ipv4.tcp_rmem|4096 16384 4194304|small default receive buffer: idle sockets stay cheap, busy ones grow (a larger maximum is kept)|buffers"
  "net.ipv4.tcp_wmem|4096 16384 4194304|small default send buffer, same reason|buffers"
  "net.ipv4.tcp_mem|$tcp_mem|pages all TCP buffers may use before pressure: 1/24, 1/16 and 1/8 of this host's $((mem_kib / 1024)) MiB|max"
  "net.ipv4.tcp_migrate_req|1|on restart, connections queued on the old listener move to the new one (Linux 5.14+)|max"
)

# Combines the host's numbers with the recommended ones by `how`.
combine() {
  local how="$1" have="$2" want="$3"
  local -a h w out
  read -r -a h <<<"$have"
  read -r -a w <<<"$want"
  if [ "${#h[@]}" != "${#w[@]}" ]; then echo "$want"; return; fi
  for i in "${!w[@]}"; do
    case "$how" in
      buffers)
        # The default (middle) is the point of the tuning; the others never go down.
        if [ "$i" = 1 ]; then out+=("${w[$i]}"); else out+=("$(( h[i] > w[i] ? h[i] : w[i] ))"); fi ;;
      range)
        # A wider range: the lower start, the higher end.
        if [ "$i" = 0 ]; then out+=("$(( h[i] < w[i] ? h[i] : w[i] ))"); else out+=("$(( h[i] > w[i] ? h[i] : w[i] ))"); fi ;;
      *) out+=("$(( h[i] > w[i] ? h[i] : w[i] ))") ;;
    esac
  done
  echo "${out[*]}"
}

changes=0
conf=""
new_range=""
set_one() {
  local name="$1" want="$2" why="$3"
  local path have
  path=$(proc_sys "$name")
  have=$(tr -s '[:space:]' ' ' <"$path" | sed 's/^ //; s/ $//')
  conf+="$name = $want"$'\n'
  if [ "$have" = "$want" ]; then
    printf '%-34s ok (%s)\n' "$name" "$have"
    return
  fi
  changes=$((changes + 1))
  if [ "$apply" = 1 ]; then
    printf '%s\n' "$want" >"$path"
    printf '%-34s set %s -> %s  (%s)\n' "$name" "$have" "$want" "$why"
  else
    printf '%-34s would set %s -> %s  (%s)\n' "$name" "$have" "$want" "$why"
  fi
}

for entry in "${settings[@]}"; do
  IFS='|' read -r name recommended why how <<<"$entry"
  path=$(proc_sys "$name")
  if [ ! -e "$path" ]; then
    printf '%-34s %s\n' "$name" "not available on this kernel ($why)"
    continue
  fi
  have=$(tr -s '[:space:]' ' ' <"$path" | sed 's/^ //; s/ $//')
  want=$(combine "$how" "$have" "$recommended")
  [ "$name" = "net.ipv4.ip_local_port_range" ] && new_range="$want"
  set_one "$name" "$want" "$why"
done

# Listen ports inside the (new) ephemeral range are reserved, added to what the
# host reserves already.
reserved_path=$(proc_sys net.ipv4.ip_local_reserved_ports)
if [ -n "$new_range" ] && [ -e "$reserved_path" ]; then
  read -r low high <<<"$new_range"
  have=$(tr -d '[:space:]' <"$reserved_path")
  add=()
  IFS=',' read -r -a listen <<<"$ports"
  for p in "${listen[@]}"; do
    if [ "$p" -ge "$low" ] && [ "$p" -le "$high" ] && ! [[ ",$have," == *",$p,"* ]]; then
      add+=("$p")
    fi
  done
  want="$have"
  for p in "${add[@]}"; do want="${want:+$want,}$p"; done
  set_one net.ipv4.ip_local_reserved_ports "$want" "ringgate's listen ports ($ports) inside the ephemeral range $low-$high: no outgoing connection may take them"
fi

if [ "$apply" = 1 ]; then
  printf '# Written by ringgate scripts/tune-host.sh\n%s' "$conf" >"$conf_file"
  echo "wrote $conf_file"
else
  echo "$changes setting(s) would change; run with --apply (as root) to change them."
fi
echo "Also: run ringgate with LimitNOFILE=1048576 (scripts/ringgate.service does) so each shard's ring can hold that many sockets."
