#!/usr/bin/env bash
# One GPU check of the training side, <= 10 minutes on one H100/H200 (the project's `device` tool):
#
#   1. install the training stack from carried wheels (the device image has torch + torchaudio only);
#   2. benchmarks.zero_step: the bf16 ZeRO-2 ViT-B stage-2 step (DeepSpeed engine, EMA) at micro-batch 12, 24, 48,
#      eager and compiled: clips/s, MFU, peak memory;
#   3. benchmarks.vit_reference: a plain PyTorch ViT-B forward/backward of the same token counts, same run;
#   4. benchmarks.precision_check: bf16 against fp32 loss on one batch;
#   5. 100 updates of jobs/pretrain.py through the deepspeed launcher on the carried shard set (loss falls, data
#      wait <= 5% after the first log interval);
#   6. benchmarks.gpu_check_summary: one JSON line for the launch, then one summary JSON line of everything.
#
# Every step writes its JSON lines under the output folder ($OUT on the device machine). Prepare the carried
# inputs once, on a machine with network and the project's venv (it needs Ray for the shards):
#
#   bash benchmarks/gpu_check.sh --prepare               # -> data/gpu-check/{wheels,shards}, each size-checked
#
# The device tool carries at most 64 MiB a call and pyarrow's wheel alone is 48 MiB, so two calls on the same
# warm machine (what a call installs and the ignored paths it carried stay there until the machine goes back):
#
#   run command="bash benchmarks/gpu_check.sh --install-only" carry=["data/gpu-check/wheels"] timeout_s=180
#   run command="bash benchmarks/gpu_check.sh --no-install"   carry=["data/gpu-check/shards"] timeout_s=540
#
# Options:
#   --prepare              build data/gpu-check (wheels + shards) here instead of running the check
#   --dry-run              print the plan (every command) and exit 0; needs no GPU, wheels or shards
#   --install-only         install from the wheels and stop (first device call)
#   --no-install           the stack is installed already (second device call)
#   --wheels DIR           wheels to install from (default data/gpu-check/wheels)
#   --shards DIR           shard set for the launch (default data/gpu-check/shards)
#   --out DIR              output folder (default $OUT, else gpu-check-out)
#   --micro-batches LIST   comma-separated clean clips per step (default 12,24,48)
#   --updates N            updates of the launch (default 100, at least 20)
#   --steps N              timed steps per benchmark line (default 10)
#   --python-version X.Y   --prepare: the device image's Python, for binary wheels (default 3.11)
# Exit codes: 0 all checks passed (or dry run / prepare done); 1 a check failed; 2 bad arguments or inputs;
# 3 no CUDA device.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
python=${PYTHON:-python3}
wheels=data/gpu-check/wheels
shards=data/gpu-check/shards
out=${OUT:-gpu-check-out}
micro_batches=12,24,48
updates=100
steps=10
python_version=3.11
dry_run=0
prepare=0
install=1
check=1
carry_limit_mib=60  # the device tool carries at most 64 MiB; leave room for the working tree itself

# The training stack the device image lacks (pins of pyproject.toml; deepspeed's and webdataset's dependencies).
# torch and numpy come with the image and are not carried.
train_requirements=(deepspeed==0.19.8 webdataset==1.0.2 pyarrow==25.0.1 "pyyaml>=6,<7" "safetensors>=0.6,<0.9"
                    "fsspec>=2025.1" "psutil>=7,<8" "tqdm>=4.66,<5")
deepspeed_dependencies=(hjson ninja packaging py-cpuinfo "pydantic>=2" pydantic-core annotated-types
                        typing-inspection typing-extensions msgpack nvidia-ml-py einops braceexpand)

usage() {
    sed -n '2,37p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
}

fail() {  # fail CODE MESSAGE
    echo "gpu_check.sh: $2" >&2
    exit "$1"
}

while [[ $# -gt 0 ]]; do
    case $1 in
        --dry-run) dry_run=1 ;;
        --prepare) prepare=1 ;;
        --install-only) check=0 ;;
        --no-install) install=0 ;;
        --wheels | --shards | --out | --micro-batches | --updates | --steps | --python-version)
            [[ $# -ge 2 && -n $2 ]] || { usage; fail 2 "$1 needs a value"; }
            case $1 in
                --wheels) wheels=$2 ;;
                --shards) shards=$2 ;;
                --out) out=$2 ;;
                --micro-batches) micro_batches=$2 ;;
                --updates) updates=$2 ;;
                --steps) steps=$2 ;;
                --python-version) python_version=$2 ;;
            esac
            shift
            ;;
        -h | --help) usage; exit 0 ;;
        *) usage; fail 2 "unknown argument: $1" ;;
    esac
    shift
done

[[ $micro_batches =~ ^[1-9][0-9]*(,[1-9][0-9]*)*$ ]] ||
    fail 2 "--micro-batches must be positive integers separated by commas, got '$micro_batches'"
[[ $updates =~ ^[1-9][0-9]*$ ]] && (( updates >= 20 )) ||
    fail 2 "--updates must be an integer >= 20 (the loss check compares the first and last ten), got '$updates'"
[[ $steps =~ ^[1-9][0-9]*$ ]] || fail 2 "--steps must be a positive integer, got '$steps'"
[[ $python_version =~ ^3\.[0-9]+$ ]] || fail 2 "--python-version must look like 3.11, got '$python_version'"

# The launch: base_stage2's model and training recipe (ViT-B, stage 2, K = 8, bf16, ZeRO-2) on the sample-shaped
# shard set, one micro-batch of 12 per update, no stage-1 checkpoint, no MLflow.
launch_sets=()
for override in "data.loader.shards=$shards" data.loader.split=train data.loader.micro_batch_clips=12 \
    data.loader.num_workers=8 data.loader.shuffle_buffer=64 \
    data.audio.target_length=512 data.audio.mel_bins=64 model.target_length=512 model.mel_bins=64 \
    data.mixing.mixture_epochs=1 data.mixing.materialize_mixtures=false train.clips_per_update=0 \
    train.gradient_accumulation=1 train.init_from= "train.max_updates=$updates" train.warmup_updates=10 \
    train.peak_lr=0.0002 train.log_interval=10 train.checkpoint_interval=100000 "train.output_dir=$out/launch/run" \
    tracking.enabled=false; do
    launch_sets+=(--set "$override")
done
# The shard set those overrides read: `sslam make-sample-data` audio, preprocessed by jobs.preprocess (Ray).
# 660 train clips x 64 KiB of float16 fbank (512 x 64), mixtures formed by the loader: about 45 MiB, i.e. ~55
# micro-batches of 12 an epoch, so 100 updates restart the loader once.
audio=data/gpu-check/audio
sample_sets=(--set data.synth.train_clips=660 --set data.synth.eval_clips=12)
preprocess_sets=(
    "${sample_sets[@]}" --set data.mixing.mixture_epochs=1 --set data.mixing.materialize_mixtures=false
    --set "data.shards.output=$shards" --set "data.source.audio_root=$audio/audio"
    --set "data.source.class_labels_csv=$audio/class_labels_indices.csv"
    --set "data.source.splits=[{name: train, csv: $audio/balanced_train_segments.csv, mix: true}, {name: eval, csv: $audio/eval_segments.csv, mix: false}]"
)

# In a dry run every command is printed (shell-quoted) instead of run.
show() { printf '%q ' "$@"; printf '\n'; }
run() { if (( dry_run )); then show "$@"; else "$@"; fi; }
run_into() {  # run_into FILE.jsonl COMMAND...: JSON lines appended to FILE, the log next to it
    local file=$1
    shift
    if (( dry_run )); then show "$@"; echo "    >> $file"; return 0; fi
    "$@" >>"$file" 2>"${file%.jsonl}.log"
}
started=$SECONDS
step() { echo "gpu_check.sh: [$((SECONDS - started)) s] $*" >&2; }

if (( ! dry_run )); then
    cd "$repo"
fi
export PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH}

if (( prepare )); then
    step "prepare data/gpu-check (network, Ray)"
    run rm -rf "$wheels" "$shards" "$audio"
    run mkdir -p "$wheels"
    run env DS_BUILD_OPS=0 "$python" -m pip wheel --no-deps -w "$wheels" deepspeed==0.19.8  # an sdist: built, no ops
    run "$python" -m pip download --no-deps --only-binary=:all: --python-version "$python_version" \
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
        -d "$wheels" "${train_requirements[@]:1}" "${deepspeed_dependencies[@]}"
    run "$python" -m jobs.cli make-sample-data "$audio" "${sample_sets[@]}"
    run "$python" -m jobs.preprocess --config sample "${preprocess_sets[@]}"
    run rm -rf "$audio"
    if (( dry_run )); then show du -sm "$wheels" "$shards"; exit 0; fi
    for carried in "$wheels" "$shards"; do
        size_mib=$(du -sm "$carried" | cut -f1)
        step "prepared $carried: ${size_mib} MiB"
        (( size_mib <= carry_limit_mib )) ||
            fail 2 "$carried is ${size_mib} MiB, more than the ${carry_limit_mib} MiB one device call can carry"
    done
    exit 0
fi

(( install || check )) || fail 2 "--install-only and --no-install together leave nothing to do"
if (( ! dry_run )); then
    if (( install )); then
        compgen -G "$wheels/deepspeed-*.whl" >/dev/null ||
            fail 2 "no deepspeed wheel in '$wheels' (missing wheels directory?): prepare it first with
    bash benchmarks/gpu_check.sh --prepare     and carry $wheels"
    else
        "$python" -c 'import deepspeed, webdataset, pyarrow' 2>/dev/null ||
            fail 2 "--no-install, but deepspeed/webdataset/pyarrow do not import: run --install-only first"
    fi
    if (( check )); then
        [[ -f $shards/dataset.json ]] ||
            fail 2 "no shard set at '$shards' (no dataset.json): prepare it first with bash benchmarks/gpu_check.sh --prepare"
    fi
    "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' ||
        fail 3 "no CUDA device visible to torch: this check runs on one GPU (use --dry-run to see the plan)"
    if (( check )); then
        mkdir -p "$out/launch"
        : >"$out/zero_step.jsonl"
        : >"$out/vit_reference.jsonl"
        : >"$out/precision_check.jsonl"
    fi
fi

if (( install )); then
    step "install from $wheels"
    run "$python" -m pip install --quiet --no-index --find-links "$wheels" "${train_requirements[@]}"
fi
(( check )) || exit 0

# A failing benchmark is reported and the check goes on; its missing lines fail the summary.
step "ZeRO-2 step, micro-batches $micro_batches, eager and compiled"
run_into "$out/zero_step.jsonl" "$python" -m benchmarks.zero_step --micro-batches "$micro_batches" \
    --modes eager,compiled --steps "$steps" || step "zero_step failed (see $out/zero_step.log)"
step "plain ViT-B reference, same token counts"
run_into "$out/vit_reference.jsonl" "$python" -m benchmarks.vit_reference --micro-batches "$micro_batches" \
    --modes eager,compiled --steps "$steps" || step "vit_reference failed (see $out/vit_reference.log)"
step "bf16 against fp32 on one batch"
run_into "$out/precision_check.jsonl" "$python" -m benchmarks.precision_check --clips 12 ||
    step "precision_check failed or exceeded its tolerance (see $out/precision_check.log)"

step "launch: $updates updates through the deepspeed launcher"
# The `deepspeed` launcher, through the interpreter (its console script may not be on PATH in the image).
launch=("$python" -m deepspeed.launcher.runner --num_gpus 1 --master_port $((20000 + RANDOM % 10000))
        jobs/pretrain.py --config base_stage2 "${launch_sets[@]}")
if (( dry_run )); then
    show "${launch[@]}"
    echo "    > $out/launch/train.log"
else
    status=0
    "${launch[@]}" >"$out/launch/train.log" 2>&1 || status=$?
    echo "$status" >"$out/launch/exit_code"
    cp "$out/launch/run/metrics.jsonl" "$out/launch/metrics.jsonl" 2>/dev/null || true
    rm -rf "$out/launch/run/checkpoints"  # GBs of ZeRO state: not worth carrying back
    cat "$out/zero_step.jsonl" "$out/vit_reference.jsonl" "$out/precision_check.jsonl"
fi

step "summary"
if (( dry_run )); then
    show "$python" -m benchmarks.gpu_check_summary "$out" --updates "$updates" --max-data-wait 0.05
    exit 0
fi
"$python" -m benchmarks.gpu_check_summary "$out" --updates "$updates" --max-data-wait 0.05 | tee "$out/summary.jsonl"
exit "${PIPESTATUS[0]}"
