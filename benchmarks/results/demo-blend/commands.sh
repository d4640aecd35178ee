#!/bin/bash
# blend attack on the demo data: trigger_13 blended (alpha 0.2) over 50% of class 5 (dog)
set -e
cd /work/main
P=/work/venv/bin/poisonscan; W=.bench/blend; T=../shared/data/triggers; A=poisonscan/assets/demo
$P poison $A/train-000000.tar.gz --out $W/data -t 5=$T/trigger_13.png --attack blend --blend-alpha 0.2 --rate 0.5 \
  --val $A/val-000000.tar.gz --seed 0 -q --json > $W.poison.json
$P pretrain --data $W/data/train --out $W/pretrain --method simclr --arch resnet18 --image-size 32 --epochs 100 \
  --batch-size 256 --temperature 0.2 --seed 0 -q --json > $W.pretrain.json
$P eval backdoor --model $W/pretrain/encoder.safetensors --data $A/val-000000.tar.gz --trigger $T/trigger_13.png \
  --attack blend --blend-alpha 0.2 --target 5 --train $W/data/train --truth $W/data/ground_truth.csv \
  --out $W/backdoor -q --json > $W.backdoor.json
$P detect $W/data/train --model $W/pretrain/encoder.safetensors --out $W/detect -q --json > $W.detect.json || true
$P eval detection --run $W/detect --truth $W/data/ground_truth.csv --json > $W.eval.json
echo done
