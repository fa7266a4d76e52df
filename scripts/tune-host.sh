#!/usr/bin/env bash
# Kernel settings for a host holding very many mostly idle WebSocket connections.
# Prints each setting, its current value and the recommended one; changes nothing
# unless run with --apply (as root), which sets them now and writes
# /etc/sysctl.d/90-ringgate.conf so they survive a reboot.
#
#   scripts/tune-host.sh            # show what would change
#   scripts/tune-host.sh --apply    # change it
set -euo pipefail

apply=0
case "${1:-}" in
  --apply) apply=1 ;;
  "") ;;
  -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
  *) echo "tune-host.sh: unknown argument $1 (use --apply or nothing)" >&2; exit 2 ;;
esac

# name | recommended | why
settings=(
  "fs.nr_open|1048576|most fds (and fixed-file slots per ring, via RLIMIT_NOFILE) one process may have"
  "fs.file-max|4194304|system-wide open files: each socket, direct descriptor or not, has a struct file"
  "net.core.somaxconn|65535|accept backlog ceiling: absorbs reconnect storms after a restart"
  "net.ipv4.tcp_max_syn_backlog|65535|half-open connections queued during a connect storm"
  "net.core.netdev_max_backlog|131072|packets queued per CPU before the stack drops them: keepalive probes (--tcp-keepalive) of connections accepted together fire in one timer run, and on loopback each waits here"
  "net.ipv4.ip_local_port_range|1024 65535|ephemeral ports, for load generators and proxies on this host"
  "net.ipv4.tcp_rmem|4096 16384 4194304|small default receive buffer: idle sockets stay cheap, busy ones grow"
  "net.ipv4.tcp_wmem|4096 16384 4194304|small default send buffer, same reason"
  "net.ipv4.tcp_mem|786432 1048576 1572864|pages all TCP buffers may use (3/4/6 GiB with 4 KiB pages) before pressure"
  "net.ipv4.tcp_migrate_req|1|on restart, connections queued on the old listener move to the new one (Linux 5.14+)"
)

changes=0
conf=""
for entry in "${settings[@]}"; do
  IFS='|' read -r name want why <<<"$entry"
  path="/proc/sys/${name//.//}"
  if [ ! -e "$path" ]; then
    printf '%-32s %s\n' "$name" "not available on this kernel ($why)"
    continue
  fi
  have=$(tr -s '[:space:]' ' ' <"$path" | sed 's/ $//')
  conf+="$name = $want"$'\n'
  if [ "$have" = "$want" ]; then
    printf '%-32s ok (%s)\n' "$name" "$have"
    continue
  fi
  changes=$((changes + 1))
  if [ "$apply" = 1 ]; then
    sysctl -q -w "$name=$want"
    printf '%-32s set %s -> %s  (%s)\n' "$name" "$have" "$want" "$why"
  else
    printf '%-32s would set %s -> %s  (%s)\n' "$name" "$have" "$want" "$why"
  fi
done

if [ "$apply" = 1 ]; then
  printf '# Written by ringgate scripts/tune-host.sh\n%s' "$conf" >/etc/sysctl.d/90-ringgate.conf
  echo "wrote /etc/sysctl.d/90-ringgate.conf"
else
  echo "$changes setting(s) would change; run with --apply (as root) to change them."
fi
echo "Also: run ringgate with LimitNOFILE=1048576 (scripts/ringgate.service does) so each shard's ring can hold that many sockets."
