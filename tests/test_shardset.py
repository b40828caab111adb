"""pipeline.shardset owns dataset.json: what it writes the loader and inspect read back, and both refuse the same
broken geometry with the same message."""

import json

import pytest

from pipeline import storage
from pipeline.inspect import summarize
from pipeline.shard_source import ShardSource
from pipeline.shardset import DATASET_INFO, read_dataset_info, split_location, write_dataset_info

INFO = {"splits": {"train": {"mix": False, "shards_per_epoch": {"0": []}}}, "target_length": 64, "mel_bins": 16,
        "patch_size": 16}


def test_written_info_reads_back_from_the_folder_the_json_or_a_pattern(tmp_path):
    write_dataset_info(storage.locate(tmp_path), INFO)
    for location in (tmp_path, tmp_path / DATASET_INFO, f"{tmp_path}/train-*.tar"):
        assert read_dataset_info(str(location)) == INFO
    assert split_location(f"{tmp_path}/train-*.tar") == (str(tmp_path), "train-*.tar")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"patch_size": 0}, "'patch_size' must be a positive integer"),
        ({"mel_bins": True}, "'mel_bins' must be a positive integer"),
        ({"target_length": "64"}, "'target_length' must be a positive integer"),
        ({"target_length": 72}, "target_length is not a multiple of patch_size"),
        ({"splits": []}, "has no 'splits' mapping"),
    ],
)
def test_loader_and_inspect_refuse_a_broken_geometry_alike(tmp_path, change, message):
    (tmp_path / DATASET_INFO).write_text(json.dumps({**INFO, **change}))
    for reader in (read_dataset_info, ShardSource, summarize):
        with pytest.raises(ValueError, match=message):
            reader(str(tmp_path))


def test_a_pipe_location_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not a pipe"):
        read_dataset_info("pipe:cat x.tar")
