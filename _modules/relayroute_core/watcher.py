"""
The watcher script (``<persist:dir>/<role>.watch``, bash), which
``relayroute-<role>-watch.service`` runs (see :mod:`units`, README "Between
applies"): it blocks on rtnetlink and runs the role's restore script when the
kernel loses part of it. Kept as text here, because ``saltutil.sync_modules``
carries only Python files; the engine writes it as a boot file.
"""

SCRIPT = r"""#!/bin/bash
# Managed by Salt (relayroute): keeps a role's policy routing in place between
# applies, without Salt. See README, "Between applies".
#
# Usage: relayroute-watch [-d SECONDS] RESTORE_SCRIPT...
#
# Blocks on rtnetlink (ip -o monitor: no timer, no polling) and runs
# the role's restore script (the one the boot unit runs, under relayroute's
# host lock, which it takes itself) when
#   - an interface that the scripts' routes leave by comes up again (the kernel
#     removes every route through an interface that goes down, and says nothing
#     about the IPv4 ones), or
#   - such an interface gets an IPv4 or IPv6 address it did not have (the
#     kernel removes the routes whose gateway an address made reachable when
#     the address goes, again without a word: a network manager's carrier
#     handling or reconfigure, an ifdown/ifup that keeps the link up; IPv6
#     addresses also go when their link goes down). An address counts once it
#     is usable (IPv6: no longer tentative); the refreshes of an address's
#     lifetimes (every router advertisement, a DHCP renewal) are no event, or
#   - a rule or route with one of the scripts' routing protocol ids is deleted
#     (e.g. a network manager that removes rules and routes it does not know).
# Events are gathered until SECONDS (default 0.2) pass without one (1 s at
# most), so a burst costs one restore. What the restore put back and why is
# logged to stderr (the journal). A restore that fails is tried again 1 s later,
# 5 times at most; while an interface it needs is down it waits for it instead.
set -u

debounce=0.2
while getopts d: opt; do
    case $opt in
        d) debounce=$OPTARG ;;
        *) echo "usage: relayroute-watch [-d SECONDS] RESTORE_SCRIPT..." >&2; exit 2 ;;
    esac
done
shift $((OPTIND - 1))
if [ $# -eq 0 ]; then
    echo "usage: relayroute-watch [-d SECONDS] RESTORE_SCRIPT..." >&2
    exit 2
fi
scripts=("$@")
RETRIES=5

log() { printf 'relayroute-watch: %s\n' "$*" >&2; }

# What the scripts restore, read from them again at each event (an apply
# rewrites them): the protocol ids of their routes and rules, and the
# interfaces their routes leave by: a route's 'dev', or the interface the
# kernel reaches its gateway by (remembered, since a gateway behind an
# interface that is down has no route).
declare -A devs protos gateway_dev
read_scripts() {
    devs=() protos=()
    local script line words i gw dev family
    for script in "${scripts[@]}"; do
        [ -r "$script" ] || continue
        while IFS= read -r line; do
            case $line in
                "ip -"[46]" route replace "* | "ip -"[46]" rule show "*) ;;
                *) continue ;;
            esac
            read -ra words <<<"${line%%|*}"
            family=${words[1]}
            gw='' dev=''
            for ((i = 0; i + 1 < ${#words[@]}; i++)); do
                case ${words[i]} in
                    dev) dev=${words[i + 1]} ;;
                    via) gw=${words[i + 1]} ;;
                    proto) protos[${words[i + 1]}]=1 ;;
                esac
            done
            if [ -z "$dev" ] && [ -n "$gw" ]; then
                if [ -z "${gateway_dev[$gw]:-}" ]; then
                    words=($(ip "$family" route get "$gw" 2>/dev/null))
                    for ((i = 0; i + 1 < ${#words[@]}; i++)); do
                        [ "${words[i]}" = dev ] && gateway_dev[$gw]=${words[i + 1]}
                    done
                fi
                dev=${gateway_dev[$gw]:-}
            fi
            [ -z "$dev" ] || devs[$dev]=1
        done <"$script"
    done
}

# Administrative state of each interface, to see a down -> up transition.
declare -A up
link_state() { # line of 'ip -o link' / 'ip -o monitor link' -> sets name, is_up
    local head=${1%%>*} flags
    name=${1#*: }
    name=${name%%: *}
    name=${name%%@*}
    flags=",${head#*<},"
    case $flags in *,UP,*) is_up=1 ;; *) is_up=0 ;; esac
}

# The usable addresses of every interface ("name address"), to see an address
# that is new (not one whose lifetimes were refreshed).
declare -A known
address_of() { # line of 'ip -o addr' / 'ip -o monitor address' -> name, addr, usable
    local words
    read -ra words <<<"${1#Deleted }"
    name=${words[1]} addr=${words[3]}
    case " ${words[*]} " in
        *" tentative "* | *" dadfailed "*) usable=0 ;;
        *) usable=1 ;;
    esac
}

# Why the last gathered events call for a restore ('' when they do not).
reasons=()
classify() {
    local line=${1//$'\t'/ } proto
    case $line in
        Deleted\ [0-9]*:\ *" inet "* | Deleted\ [0-9]*:\ *" inet6 "*) # an address gone
            address_of "$line"
            unset "known[$name $addr]"
            ;;
        Deleted\ *)
            case $line in *" proto "*) ;; *) return ;; esac
            proto=${line##* proto }
            proto=${proto%% *}
            if [ -n "${protos[$proto]:-}" ]; then
                reasons+=("deleted: ${line#Deleted }")
            fi
            ;;
        [0-9]*:\ *" inet "* | [0-9]*:\ *" inet6 "*) # an address added, or refreshed
            address_of "$line"
            # A link-scope address (IPv6's fe80::, which comes with every link
            # up) makes no table route's gateway reachable: no event.
            case $line in *" scope link "*) usable=0 ;; esac
            if [ "$usable" = 1 ] && [ -z "${known["$name $addr"]:-}" ]; then
                known["$name $addr"]=1
                if [ -n "${devs[$name]:-}" ]; then
                    reasons+=("address added: $name")
                fi
            fi
            ;;
        [0-9]*:\ *)
            link_state "$line"
            if [ "$is_up" = 1 ] && [ "${up[$name]:-0}" != 1 ] && [ -n "${devs[$name]:-}" ]; then
                reasons+=("link up: $name")
            fi
            up[$name]=$is_up
            ;;
    esac
}

ours() { # relayroute's rules and routes of both families now (the scripts' protocol ids)
    local proto family label
    for proto in "${!protos[@]}"; do
        # IPv6's said as 'ip -6' does: IPv4's and IPv6's rules read alike.
        for family in -4 -6; do
            label=${family#-4}
            ip "$family" rule show | grep -E " proto $proto\$" |
                sed "s/^/rule ${label:+$label }/; s/\t/ /g"
            ip "$family" route show table all proto "$proto" | sed "s/^/route ${label:+$label }/"
        done
    done | sort
}

down_needed() { # the first interface the scripts need that is down
    local dev
    for dev in "${!devs[@]}"; do
        if [ "${up[$dev]:-0}" != 1 ]; then
            echo "$dev"
            return
        fi
    done
}

failures=0
restore() {
    local why=$1 before after script out status=0 waiting
    read_scripts
    waiting=$(down_needed)
    if [ -n "$waiting" ]; then
        log "$why; waiting for $waiting to come up"
        failures=0
        return
    fi
    before=$(ours)
    for script in "${scripts[@]}"; do
        [ -e "$script" ] || continue
        if ! out=$(/bin/sh "$script" 2>&1); then
            status=1
            log "restore $script failed: ${out//$'\n'/; }"
        fi
    done
    after=$(ours)
    added=$(comm -13 <(printf '%s\n' "$before") <(printf '%s\n' "$after") | sed '/^$/d')
    if [ "$status" = 0 ]; then
        failures=0
        if [ -n "$added" ]; then
            log "repaired ($why): put back ${added//$'\n'/; }"
        else
            log "checked ($why): nothing was missing"
        fi
    else
        failures=$((failures + 1))
        if [ "$failures" -ge "$RETRIES" ]; then
            log "gave up after $failures failed restores ($why); waiting for the next event"
            failures=0
        else
            log "will try again in 1 s ($why)"
        fi
    fi
}

read_scripts

# -o: one line per event. The restore only adds what is missing and replaces
# routes in place: it deletes nothing, so it never triggers itself.
exec {monitor}< <(exec ip -o monitor link address route rule)
monitor_pid=$!
# ip monitor goes with the watcher, however it is stopped.
trap 'kill "$monitor_pid" 2>/dev/null' EXIT
trap 'exit 0' TERM INT HUP
# The links' and addresses' state now, read once ip monitor listens (it
# subscribes within milliseconds of starting): a change made meanwhile is
# in this state or among the events, never lost between them.
sleep 0.2
while IFS= read -r line; do
    link_state "$line"
    up[$name]=$is_up
done < <(ip -o link show)
while IFS= read -r line; do
    address_of "${line//$'\t'/ }"
    [ "$usable" = 0 ] || known["$name $addr"]=1
done < <(ip -o address show)
log "watching ${scripts[*]}: interfaces ${!devs[*]}; protocol ids ${!protos[*]}"
while true; do
    if [ "$failures" -gt 0 ]; then
        IFS= read -r -t 1 -u "$monitor" line
    else
        IFS= read -r -u "$monitor" line
    fi
    status=$?
    if [ "$status" -gt 128 ]; then # timed out: the retry after a failed restore
        restore "retry"
        continue
    fi
    [ "$status" = 0 ] || { log "ip monitor ended"; exit 1; }
    reasons=()
    read_scripts
    classify "$line"
    [ ${#reasons[@]} -gt 0 ] || continue
    # Debounce: gather the burst until $debounce s pass without an event, for
    # up to 1 s (a whole-second clock) and 1000 events at most (a host whose
    # routes never stop changing).
    start=$SECONDS gathered=0
    while ((SECONDS - start < 1 && gathered < 1000)) &&
        IFS= read -r -t "$debounce" -u "$monitor" line; do
        classify "$line"
        gathered=$((gathered + 1))
    done
    if [ ${#reasons[@]} -gt 0 ]; then
        why=$(printf '%s\n' "${reasons[@]}" | sort -u | paste -sd ',' | sed 's/,/, /g')
        restore "$why"
    fi
done
"""
