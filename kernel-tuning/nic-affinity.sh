#!/usr/bin/env bash
# Prints (and with --apply, writes) NIC interrupt and packet-steering settings that
# keep each ringpush shard's packets on its own core:
#   - IRQ affinity: queue i's interrupt goes to CPU i (mod CPUs);
#   - RPS: receive packet steering spreads a single-queue NIC's packets over all CPUs;
#   - XPS: transmit queue i is used by CPU i.
# Dry-run by default: it reads /proc and /sys and prints what it would write.
# Usage: nic-affinity.sh [--apply] [IFACE]   (default: the interface of the default route)
set -euo pipefail
apply=0
iface=""
for a in "$@"; do
  case "$a" in
    --apply) apply=1 ;;
    -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
    *) iface="$a" ;;
  esac
done
if [ -z "$iface" ]; then
  iface=$(awk '$2 == "00000000" { print $1; exit }' /proc/net/route)
fi
[ -n "$iface" ] && [ -d "/sys/class/net/$iface" ] || { echo "no such interface: ${iface:-?}" >&2; exit 1; }
ncpu=$(getconf _NPROCESSORS_ONLN)

# cpumask CPU...: the mask with those CPUs set, as /proc and /sys take it: hex in
# comma-separated 32-bit words (a single word wider than 32 bits is refused).
cpumask() {
  local -a words=()
  local w c top=0 out=""
  for ((w = 0; w <= (ncpu - 1) / 32; w++)); do words[w]=0; done
  for c in "$@"; do
    words[c / 32]=$(( words[c / 32] | (1 << (c % 32)) ))
    [ $(( c / 32 )) -gt "$top" ] && top=$(( c / 32 ))
  done
  out=$(printf '%x' "${words[top]}")
  for ((w = top - 1; w >= 0; w--)); do out+=$(printf ',%08x' "${words[w]}"); done
  echo "$out"
}
all_mask=$(cpumask $(seq 0 $((ncpu - 1))))

set_value() { # file value
  if [ "$apply" = 1 ]; then
    echo "$2" > "$1" && echo "set   $1 = $2"
  else
    echo "would set $1 = $2 (now $(cat "$1" 2>/dev/null || echo '?'))"
  fi
}

i=0
for irq in $(awk -v ifc="$iface" '$0 ~ ifc { sub(":", "", $1); print $1 }' /proc/interrupts); do
  set_value "/proc/irq/$irq/smp_affinity" "$(cpumask $(( i % ncpu )))"
  i=$((i + 1))
done
[ "$i" = 0 ] && echo "no per-queue interrupts for $iface in /proc/interrupts (virtual NIC?)"

rxq=$(ls -d /sys/class/net/"$iface"/queues/rx-* 2>/dev/null | wc -l)
for q in /sys/class/net/"$iface"/queues/rx-*; do
  [ -e "$q/rps_cpus" ] || continue
  # With fewer hardware queues than CPUs, let RPS spread packets over every CPU.
  if [ "$rxq" -lt "$ncpu" ]; then set_value "$q/rps_cpus" "$all_mask"; fi
done
j=0
for q in /sys/class/net/"$iface"/queues/tx-*; do
  [ -e "$q/xps_cpus" ] || continue
  set_value "$q/xps_cpus" "$(cpumask $(( j % ncpu )))"
  j=$((j + 1))
done
[ "$apply" = 1 ] || echo "dry run: nothing written; rerun with --apply as root"
