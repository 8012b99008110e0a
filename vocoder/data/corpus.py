"""Corpora (demo, folder of audio, LJSpeech) and the feature cache every run reads from.

``prepare_corpus`` turns a data config into a cache folder::

    CACHE/<corpus>-<preset>-<key>/
        audio/<name>.npy   int16 [T]            16-bit audio at the preset's rate
        mel/<name>.npy     float32 [n_mels, F]  log-mels from the one front end
        f0/<name>.npy      float32 [F]          true F0 in Hz (demo corpus only)
        manifest.json      splits, lengths, files left out and why (written last)

The key hashes everything that changes the contents (preset, corpus options, file list), so a
second run with the same settings reuses the cache and a changed setting makes a new one.
Each per-file array is written atomically, so an interrupted preparation resumes.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from vocoder.atomic import save_npy_atomic, write_text_atomic
from vocoder.audio import list_audio_files, load_audio
from vocoder.errors import InputError, VocoderError
from vocoder.features import MelFrontEnd

MANIFEST = "manifest.json"
SILENCE_PEAK = 1e-4  # below this peak amplitude a file counts as silent
SPLITS = ("train", "valid", "test")


@dataclass
class Source:
    """One utterance to prepare: a file on disk, or a generated demo utterance index."""

    name: str
    split: str
    path: Path | None = None
    demo_index: int | None = None


@dataclass
class PreparedCorpus:
    """A prepared cache folder and its manifest."""

    root: Path
    manifest: dict = field(repr=False)

    @classmethod
    def open(cls, root: str | os.PathLike) -> PreparedCorpus:
        root = Path(root)
        with open(root / MANIFEST) as f:
            return cls(root, json.load(f))

    @property
    def features(self) -> dict:
        return self.manifest["features"]

    def entries(self, split: str | None = None) -> list[dict]:
        return [e for e in self.manifest["entries"] if split is None or e["split"] == split]

    def audio(self, name: str, mmap: bool = True) -> np.ndarray:
        """int16 ``[T]`` (memory-mapped by default)."""
        return np.load(self.root / "audio" / f"{name}.npy", mmap_mode="r" if mmap else None)

    def mel(self, name: str, mmap: bool = True) -> np.ndarray:
        return np.load(self.root / "mel" / f"{name}.npy", mmap_mode="r" if mmap else None)

    def f0(self, name: str) -> np.ndarray | None:
        path = self.root / "f0" / f"{name}.npy"
        return np.load(path) if path.exists() else None

    def summary(self) -> str:
        m = self.manifest
        lines = [f"corpus {m['corpus']} prepared in {self.root}"]
        for split in SPLITS:
            es = self.entries(split)
            hours = sum(e["samples"] for e in es) / m["features"]["sample_rate"] / 3600
            lines.append(f"  {split:5s}: {len(es):6d} files, {hours:8.3f} h")
        lines.append(
            f"  total: {len(m['entries'])} files, {m['hours']:.3f} h of audio "
            f"at {m['features']['sample_rate']} Hz (preset {m['features']['name']})"
        )
        if m["skipped"]:
            lines.append(f"  left out {len(m['skipped'])} file(s):")
            lines += [f"    {s['file']}: {s['reason']}" for s in m["skipped"]]
        return "\n".join(lines)


def _hash_split(name: str, n_valid_per_1000: int, n_test_per_1000: int) -> str:
    """A split that depends only on the name, so adding files never moves old ones."""
    bucket = zlib.crc32(name.encode()) % 1000
    if bucket < n_test_per_1000:
        return "test"
    if bucket < n_test_per_1000 + n_valid_per_1000:
        return "valid"
    return "train"


def discover(data_cfg) -> list[Source]:
    """The utterances a data config names, each with its fixed split."""
    kind = data_cfg["name"]
    if kind == "demo":
        from vocoder.data.demo import demo_split

        n = int(data_cfg["n_utterances"])
        return [Source(f"demo_{i:04d}", demo_split(i, n), demo_index=i) for i in range(n)]
    root = Path(str(data_cfg.get("root") or ""))
    if not str(data_cfg.get("root") or "") or not root.is_dir():
        raise VocoderError(f"{root}: data.root is not a folder (set data.root=DIR)")
    if kind == "folder":
        files = list_audio_files(root)
        if not files:
            raise VocoderError(f"{root}: no .wav or .flac files found below this folder")
        sources = []
        for p in files:
            name = str(p.relative_to(root).with_suffix("")).replace(os.sep, "__")
            split = _hash_split(
                name, int(data_cfg["valid_per_1000"]), int(data_cfg["test_per_1000"])
            )
            sources.append(Source(name, split, path=p))
        return sources
    if kind == "ljspeech":
        meta = root / "metadata.csv"
        if not meta.is_file():
            raise VocoderError(f"{meta}: missing (an LJSpeech folder holds metadata.csv and wavs/)")
        with open(meta, newline="", encoding="utf-8") as f:
            ids = [row[0] for row in csv.reader(f, delimiter="|", quoting=csv.QUOTE_NONE) if row]
        if not ids:
            raise VocoderError(f"{meta}: no utterances listed")
        # The usual held-out practice: the last n_test utterances of metadata.csv are the test
        # set and the n_valid before them the validation set.
        n_test, n_valid = int(data_cfg["n_test"]), int(data_cfg["n_valid"])
        n_test = min(n_test, max(len(ids) // 10, 1))
        n_valid = min(n_valid, max(len(ids) // 10, 1))
        sources = []
        for i, uid in enumerate(ids):
            split = (
                "test"
                if i >= len(ids) - n_test
                else "valid"
                if i >= len(ids) - n_test - n_valid
                else "train"
            )
            sources.append(Source(uid, split, path=root / "wavs" / f"{uid}.wav"))
        return sources
    raise VocoderError(f"unknown data.name {kind!r} (demo, folder or ljspeech)")


def _leave_out_short(corpus: PreparedCorpus, min_samples: int, data_cfg, log) -> PreparedCorpus:
    """The cache keeps every usable file; utterances shorter than one training segment of
    this run are reported and left out of the returned view."""
    sr = corpus.features["sample_rate"]
    keep, short = [], []
    for e in corpus.manifest["entries"]:
        (keep if e["samples"] >= min_samples else short).append(e)
    for e in short:
        log(
            f"warning: leaving out {e['source']}: too short ({e['samples'] / sr:.3f} s; a "
            f"training segment needs {min_samples / sr:.3f} s)"
        )
    if not keep:
        where = data_cfg.get("root") or data_cfg["name"]
        raise VocoderError(
            f"{where}: no usable audio file (every file is shorter than one "
            f"training segment of {min_samples / sr:.3f} s)"
        )
    manifest = dict(
        corpus.manifest,
        entries=keep,
        skipped=corpus.manifest["skipped"]
        + [
            {
                "file": e["source"],
                "reason": f"too short ({e['samples'] / sr:.3f} s; a training "
                f"segment needs {min_samples / sr:.3f} s)",
            }
            for e in short
        ],
    )
    manifest["hours"] = sum(e["samples"] for e in keep) / sr / 3600
    return PreparedCorpus(corpus.root, manifest)


def _cache_key(data_cfg, features: MelFrontEnd, sources: list[Source]) -> str:
    relevant = {k: v for k, v in dict(data_cfg).items() if k not in ("cache_dir",)}
    h = hashlib.sha1()
    h.update(json.dumps(relevant, sort_keys=True, default=str).encode())
    h.update(json.dumps(features.config.to_dict(), sort_keys=True).encode())
    if any(s.demo_index is not None for s in sources):
        from vocoder.data.demo import DEMO_VERSION

        h.update(f"demo-generator-v{DEMO_VERSION}".encode())
    for s in sources:
        h.update(f"{s.name}|{s.split}|{s.path}".encode())
        if s.path is not None and s.path.exists():
            st = s.path.stat()
            h.update(f"{st.st_size}|{int(st.st_mtime)}".encode())
    return h.hexdigest()[:10]


def prepare_corpus(
    data_cfg,
    features: MelFrontEnd,
    cache_dir: str | os.PathLike,
    min_samples: int = 0,
    log=print,
    progress: bool = True,
) -> PreparedCorpus:
    """Prepare (or reuse) the feature cache for ``data_cfg``.

    Files that cannot be decoded, are empty, silent, shorter than ``min_samples`` or hold
    NaN/Inf are reported by name and left out. No usable file at all is a
    :class:`VocoderError` naming the corpus.
    """
    sources = discover(data_cfg)
    key = _cache_key(data_cfg, features, sources)
    root = Path(cache_dir) / f"{data_cfg['name']}-{features.config.name}-{key}"
    if (root / MANIFEST).is_file():
        log(f"reusing prepared features in {root}")
        return _leave_out_short(PreparedCorpus.open(root), min_samples, data_cfg, log)

    sr, hop = features.sample_rate, features.hop_length
    entries, skipped = [], []
    iterator = sources
    if progress:
        from tqdm import tqdm

        iterator = tqdm(sources, desc=f"preparing {data_cfg['name']}", unit="file", leave=False)
    for src in iterator:
        audio_path = root / "audio" / f"{src.name}.npy"
        mel_path = root / "mel" / f"{src.name}.npy"
        label = str(src.path) if src.path is not None else src.name
        try:
            f0 = None
            if src.demo_index is not None:
                from vocoder.data.demo import generate_utterance

                if sr != 22050:
                    raise VocoderError(
                        "the demo corpus exists at 22050 Hz only; use a 22050 Hz preset"
                    )
                utt = generate_utterance(
                    src.demo_index, seed=int(data_cfg["seed"]), sample_rate=sr, hop_length=hop
                )
                audio, f0 = utt.audio, utt.f0
            else:
                audio = load_audio(src.path, sr, log=log)
            peak = float(np.abs(audio).max())
            if peak < SILENCE_PEAK:
                raise InputError(label, "all silent")
            if len(audio) < features.min_samples():
                raise InputError(label, f"too short ({len(audio) / sr:.3f} s) for one mel frame")
        except InputError as e:
            skipped.append({"file": e.path, "reason": e.problem})
            log(f"warning: leaving out {e}")
            continue
        if peak > 1.0:  # float files may exceed full scale; keep them representable
            audio = audio / peak
        pcm = np.clip(np.round(audio * 32768.0), -32768, 32767).astype(np.int16)
        if not (audio_path.exists() and mel_path.exists()):
            mel = features(torch.from_numpy(pcm.astype(np.float32) / 32768.0)).numpy()
            save_npy_atomic(mel_path, mel.astype(np.float32))
            save_npy_atomic(audio_path, pcm)
            if f0 is not None:
                save_npy_atomic(root / "f0" / f"{src.name}.npy", f0.astype(np.float32))
        entries.append(
            {
                "name": src.name,
                "split": src.split,
                "samples": int(len(pcm)),
                "frames": int(features.num_frames(len(pcm))),
                "source": str(src.path) if src.path is not None else f"demo:{src.demo_index}",
            }
        )
    if not entries:
        where = data_cfg.get("root") or data_cfg["name"]
        raise VocoderError(f"{where}: no usable audio file ({len(skipped)} left out)")
    manifest = {
        "corpus": data_cfg["name"],
        "features": features.config.to_dict(),
        "entries": entries,
        "skipped": skipped,
        "hours": sum(e["samples"] for e in entries) / sr / 3600,
    }
    write_text_atomic(root / MANIFEST, json.dumps(manifest, indent=1))
    return _leave_out_short(PreparedCorpus(root, manifest), min_samples, data_cfg, log)
