#!/usr/bin/env bash
# A real-network lab from Linux network namespaces (docs/PROTOCOL.md, "Homes
# behind NAT"): an "internet" bridge, a relay with a public address on it,
# optionally a public node, and homes, each behind its own router that does
# NAT (iptables MASQUERADE) and drops unsolicited inbound traffic, as a home
# router does. Nothing in it reaches outside this machine: the namespaces
# have no link to the host's own network. Needs root (CAP_NET_ADMIN),
# iproute2 and iptables (`bash scripts/setup.sh --tests` installs them).
#
#   netlab.sh up NAME [--homes N] [--nat port|random] [--public] [--rate 20mbit] [--loss 1] [--delay 40ms]
#   netlab.sh down NAME
#   netlab.sh list
#
# Addresses: the internet is 198.51.100.0/24 (a documentation range): the
# relay is .1, the public node .2, home i's router .(10+i). Home i's LAN is
# 10.0.i.0/24, the home itself 10.0.i.2. Namespaces are named
# blab-NAME-{wan,relay,pub,rI,hI}; run a command in one with
# `ip netns exec blab-NAME-h1 COMMAND`.
# --nat port: MASQUERADE keeps source ports where it can (endpoint-
# independent mapping: hole punching can work); --nat random: MASQUERADE
# --random-fully (a new random port for every connection: it cannot).
# --rate, --loss (percent), --delay: each home's uplink, both ways. Rate is
# a token bucket (tc tbf), loss a random drop in the router (iptables
# statistic); delay needs the kernel's netem (CONFIG_NET_SCH_NETEM), which
# some kernels (this project's CI machines') leave out: then --delay stops
# with an error, and rate and loss still work.
set -euo pipefail

die() { printf 'netlab: %s\n' "$*" >&2; exit 1; }
[ "$(id -u)" -eq 0 ] || die "needs root (CAP_NET_ADMIN) to make network namespaces"
command -v ip >/dev/null || die "iproute2 is missing: apt-get install iproute2"

ns() { printf 'blab-%s-%s' "$LAB" "$1"; }
in_ns() { local name="$1"; shift; ip netns exec "$(ns "$name")" "$@"; }

# Joins namespace $1 to the internet bridge as $2/24 on its eth0.
join_wan() {
  local name="$1" addr="$2" port="w-$1"
  ip link add eth0 netns "$(ns "$name")" type veth peer name "$port" netns "$(ns wan)"
  in_ns wan ip link set "$port" master br0 up
  in_ns "$name" ip addr add "$addr/24" dev eth0
  in_ns "$name" ip link set eth0 up
}

up() {
  local homes=2 nat=port public=0 rate="" loss="" delay=""
  while [ $# -gt 0 ]; do
    case "$1" in
      --homes) homes="$2"; shift 2 ;;
      --nat) nat="$2"; shift 2 ;;
      --public) public=1; shift ;;
      --rate) rate="$2"; shift 2 ;;
      --loss) loss="$2"; shift 2 ;;
      --delay) delay="$2"; shift 2 ;;
      *) die "unknown option '$1' (known: --homes N, --nat port|random, --public, --rate R, --loss PERCENT, --delay D)" ;;
    esac
  done
  case "$nat" in port|random) ;; *) die "--nat takes port or random, not '$nat'" ;; esac
  [[ "$homes" =~ ^[1-9]$ ]] || die "--homes takes 1 to 9, not '$homes'"
  command -v iptables >/dev/null || die "iptables is missing: apt-get install iptables"
  { [ -n "$rate" ] || [ -n "$delay" ]; } && { command -v tc >/dev/null || die "tc is missing: apt-get install iproute2"; }
  [ -z "$rate" ] || [[ "$rate" =~ ^[0-9]+[kmg]bit$ ]] || die "--rate takes e.g. 20mbit, not '$rate'"
  [ -z "$loss" ] || [[ "$loss" =~ ^[0-9]+(\.[0-9]+)?$ ]] || die "--loss takes a percentage, e.g. 1, not '$loss'"
  [ -z "$delay" ] || [[ "$delay" =~ ^[0-9]+ms$ ]] || die "--delay takes e.g. 40ms, not '$delay'"
  # A lab of this name left by a killed run goes first.
  down_quietly
  local all=(wan relay) i
  [ "$public" = 1 ] && all+=(pub)
  for i in $(seq 1 "$homes"); do all+=("r$i" "h$i"); done
  for name in "${all[@]}"; do
    ip netns add "$(ns "$name")"
    in_ns "$name" ip link set lo up
  done
  in_ns wan ip link add br0 type bridge
  in_ns wan ip link set br0 up
  join_wan relay 198.51.100.1
  [ "$public" = 1 ] && join_wan pub 198.51.100.2
  for i in $(seq 1 "$homes"); do
    local router="r$i" home="h$i"
    join_wan "$router" "198.51.100.$((10 + i))"
    ip link add lan0 netns "$(ns "$router")" type veth peer name eth0 netns "$(ns "$home")"
    in_ns "$router" ip addr add "10.0.$i.1/24" dev lan0
    in_ns "$router" ip link set lan0 up
    in_ns "$home" ip addr add "10.0.$i.2/24" dev eth0
    in_ns "$home" ip link set eth0 up
    in_ns "$home" ip route add default via "10.0.$i.1"
    in_ns "$router" sysctl -qw net.ipv4.ip_forward=1
    local masquerade=(-t nat -A POSTROUTING -o eth0 -j MASQUERADE)
    [ "$nat" = random ] && masquerade+=(--random-fully)
    in_ns "$router" iptables "${masquerade[@]}"
    # A home router: out goes anything, in only what answers it.
    in_ns "$router" iptables -P FORWARD DROP
    in_ns "$router" iptables -A FORWARD -i lan0 -o eth0 -j ACCEPT
    in_ns "$router" iptables -A FORWARD -i eth0 -o lan0 -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
    in_ns "$router" iptables -P INPUT DROP
    in_ns "$router" iptables -A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
    in_ns "$router" iptables -A INPUT -i lan0 -j ACCEPT
    # Upload leaves by the router's internet side, download by its LAN side.
    local dev
    for dev in eth0 lan0; do
      if [ -n "$delay" ]; then
        in_ns "$router" tc qdisc add dev "$dev" root netem delay "$delay" ${rate:+rate "$rate"} \
          || die "no netem in this kernel (CONFIG_NET_SCH_NETEM): --delay cannot be emulated here"
      elif [ -n "$rate" ]; then
        in_ns "$router" tc qdisc add dev "$dev" root tbf rate "$rate" burst 64kb latency 400ms
      fi
    done
    if [ -n "$loss" ]; then
      local probability
      probability="$(awk -v p="$loss" 'BEGIN { printf "%.4f", p / 100 }')"
      in_ns "$router" iptables -I FORWARD 1 -m statistic --mode random --probability "$probability" -j DROP
    fi
  done
  printf 'netlab %s: relay 198.51.100.1%s, %s homes behind %s NAT%s%s%s\n' "$LAB" \
    "$([ "$public" = 1 ] && echo ', public node 198.51.100.2')" "$homes" \
    "$([ "$nat" = port ] && echo port-preserving || echo random-port)" "${rate:+, uplinks $rate}" "${loss:+, $loss% loss}" "${delay:+, $delay delay}"
}

# Removes every namespace of the lab (their veth pairs go with them).
down_quietly() {
  local name
  for name in $(ip netns list | awk '{print $1}' | grep "^blab-$LAB-" || true); do
    ip netns pids "$name" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$name" 2>/dev/null || true
  done
}

check_name() { [[ "$LAB" =~ ^[a-z0-9]{1,12}$ ]] || die "a lab's name is 1 to 12 lowercase letters or digits, not '$LAB'"; }

case "${1:-}" in
  up) [ $# -ge 2 ] || die "usage: netlab.sh up NAME [options]"; LAB="$2"; check_name; shift 2; up "$@" ;;
  down) [ $# -eq 2 ] || die "usage: netlab.sh down NAME"; LAB="$2"; check_name; down_quietly ;;
  list) ip netns list | awk '{print $1}' | grep '^blab-' || true ;;
  *) die "usage: netlab.sh up NAME [--homes N] [--nat port|random] [--public] [--netem SPEC] | down NAME | list" ;;
esac
