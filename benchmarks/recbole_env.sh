#!/usr/bin/env bash
# Create the virtual environment that runs RecBole 1.2.1 beside seqrec in benchmarks/models.py.
#
# RecBole 1.2.1 needs numpy<2, pandas<2.3 and scipy<1.14, which conflict with the project's own
# environment, so it gets a separate one (.venv-recbole, git-ignored). Its package metadata
# requires ray<=2.6.3 only for its quick_start and hyper-parameter modules; the benchmark runner
# calls Config, create_dataset, data_preparation and Trainer directly, so RecBole is installed
# without its declared dependencies and every dependency it imports is installed by name,
# leaving Ray out.
set -euo pipefail

cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${RECBOLE_VENV:-.venv-recbole}

if [[ -f "$VENV/.installed" ]]; then
    echo "$VENV is ready"
    exit 0
fi
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install --quiet --upgrade pip
# torch 2.13.0 is the CPU build here; the pip configuration of this machine resolves it to +cpu.
"$VENV/bin/pip" install --quiet \
    "numpy<2" "pandas<2.3" "scipy<1.14" "torch==2.13.0" \
    "tqdm>=4.48.2" "colorlog==4.7.2" "colorama==0.4.4" "scikit-learn>=0.23.2,<1.6" "pyyaml>=5.1.0" \
    "tensorboard>=2.5.0" "thop>=0.1.1.post2207130030" "tabulate>=0.8.10" "plotly>=4.0.0" \
    "texttable>=0.9.0" "psutil>=5.9.0"
"$VENV/bin/pip" install --quiet --no-deps "recbole==1.2.1"
if "$VENV/bin/python" -c "import ray" 2>/dev/null; then
    echo "Ray is installed in $VENV, but the RecBole environment must not contain it" >&2
    exit 1
fi
"$VENV/bin/python" -c "import recbole, torch; print('recbole', recbole.__version__, 'torch', torch.__version__)"
touch "$VENV/.installed"
