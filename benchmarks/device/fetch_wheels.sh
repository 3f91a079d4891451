#!/bin/bash
# Run on a machine with a package index, from the repository root, before
# run_checks.sh: downloads the pure-Python wheels a GPU machine without one needs into
# .whl/ (git-ignored), pinned to the versions CI tests against. ~0.8 MB; copy .whl/
# along with the checkout.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .whl \
    skorch==1.4.0 ivon-opt==0.1.3 laplace-torch==0.3 curvlinops-for-pytorch==3.0.1 \
    backpack-for-pytorch==1.7.1 einconv==0.1.0 unfoldNd==0.2.3 asdfghjkl==0.1a4
ls .whl
