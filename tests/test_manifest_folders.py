"""pipeline.manifest folder sources that just work: every decodable extension by default, listed files under
several roots, clear misses."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile

from pipeline.clips import ManifestError
from pipeline.config import SourceConfig, SplitConfig
from pipeline.manifest import build_manifest, decodable_extensions
from test_manifest import run_bounded, write_audio

# ---------------------------------------------------------------------------------------------------------
# Folder sources that just work: every decodable extension, listed files under several roots, clear misses


def test_default_extensions_are_every_extension_the_decoder_reads(monkeypatch) -> None:
    extensions = decodable_extensions()
    assert extensions[:4] == ["wav", "flac", "ogg", "mp3"]
    assert {"aiff", "aif", "aifc", "au", "caf", "w64", "rf64", "opus", "oga", "sph"} <= set(extensions)
    assert "raw" not in extensions and len(extensions) == len(set(extensions))
    # Derived from soundfile.available_formats(), not a fixed list.
    monkeypatch.setattr(soundfile, "available_formats", lambda: {"WAV": "", "AIFF": "", "RAW": ""})
    assert decodable_extensions() == ["wav", "aif", "aifc", "aiff", "wave"]


def test_a_folder_of_aiff_au_caf_and_w64_files_is_read_with_the_default_extensions(tmp_path: Path) -> None:
    audio = tmp_path / "audio"
    for name, fmt in (("a.aiff", "AIFF"), ("b.aif", "AIFF"), ("c.au", "AU"), ("d.caf", "CAF"), ("e.w64", "W64")):
        audio.mkdir(exist_ok=True)
        soundfile.write(audio / name, np.zeros(1600, dtype=np.float32), 16000, format=fmt)
    (audio / "notes.txt").write_text("not audio")
    manifest, quarantine = build_manifest(SourceConfig(kind="folder", audio_root=str(audio)), probe_audio=True)
    assert manifest.column("key").to_pylist() == ["a", "b", "c", "d", "e"]
    assert manifest.column("duration_s").to_pylist() == [0.1] * 5
    assert quarantine.num_rows == 0


def test_a_listed_file_whose_extension_is_not_accepted_is_missing_naming_the_path_and_the_extensions(
    tmp_path: Path,
) -> None:
    audio = tmp_path / "audio"
    write_audio(audio / "song.aiff")
    (tmp_path / "labels.csv").write_text("path,labels\nsong.aiff,Music\n")
    source = SourceConfig(kind="folder", audio_root=str(audio), extensions=["wav", "flac"],
                          splits=[SplitConfig(name="train", csv=str(tmp_path / "labels.csv"))])
    manifest, quarantine = build_manifest(source)
    assert manifest.num_rows == 0
    (row,) = quarantine.to_pylist()
    assert row["reason"] == "missing_file"
    assert f"{audio}/song.aiff.{{wav,flac}}" in row["detail"]
    assert f"{audio}/song.aiff exists, but its extension 'aiff' is not among data.source.extensions" in row["detail"]


@pytest.fixture
def spread(tmp_path: Path) -> SimpleNamespace:
    """Files spread over two roots, the CSV's folder and an absolute path; some files are listed by no CSV."""
    first, second, lists, elsewhere = (tmp_path / name for name in ("first", "second", "lists", "elsewhere"))
    write_audio(first / "dog" / "a.wav")
    write_audio(first / "unlisted.wav")
    write_audio(second / "dog" / "b.flac")
    write_audio(second / "a.ogg")  # shadowed: "dog/a.wav" resolves under the first root
    write_audio(lists / "local" / "c.wav")
    write_audio(elsewhere / "d.aiff")
    write_audio(elsewhere / "unlisted.wav")
    write_audio(first / "held_out.wav")
    lists.mkdir(exist_ok=True)
    (lists / "train.csv").write_text(
        "path,labels\n"
        "dog/a.wav,Dog\n"
        "dog/b,Dog\n"  # no extension: every accepted one is tried
        "local/c.wav,Cat\n"  # relative to the CSV's folder
        f"{elsewhere / 'd.aiff'},Cat\n"
        "gone.wav,Cat\n"
        "gone_too,Cat\n"
    )
    (lists / "eval.csv").write_text(f"path,labels\n{first / 'held_out.wav'},Dog\n")
    return SimpleNamespace(first=first, second=second, lists=lists, elsewhere=elsewhere)


def test_a_csv_lists_files_under_several_roots_and_only_those_are_read(spread, monkeypatch) -> None:
    scanned = []
    real_scandir = os.scandir
    monkeypatch.setattr(os, "scandir", lambda path=".": scanned.append(path) or real_scandir(path))
    source = SourceConfig(kind="folder", audio_roots=[str(spread.first), str(spread.second)], splits=[
        SplitConfig(name="train", csv=str(spread.lists / "train.csv"), mix=True),
        SplitConfig(name="test", csv=str(spread.lists / "eval.csv"), mix=False)])
    manifest, quarantine = build_manifest(source)
    assert scanned == []  # nothing is scanned: only the listed files are looked up
    rows = {(row["split"], row["key"]): (row["path"], row["label_mids"]) for row in manifest.to_pylist()}
    assert rows == {
        ("train", "dog/a"): (str(spread.first / "dog" / "a.wav"), ["Dog"]),
        ("train", "dog/b"): (str(spread.second / "dog" / "b.flac"), ["Dog"]),
        ("train", "local/c"): (str(spread.lists / "local" / "c.wav"), ["Cat"]),
        ("train", str(spread.elsewhere / "d")): (str(spread.elsewhere / "d.aiff"), ["Cat"]),
        # An absolute path under a root has the key of its path relative to that root.
        ("test", "held_out"): (str(spread.first / "held_out.wav"), ["Dog"]),
    }
    missing = {row["key"]: row for row in quarantine.to_pylist()}
    assert missing.keys() == {"gone", "gone_too"} and {row["reason"] for row in missing.values()} == {"missing_file"}
    tried = missing["gone"]["detail"]
    assert tried.startswith(f"{spread.lists / 'train.csv'}:6: no audio file ")
    for folder in (spread.first, spread.second, spread.lists):
        assert str(folder / "gone.wav") in tried
    assert f"{spread.first / 'gone_too'}.{{wav,flac,ogg,mp3," in missing["gone_too"]["detail"]


def test_one_file_spelled_two_ways_in_a_training_and_an_evaluation_split_is_a_leak(spread) -> None:
    (spread.lists / "eval.csv").write_text(f"path,labels\n{spread.first / 'dog' / 'a.wav'},Dog\n")
    source = SourceConfig(kind="folder", audio_roots=[str(spread.first)], splits=[
        SplitConfig(name="train", csv=str(spread.lists / "train.csv"), mix=True),
        SplitConfig(name="test", csv=str(spread.lists / "eval.csv"), mix=False)])
    with pytest.raises(ManifestError, match=r"1 keys are in both .*dog/a \(eval: test, train: train\)"):
        build_manifest(source)


def test_listed_entries_that_are_not_regular_files_are_quarantined_without_opening_them(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    os.mkfifo(root / "pipe.wav")
    (root / "folder.wav").mkdir()
    os.symlink(root / "nowhere.wav", root / "broken.wav")
    (tmp_path / "train.csv").write_text("pipe.wav,Dog\nfolder.wav,Dog\nbroken.wav,Dog\n")
    source = SourceConfig(kind="folder", audio_roots=[str(root)],
                          splits=[SplitConfig(name="train", csv=str(tmp_path / "train.csv"))])
    manifest, quarantine = run_bounded(lambda: build_manifest(source, probe_audio=True), 30.0, [root])
    assert manifest.num_rows == 0
    found = {row["key"]: (row["reason"], row["detail"].split(" is ", 1)[1]) for row in quarantine.to_pylist()}
    assert found == {
        "pipe": ("not_regular_file", "a FIFO, not a regular file"),
        "folder": ("not_regular_file", "a directory, not a regular file"),
        "broken": ("not_regular_file", "a symlink whose target cannot be reached (No such file or directory)"),
    }


def test_listed_folder_sources_refuse_a_split_without_csv_and_both_kinds_of_root(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("a.wav,Dog\n")
    with pytest.raises(ManifestError, match=r"every split needs a csv listing its files \(splits \['rest'\]"):
        build_manifest(SourceConfig(kind="folder", audio_roots=[str(tmp_path)], splits=[
            SplitConfig(name="train", csv=str(tmp_path / "train.csv")), SplitConfig(name="rest", csv="")]))
    with pytest.raises(ManifestError, match="audio_root .* or data.source.audio_roots .*, not both"):
        build_manifest(SourceConfig(kind="folder", audio_root=str(tmp_path), audio_roots=[str(tmp_path)]))
    with pytest.raises(ManifestError, match="audio_roots: .*nope.* are not directories"):
        build_manifest(SourceConfig(kind="folder", audio_roots=[str(tmp_path / "nope")], splits=[
            SplitConfig(name="train", csv=str(tmp_path / "train.csv"))]))
