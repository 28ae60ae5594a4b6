#!/bin/bash
# Builds the seed corpora in fuzz/corpus/<target>/ from images made by QEMU's
# own tools, so the fuzzers start from what real images look like. The
# corpora are not committed: run this again to regenerate them.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
corpus=$here/corpus
for tool in qemu-img qemu-io python3; do
    command -v $tool >/dev/null || { echo "make-seeds: $tool is needed" >&2; exit 1; }
done
work=$(mktemp -d /tmp/qbm-seeds.XXXXXX)
trap 'rm -rf "$work"' EXIT
cd "$work"

create() { # name cluster_size refcount_bits size [more -o options]
    local name=$1 cs=$2 rb=$3 size=$4
    shift 4
    qemu-img create -q -f qcow2 -o "cluster_size=$cs,refcount_bits=$rb${1:+,$1}" "$name.qcow2" "$size"
}
add() { # image name granularity [--disable]
    qemu-img bitmap --add -g "$3" ${4:-} "$1.qcow2" "$2"
}
write() { # image offset length
    qemu-io -f qcow2 -c "write -P 0x5a $2 $3" "$1.qcow2" >/dev/null
}

# Every cluster size and refcount width, bitmaps of several granularities,
# enabled ones marked by QEMU's own writes, disabled ones left clean.
create empty512 512 16 1M
create c512-r1 512 1 1M
add c512-r1 a 512
add c512-r1 b 4096
add c512-r1 frozen 65536 --disable
write c512-r1 0 64k
write c512-r1 300k 5k

create c4096-r16 4096 16 4M
add c4096-r16 fine 512
add c4096-r16 mid 16384
write c4096-r16 0 64k
add c4096-r16 late 65536
write c4096-r16 1M 4k
qemu-img bitmap --disable c4096-r16.qcow2 mid

create c65536-r64 65536 64 16M
add c65536-r64 g64k 65536
add c65536-r64 g1m 1048576 --disable
write c65536-r64 0 64k

# Fully dirty bitmap clusters: zero writes mark the bitmap but allocate
# no data, so the image stays small.
create ones512 512 8 4M
add ones512 all 512
qemu-io -f qcow2 -c 'write -z 0 2M' ones512.qcow2 >/dev/null

for rb in 2 4 32; do
    create c4096-r$rb 4096 $rb 1M
    add c4096-r$rb x 4096
    write c4096-r$rb 4k 8k
done

# v2 cannot hold bitmaps; qemu-img refuses to add one.
create v2 4096 16 1M compat=0.10
write v2 0 4k

# A backing file name and format extension in cluster 0.
create base 4096 16 1M
qemu-img create -q -f qcow2 -o cluster_size=4096 -b base.qcow2 -F qcow2 overlay.qcow2 1M
add overlay dirty 4096
write overlay 8k 4k

# A bitmap left in_use: QEMU killed while it had the image open read-write.
create inuse 4096 16 1M
add inuse live 4096
add inuse cold 4096 --disable
qemu-io -f qcow2 -c 'write 0 4k' -c 'sigraise 9' inuse.qcow2 >/dev/null 2>&1 || true

# Lazy refcounts, so the dirty bit gets set by an unclean exit.
create lazy 4096 16 1M lazy_refcounts=on
add lazy l 4096
qemu-io -f qcow2 -c 'write 0 4k' -c 'sigraise 9' lazy.qcow2 >/dev/null 2>&1 || true

# An external data file with the raw flag.
qemu-img create -q -f qcow2 -o cluster_size=4096,data_file=ext.raw,data_file_raw=on ext.qcow2 1M
add ext e 4096
write ext 0 4k

# Many bitmaps in one directory.
create many 512 16 1M
for i in $(seq 1 12); do add many "bitmap-$i" $((512 << (i % 8))); done
write many 0 16k

rm -rf "$corpus"
python3 "$here/extract_seeds.py" "$corpus" ./*.qcow2
for d in "$corpus"/*; do
    echo "make-seeds: $(ls "$d" | wc -l) seeds in ${d#"$here"/}"
done
