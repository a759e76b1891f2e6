#!/usr/bin/env bash
# Fashion-MNIST (Xiao, Rasul, Vollgraf 2017; MIT licence) for tools/analysis/fashion_mnist_study.py.
#
# Uses the Debian/Ubuntu package dataset-fashion-mnist. If it is installed, its files are in
# /usr/share/datasets/fashion-mnist/ and nothing is done. Otherwise the .deb is downloaded with
# `apt-get download` (no installation, no root needed) and unpacked with `dpkg -x` into
# ${CBN_MMDET_CACHE:-~/.cache/cbn_mmdet}/fashion-mnist/, where cbn_mmdet.analysis.fashion_mnist finds it.
#
#   bash tools/misc/get_fashion_mnist.sh
set -euo pipefail

SYSTEM_DIR=/usr/share/datasets/fashion-mnist
CACHE_DIR="${CBN_MMDET_CACHE:-$HOME/.cache/cbn_mmdet}/fashion-mnist"
FILES="train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz"

have_all() {
    for f in $FILES; do [ -s "$1/$f" ] || return 1; done
}

if have_all "$SYSTEM_DIR"; then
    echo "get_fashion_mnist: installed system copy found: $SYSTEM_DIR"
    exit 0
fi
if have_all "$CACHE_DIR"; then
    echo "get_fashion_mnist: already unpacked: $CACHE_DIR"
    exit 0
fi
for tool in apt-get dpkg; do
    command -v "$tool" >/dev/null || { echo "get_fashion_mnist: '$tool' not found (needs a Debian/Ubuntu system)" >&2; exit 1; }
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "get_fashion_mnist: downloading the package dataset-fashion-mnist (about 31 MB)"
if ! (cd "$work" && apt-get download dataset-fashion-mnist); then
    echo "get_fashion_mnist: 'apt-get download dataset-fashion-mnist' failed; run 'apt-get update' (as root) or" \
         "install the package, then retry" >&2
    exit 1
fi
dpkg -x "$work"/dataset-fashion-mnist_*.deb "$work/root"
mkdir -p "$CACHE_DIR"
for f in $FILES; do
    src="$work/root$SYSTEM_DIR/$f"
    [ -s "$src" ] || { echo "get_fashion_mnist: the package has no $SYSTEM_DIR/$f" >&2; exit 1; }
    cp "$src" "$CACHE_DIR/$f"
done
copyright="$work/root/usr/share/doc/dataset-fashion-mnist/copyright"
[ -f "$copyright" ] && cp "$copyright" "$CACHE_DIR/copyright"
echo "get_fashion_mnist: unpacked into $CACHE_DIR"
