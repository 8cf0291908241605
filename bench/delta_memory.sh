#!/bin/bash
# What xdelta3 costs the server for a root of SIZE MiB with a source window of WINDOW MiB, run
# as catalog/deltagen.py runs it (nice, ionice -t, -e -9 -A -B to make; -d -B to check), for
# sizing the units' MemoryHigh/MemoryMax (bench/README.md, "delta_memory.sh").
#
#   bash bench/delta_memory.sh SIZE_MIB WINDOW_MIB [WORKDIR]
#
# The old root is random; the new one is the old with 1 MiB inserted at a third (everything
# after it shifts), 8 MiB rewritten at two thirds and 4 MiB appended. The files are kept in
# WORKDIR (default /var/tmp/lxd-image-server-delta-memory) for the next run.
set -euo pipefail
size=${1:?size in MiB}
window=${2:?window in MiB}
work=${3:-/var/tmp/lxd-image-server-delta-memory}
mkdir -p "$work"
cd "$work"
old=old-$size new=new-$size
if [ ! -f "$new" ]; then
    head -c "${size}M" /dev/urandom > "$old"
    third=$((size / 3))
    {
        head -c "${third}M" "$old"
        head -c 1M /dev/urandom
        tail -c "+$((third * 1048576 + 1))" "$old"
    } > "$new.tmp"
    dd if=/dev/urandom of="$new.tmp" bs=1M count=8 seek=$((size * 2 / 3)) conv=notrunc status=none
    head -c 4M /dev/urandom >> "$new.tmp"
    mv "$new.tmp" "$new"
fi
w=$((window << 20))
/usr/bin/time -f "make:  root ${size} MiB, window ${window} MiB: %e s, max RSS %M KiB" \
    nice -n 19 ionice -t -c 3 xdelta3 -e -9 -A -c -B "$w" -s "$old" < "$new" > "delta-$size"
echo "delta: $(stat -c %s "delta-$size") bytes"
/usr/bin/time -f "check: root ${size} MiB, window ${window} MiB: %e s, max RSS %M KiB" \
    nice -n 19 ionice -t -c 3 xdelta3 -d -c -B "$w" -s "$old" < "delta-$size" | cmp - "$new"
echo "rebuilt the new root exactly"
