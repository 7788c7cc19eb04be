#!/usr/bin/env bash
# Replay against the parse floor, side by side: the same JSON Lines file through
# `qoder-exporter replay` (a fresh state file each run, commits with synchronous=FULL, the
# metrics rendered) and through `parse_only … value` (one serde_json::Value per line, nothing
# else), alternating, for several rounds. Prints every run, the medians, and each exporter's
# ratio: the parse's median time over the replay's (1.0 or more: replay is at least as fast as
# merely parsing its input).
#
# Usage: scripts/bench-replay.sh [-n ROUNDS] [-f FILE] [EXPORTER...]
#   ROUNDS    rounds of the whole set (default 5)
#   FILE      the input (default target/bench/events.jsonl, written by `gen_events 2000 40`)
#   EXPORTER  binaries to compare (default target/release/qoder-exporter), e.g. an older build
# Build first: cargo build --release --bins --examples
set -euo pipefail
cd "$(dirname "$0")/.."

rounds=5
file=target/bench/events.jsonl
while getopts "n:f:" opt; do
  case $opt in
    n) rounds=$OPTARG ;;
    f) file=$OPTARG ;;
    *) sed -n '2,13p' "$0" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
exporters=("$@")
[ ${#exporters[@]} -eq 0 ] && exporters=(target/release/qoder-exporter)
parse=target/release/examples/parse_only
for b in "${exporters[@]}" "$parse" target/release/examples/gen_events; do
  [ -x "$b" ] || { echo "$b: not built (cargo build --release --bins --examples)" >&2; exit 1; }
done
if [ ! -f "$file" ]; then
  mkdir -p "$(dirname "$file")"
  echo "writing $file (gen_events 2000 40)…" >&2
  target/release/examples/gen_events 2000 40 > "$file"
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
TIMEFORMAT='%R %U %S'
# One timed run: prints "wall cpu" (cpu = user + system).
timed() {
  local t
  t=$( { time "$@" > /dev/null 2> "$work/stderr"; } 2>&1 ) || { cat "$work/stderr" >&2; exit 1; }
  awk '{ printf "%.3f %.3f\n", $1, $2 + $3 }' <<< "$t"
}
median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{ a[NR] = $1 } END { print a[int((NR + 1) / 2)] }'; }

names=("${exporters[@]}" parse)
declare -A wall cpu
cat "$file" > /dev/null  # into the page cache: the first round is not a disk read
for ((i = 1; i <= rounds; i++)); do
  for b in "${exporters[@]}"; do
    rm -f "$work"/state.db*
    read -r w c < <(timed "$b" replay --state.path "$work/state.db" "$file")
    wall[$b]+=" $w"; cpu[$b]+=" $c"
    echo "round $i  $b  replay  ${w} s (cpu ${c} s)"
  done
  read -r w c < <(timed "$parse" "$file" value)
  wall[parse]+=" $w"; cpu[parse]+=" $c"
  echo "round $i  parse_only … value  ${w} s (cpu ${c} s)"
done

echo
echo "$(wc -l < "$file") lines, $rounds rounds, medians:"
pm=$(median <<< "${wall[parse]}")
for b in "${names[@]}"; do
  m=$(median <<< "${wall[$b]}")
  line="  $b: wall $m s, cpu $(median <<< "${cpu[$b]}") s"
  [ "$b" != parse ] && line+=", ratio $(awk -v p="$pm" -v r="$m" 'BEGIN { printf "%.2f", p / r }')"
  echo "$line"
done
