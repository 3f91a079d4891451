#!/usr/bin/env bash
# Build the documentation site into site/ with every warning an error.
#   bash docs/build.sh            # build (needs: pip install -e ".[docs]")
#   bash docs/build.sh --gallery  # first regenerate docs/gallery/*.png from examples/
set -euo pipefail
cd "$(dirname "$0")/.."
export NO_MKDOCS_2_WARNING=1
if [[ "${1:-}" == "--gallery" ]]; then
  for ex in quickstart ood_digits grid_search_prior regression_bands selective_prediction \
            cvp_vs_mc pretrained_model gpu conformal; do
    echo "gallery: examples/$ex.py"
    PYTHONPATH=. python "examples/$ex.py" --out "docs/gallery/$ex.png"
  done
fi
python -m mkdocs build --strict
