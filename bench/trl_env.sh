#!/usr/bin/env bash
# Create bench/.venv-trl: Hugging Face TRL for the peer benchmark (bench/trl_peer.py), kept apart from
# verl's own environment so TRL's dependency pins cannot disturb it.
#
#   bash bench/trl_env.sh            create the venv (skipped when it already has the pinned TRL)
#   TRL_VENV=DIR bash bench/trl_env.sh
#
# torch==2.13.0 is the CPU build the project's .venv uses; naming it exactly keeps pip from resolving
# TRL's torch requirement to a multi-GB CUDA build. transformers is pinned to the project's version
# so that the students TRL saves load in the project's venv for scoring.
set -euo pipefail

TRL_VERSION=1.16.0
TORCH_VERSION=2.13.0
TRANSFORMERS_VERSION=5.10.4
PYTHON=${PYTHON:-python3}
VENV=${TRL_VENV:-"$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/.venv-trl"}

if "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('trl') != '$TRL_VERSION')" 2>/dev/null; then
    echo "reusing $VENV (trl $TRL_VERSION)"
    exit 0
fi
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --disable-pip-version-check \
    "torch==$TORCH_VERSION" "trl==$TRL_VERSION" "transformers==$TRANSFORMERS_VERSION" pandas pyarrow
echo "created $VENV: $("$VENV/bin/python" -c 'import trl, torch, transformers; print(f"trl {trl.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")')"
