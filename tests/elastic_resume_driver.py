"""Run by tests/test_elastic_resume.py, under the deepspeed launcher or as rank 0 of 1: builds the
pre-training job, and when it resumes from a checkpoint folder (train.resume=<tag folder>), writes what the
engine holds right after the restore to <output_dir>/restored.json (rank 0) before training on:

    deepspeed --num_gpus 3 tests/elastic_resume_driver.py --config tiny_stage1 --set train.resume=... ...

restored.json: the largest difference between the restored full fp32 weights / Adam moments / teacher
and the checkpoint's safetensors, the moment names on both sides, the Adam step, the next learning rate
the update count, rank 0's torch RNG state and its running CLS-target centre, next to the checkpoint's values.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from jobs.train import checkpointing
from jobs.train.config import add_config_arguments, config_from_args
from jobs.pretrain import Pretrainer
from jobs.train.lifecycle import end_rank_process


def largest_difference(got: dict, want: dict) -> float:
    return max((got[k].float() - want[k].float()).abs().max().item() for k in want)


def report(trainer: Pretrainer, folder: Path) -> dict | None:
    rng = torch.get_rng_state().tolist()
    weights = checkpointing.full_fp32_state(trainer.engine.module)  # collectives: every rank
    moments = checkpointing.full_moments(trainer.engine)
    scalars = checkpointing.optimizer_scalars(trainer.engine, trainer.scheduler)
    if trainer.rank != 0:
        return None
    saved = checkpointing.read_run_state(folder)
    saved_moments = load_file(str(folder / checkpointing.OPTIMIZER_FILE))
    teacher = {k: v.cpu() for k, v in trainer.model.teacher.state_dict().items()}
    return {
        "weights": largest_difference(weights, load_file(str(folder / checkpointing.STUDENT_FILE))),
        "moments": largest_difference(moments, saved_moments),
        "moment_names": [sorted(moments), sorted(saved_moments)],
        "teacher": largest_difference(teacher, load_file(str(folder / checkpointing.TEACHER_FILE))),
        "adam_step": [scalars["adam_step"], saved["optimizer"]["adam_step"]],
        "group_lrs": [scalars["group_lrs"], saved["optimizer"]["group_lrs"]],
        "scheduler_epoch": [scalars["scheduler"]["last_epoch"], saved["optimizer"]["scheduler"]["last_epoch"]],
        "updates": [trainer.state.updates, saved["updates"]],
        "rng_rank0": rng == saved["rng"][0]["torch"],
        "utterance_centre": [trainer.model.utterance_centre.state(), saved["utterance_centre"]],
        "elastic": trainer.elastic,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    add_config_arguments(parser)
    config = config_from_args(parser.parse_args())
    logging.basicConfig(level=logging.INFO)
    try:
        trainer = Pretrainer(config)
        resume = Path(config.train.resume)
        if checkpointing.TAG_PATTERN.match(resume.name):
            restored = report(trainer, resume)
            if restored is not None:
                (Path(config.train.output_dir) / "restored.json").write_text(json.dumps(restored))
        try:
            return trainer.run()
        finally:
            trainer.trace.close()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    end_rank_process(main())
