#!/usr/bin/env bash
# make-models.sh: regenerate every model this repository ships.
#   test fixtures  -> testdata/models/*          (seconds, deterministic)
#   demo models    -> models/demo-base, models/demo-sr  (data prep, 18 min of training for
#                     both at once, 20 more for demo-sr, export, sample grid, evaluation table)
# Needs Debian's python3-torch, numpy, PIL, onnx, yaml and the image packages listed in
# models/SOURCES.md; installs them with apt-get when missing. CI does not run this.
#
#   tools/make-models.sh                 # everything
#   tools/make-models.sh fixtures        # only the test fixtures
#   TRAIN_MINUTES=18 TESSERA_DATA=/tmp/tessera-data tools/make-models.sh demos
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
PY=/usr/bin/python3
export TESSERA_DATA="${TESSERA_DATA:-/tmp/tessera-data}"
TRAIN_MINUTES="${TRAIN_MINUTES:-18}"
SR2_MINUTES="${SR2_MINUTES:-20}"
what="${1:-all}"

need=()
$PY -c 'import torch' 2>/dev/null || need+=(python3-torch)
$PY -c 'import numpy' 2>/dev/null || need+=(python3-numpy)
$PY -c 'import PIL' 2>/dev/null || need+=(python3-pil)
$PY -c 'import onnx' 2>/dev/null || need+=(python3-onnx)
$PY -c 'import yaml' 2>/dev/null || need+=(python3-yaml)
$PY -c 'import sentencepiece' 2>/dev/null || need+=(python3-sentencepiece)
if [ "$what" != fixtures ]; then
  [ -f /usr/lib/python3/dist-packages/skimage/data/astronaut.png ] || need+=(python3-skimage)
  [ -f /usr/share/backgrounds/seeding_by_Clements_Engelhardt.jpg ] || need+=(lomiri-wallpapers-16.04)
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "make-models: installing ${need[*]}"
  apt-get update
  DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
    python3-torch python3-numpy python3-pil python3-onnx "${need[@]}"
fi

if [ "$what" = all ] || [ "$what" = fixtures ]; then
  $PY tools/make_fixtures.py
  $PY tools/make_tokenizer_fixtures.py      # needs python3-sentencepiece
  $PY tools/make_autoencoder_fixtures.py
  $PY tools/sync_decoder.py testdata/autoencoders/kl-like/vae_decoder testdata/autoencoders/vq-like/vae_decoder \
    testdata/autoencoders/kl-like/vae_encoder
  $PY tools/make_family_fixtures.py         # copies the decoders into the latent pipelines
  $PY tools/make_latent_fixtures.py         # the latent oracles and sd-like (the KL-like autoencoder)
fi

if [ "$what" = all ] || [ "$what" = demos ]; then
  $PY tools/prep_data.py
  # the two trainings share the cores, one thread each
  nice $PY tools/train.py sr --minutes "$TRAIN_MINUTES" --threads 1 &
  sr=$!
  nice $PY tools/train.py base --minutes "$TRAIN_MINUTES" --threads 1 &
  base=$!
  wait "$sr"
  wait "$base"
  # second SR stage: continue from the first with both threads (the base is done)
  mv "$TESSERA_DATA/sr.pt" "$TESSERA_DATA/sr1.pt"
  nice $PY tools/train.py sr --minutes "$SR2_MINUTES" --threads 2 --lr 1e-3 \
    --init "$TESSERA_DATA/sr1.pt" --out sr
  $PY tools/export.py sr base
  $PY tools/sample_base.py
  $PY tools/eval_sr.py --sweep | tee "$TESSERA_DATA/eval_sr.md"
fi
