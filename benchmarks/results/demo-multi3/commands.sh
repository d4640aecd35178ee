#!/bin/bash
# three targets on the demo data: trigger_10 -> 0 airplane, trigger_12 -> 3 cat, trigger_14 -> 7 horse,
# 50% of each class (750 poisons, 15% of the data)
set -e
cd /work/main
P=.venv/bin/poisonscan; W=.bench/multi3; T=../shared/data/triggers; A=poisonscan/assets/demo
mkdir -p $W
$P poison $A/train-000000.tar.gz --out $W/data -t 0=$T/trigger_10.png -t 3=$T/trigger_12.png \
  -t 7=$T/trigger_14.png --rate 0.5 --trigger-size 8 --margin 0.25 --val-margin 0.1 --val $A/val-000000.tar.gz \
  --seed 0 -q --json > $W.poison.json
$P pretrain --data $W/data/train --out $W/pretrain --method simclr --arch resnet18 --image-size 32 --epochs 100 \
  --batch-size 256 --temperature 0.2 --seed 0 -q --json > $W.pretrain.json
for t in "0 trigger_10" "3 trigger_12" "7 trigger_14"; do set -- $t
  $P eval backdoor --model $W/pretrain/encoder.safetensors --data $A/val-000000.tar.gz --trigger $T/$2.png \
    --target $1 --train $W/data/train --truth $W/data/ground_truth.csv --trigger-size 8 --out $W/backdoor-$1 \
    -q --json > $W.backdoor-$1.json
done
$P detect $W/data/train --model $W/pretrain/encoder.safetensors --out $W/detect -q --json > $W.detect.json || true
$P eval detection --run $W/detect --truth $W/data/ground_truth.csv --json > $W.eval.json
echo done
