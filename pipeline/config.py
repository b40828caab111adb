"""Typed configuration of the data pipeline: front-end, sources, mixtures, shards, loader, sample data.

Only dataclasses live here; `jobs.train.config` composes them with the model's and loads YAML.
Every shape the pipeline produces (clip length, mel bins, group size) comes from these fields. Enum fields are
`Literal`s and numeric bounds are field metadata (`ge`, `gt`, `le`, `lt`); `jobs.train.config` checks both at load.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class AudioConfig:
    """Front-end of SSLAM_SPEC §1: 16 kHz mono, Kaldi fbank, head crop / zero pad in log-mel."""

    sample_rate: int = field(default=16000, metadata={"ge": 1})
    mel_bins: int = field(default=128, metadata={"ge": 1})
    target_length: int = field(default=1024, metadata={"ge": 1})
    frame_length_ms: float = field(default=25.0, metadata={"gt": 0})
    frame_shift_ms: float = field(default=10.0, metadata={"gt": 0})
    # Reference: clips under 10,000 samples at 16 kHz are skipped (§1.1, §14.8).
    min_duration_s: float = field(default=0.625, metadata={"ge": 0})
    # Sample rates outside this range are treated as corrupt headers ("absurd sample rate").
    min_sample_rate: int = field(default=1000, metadata={"ge": 1})
    max_sample_rate: int = field(default=384000, metadata={"ge": 1})


@dataclass
class SplitConfig:
    """One split of a source: its CSV (AudioSet segments or `path,labels`) and whether it is mixed."""

    name: str = "train"
    csv: str = ""
    mix: bool = True


@dataclass
class SourceConfig:
    """Where clips come from: AudioSet CSVs + an audio root, or a plain folder of audio."""

    kind: Literal["audioset", "folder"] = "audioset"
    # Folder sources: set, every audio file under it is scanned; empty, only the files the splits' CSVs list
    # are read, by absolute path or relative to `audio_roots` (in order), then the CSV's folder.
    audio_root: str = ""
    audio_roots: list[str] = field(default_factory=list)
    class_labels_csv: str = ""
    # File name of a segment below audio_root; {ext} is discovered among `extensions`.
    filename_pattern: str = "{ytid}.{ext}"
    # Empty: every extension of a format the installed decoder reads (pipeline.manifest.decodable_extensions:
    # wav, flac, ogg, mp3 first, then aiff, au, caf, opus, w64, ...).
    extensions: list[str] = field(default_factory=list)
    splits: list[SplitConfig] = field(default_factory=list)


@dataclass
class MixingConfig:
    """Mixture groups and no-mix windows (DESIGN.md; SSLAM_SPEC §9.1, §9.5, §14.1-14.3)."""

    group_size: int = field(default=3, metadata={"ge": 2})
    domain: str = "logmel_max"  # a name registered in pipeline.mixers.MIXERS (checked at config load)
    waveform_gain: float = field(default=1.0, metadata={"gt": 0})
    materialize_mixtures: bool = True
    mix_padding: Literal["zero", "silence"] = "zero"  # "zero" is the reference's; "silence" pads with the log floor
    mixture_epochs: int = field(default=1, metadata={"ge": 1})
    # Rows per no-mix window; 0 means max(1, floor(15 * Tp / 64)).
    nomix_rows: int = field(default=0, metadata={"ge": 0})


@dataclass
class ShardConfig:
    """Output of the preprocessing job."""

    output: str = "data/shards"
    groups_per_shard: int = field(default=64, metadata={"ge": 1})
    clips_per_eval_shard: int = field(default=256, metadata={"ge": 1})
    seed: int = field(default=1, metadata={"ge": 0})
    # Resume trusts a local shard whose size matches its record (publishing is an atomic rename); true re-hashes
    # every local shard against its recorded sha256 first, i.e. reads the whole output once.
    verify_checksums_on_resume: bool = False
    # Resume redoes a shard when a source file's size or mtime differs from its record; true also records and
    # compares each source file's sha256, i.e. reads every audio file again on resume.
    hash_sources_on_resume: bool = False
    # A class of a split that loses more than this share of its manifest clips to quarantine is a warning
    # (preprocessing summary, dataset.json `class_coverage`, `sslam inspect`).
    warn_class_loss_share: float = field(default=0.5, metadata={"ge": 0, "le": 1})


@dataclass
class LoaderConfig:
    """WebDataset input for training and evaluation."""

    shards: str = "data/shards"
    split: str = "train"
    micro_batch_clips: int = field(default=12, metadata={"ge": 1})
    num_workers: int = field(default=2, metadata={"ge": 0})
    shuffle_buffer: int = field(default=256, metadata={"ge": 0})  # 0 and 1: no shuffling
    seed: int = field(default=1, metadata={"ge": 0})


@dataclass
class SynthConfig:
    """The generated AudioSet-like sample dataset (pipeline.synth)."""

    train_clips: int = field(default=240, metadata={"ge": 1})
    eval_clips: int = field(default=60, metadata={"ge": 1})
    num_classes: int = field(default=12, metadata={"ge": 1})
    broken_files: bool = True
    seed: int = field(default=0, metadata={"ge": 0})
    # "sample": tonal events in 1-12 s clips; "events": one percussive / speech-like class per clip, 0.7-10 s.
    profile: Literal["sample", "events"] = "sample"


@dataclass
class DataConfig:
    audio: AudioConfig = field(default_factory=AudioConfig)
    source: SourceConfig = field(default_factory=SourceConfig)
    mixing: MixingConfig = field(default_factory=MixingConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
