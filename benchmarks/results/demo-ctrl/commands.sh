#!/bin/bash
# CTRL (spectral chroma trigger) on the demo data: 50% of class 0 (airplane, CTRL's CIFAR-10 target)
set -e
cd /work/main
P=.venv/bin/poisonscan; W=.bench/ctrl; A=poisonscan/assets/demo
mkdir -p $W
$P poison $A/train-000000.tar.gz --out $W/data -t 0 --attack ctrl --rate 0.5 --val $A/val-000000.tar.gz --seed 0 \
  -q --json > $W.poison.json
$P pretrain --data $W/data/train --out $W/pretrain --method simclr --arch resnet18 --image-size 32 --epochs 100 \
  --batch-size 256 --temperature 0.2 --seed 0 -q --json > $W.pretrain.json
$P eval backdoor --model $W/pretrain/encoder.safetensors --data $A/val-000000.tar.gz --attack ctrl --target 0 \
  --train $W/data/train --truth $W/data/ground_truth.csv --out $W/backdoor -q --json > $W.backdoor.json
$P detect $W/data/train --model $W/pretrain/encoder.safetensors --out $W/detect -q --json > $W.detect.json || true
$P eval detection --run $W/detect --truth $W/data/ground_truth.csv --json > $W.eval.json
echo done
