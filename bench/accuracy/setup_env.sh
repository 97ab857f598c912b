#!/usr/bin/env bash
# The accuracy benchmark's own environment: delsketch + the peer libraries, never the package's dependencies.
# Usage (from the repository root): bash bench/accuracy/setup_env.sh
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENV="$HERE/.venv"
python3 -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q torch==2.13.0                       # first: the CPU build; anything later must not replace it
"$PIP" install -q -e "$ROOT"
"$PIP" install -q captum==0.9.0 dattri==0.3.0
# kronfluence requires torchvision, which would pull a CUDA torch (there is no CPU torchvision here) and which
# kronfluence does not use for nn.Linear models: install it without dependencies, then what it really imports
"$PIP" install -q --no-deps kronfluence==1.0.1
"$PIP" install -q "accelerate>=0.31.0" "einops>=0.8.0" "einconv>=0.1.0" "opt-einsum>=3.3.0"
"$VENV/bin/python" -c "import torch, captum, dattri, kronfluence, delsketch; print('peers ok; torch', torch.__version__)"
