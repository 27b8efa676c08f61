"""The on-disk teacher cache: shards, manifest, identities, verification, and lookup by example id.

Layout of a cache directory:

    manifest.json              written last: the cache is complete when it exists
    progress-rank<r>.json      shards finished by process r (kept: they make builds resumable)
    train-00000.safetensors    one shard = up to `shard_examples` consecutive examples of a split
    eval-00003.safetensors     (the eval split is cached too: the report's teacher row and the
                               students' agreement with the teacher come from it)

A shard holds the codec's arrays (`distill/lm/teacher/cache/codec.py`) for all its tokens plus `tokens`
(int32 [examples]: completion tokens per example) and `token_logprobs` (float32 [tokens]: the teacher's
log-probability of each completion token itself, which cross-tokenizer ALM reads; absent in older caches); its safetensors metadata holds the example
ids and each example's content hash (input ids + labels), so rows are matched to examples by
id and a changed example is caught rather than trained on with another example's teacher.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import torch

from distill.core.errors import DistillError
from distill.core.io import fsync_path, sha256_file
from distill.lm.data import IGNORE_INDEX
from distill.lm.teacher.cache.codec import decode_topk
from distill.losses.fused import TeacherSignal

FORMAT = "distill-teacher-cache"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
FIELD = "regime.path"
SHARD_NAME = re.compile(r"[A-Za-z0-9_]+-[0-9]{5}\.safetensors")  # what the build names them: <split>-<index>.safetensors


# ---- identities: what a cache was built from -------------------------------------------------

def example_hash(input_ids: list[int], labels: list[int]) -> str:
    """16 hex digits of sha256 over an example's tokens and labels."""
    payload = np.asarray(input_ids, dtype=np.int64).tobytes() + b"|" + np.asarray(labels, dtype=np.int64).tobytes()
    return hashlib.sha256(payload).hexdigest()[:16]


def dataset_fingerprint(ids: list[str], hashes: list[str]) -> str:
    return hashlib.sha256(json.dumps([ids, hashes]).encode()).hexdigest()


def tokenizer_sha256(tokenizer) -> str:
    vocabulary = sorted(tokenizer.get_vocab().items())
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    return hashlib.sha256(json.dumps([vocabulary, special]).encode()).hexdigest()


def teacher_identity(model_dir: str) -> dict:
    """The teacher's config hash and a weights fingerprint (file names, sizes and the sha256 of
    each weight file's first MiB: cheap for a 140 GB teacher, and any re-save changes it)."""
    directory = Path(model_dir)
    if not (directory / "config.json").is_file():  # a hub id: its config as transformers resolves it
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_dir).to_dict()
        config.pop("transformers_version", None), config.pop("_name_or_path", None)
        return {"path": str(model_dir), "config_sha256": hashlib.sha256(json.dumps(
            config, sort_keys=True, default=str).encode()).hexdigest(), "weights": []}
    config = json.loads((directory / "config.json").read_text())
    for volatile in ("transformers_version", "_name_or_path"):
        config.pop(volatile, None)
    weights = []
    for file in sorted(directory.glob("*.safetensors")) + sorted(directory.glob("*.bin")):
        with open(file, "rb") as handle:
            head = hashlib.sha256(handle.read(2**20)).hexdigest()
        weights.append({"file": file.name, "bytes": file.stat().st_size, "head_sha256": head})
    return {"path": str(model_dir),
            "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest(),
            "weights": weights}


def recipe_teacher_identity(spec) -> dict:
    """The identity of a recipe's teacher (TeacherSpec): its files, or for a served teacher the model name it
    asks for (a server's weights cannot be fingerprinted from here)."""
    from distill.lm.models import resolve_model_path

    if spec.served:
        return {"served_model": spec.model or "(the server's only model)"}
    return teacher_identity(resolve_model_path(spec.path, "teacher.path"))


def identity_differences(cached: dict, current: dict, prefix: str = "") -> list[str]:
    """Human-readable keys where two identity dicts differ (paths are informative, not compared)."""
    differences = []
    for key in sorted(cached.keys() | current.keys()):
        if key == "path":
            continue
        before, after = cached.get(key), current.get(key)
        if isinstance(before, dict) and isinstance(after, dict):
            differences += identity_differences(before, after, f"{prefix}{key}.")
        elif before != after:
            differences.append(f"{prefix}{key}")
    return differences


# ---- files ----------------------------------------------------------------------------------

def write_shard(path: Path, arrays: dict[str, np.ndarray], metadata: dict) -> dict:
    """Write atomically (a killed build never leaves a half shard under the final name); return
    the shard's manifest entry without its example counts."""
    from safetensors.numpy import save_file

    staging = path.with_name(path.name + ".tmp")
    # One metadata key: safetensors writes several in hash-map order, so the bytes (and checksum)
    # of identical shards would differ from one process to the next.
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(staging),
              metadata={"distill": json.dumps(metadata, sort_keys=True)})
    fsync_path(staging)
    os.replace(staging, path)
    return {"file": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size}


def shard_path(directory: Path, shard: object, field: str = FIELD, where: str = MANIFEST) -> Path:
    """The file of a shard entry of a manifest or progress record, refused unless it is a plain shard file name
    inside `directory` (no path parts, no link): a crafted manifest cannot make distill read elsewhere."""
    name = shard.get("file") if isinstance(shard, dict) else None
    path = Path(directory) / name if isinstance(name, str) else None
    if path is None or not SHARD_NAME.fullmatch(name) or path.is_symlink():
        raise DistillError(f"`{Path(directory) / where}` names a shard {name!r} that is not a shard file of this "
                           "directory (<split>-<5 digits>.safetensors, no path, no link); distill reads nothing "
                           "outside the cache directory", field=field,
                           fix="rebuild the cache with `distill cache` into a new directory")
    return path


def _check_manifest(manifest: object, file: Path, field: str) -> None:
    """The manifest's shape: what the readers index, with its types, before any of it is used."""
    def refuse(problem: str) -> DistillError:
        return DistillError(f"`{file}` is not a valid cache manifest: {problem}", field=field,
                            fix="rebuild the cache with `distill cache` into a new directory")
    if not isinstance(manifest, dict):
        raise refuse("it is not a JSON object")
    for key, kind in (("k", int), ("vocab_size", int), ("ids", str), ("values", str), ("shards", list),
                      ("num_tokens", int), ("identity", dict), ("bytes_per_token", (int, float))):
        if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool):
            raise refuse(f"`{key}` is missing or of the wrong type")
    for index, shard in enumerate(manifest["shards"]):
        if not isinstance(shard, dict) or not all(isinstance(shard.get(key), kind) for key, kind in
                                                  (("file", str), ("sha256", str), ("bytes", int), ("split", str))):
            raise refuse(f"shards[{index}] needs file, sha256, bytes and split")
        shard_path(file.parent, shard, field)


def read_manifest(directory: Path, field: str = FIELD) -> dict:
    file = directory / MANIFEST
    if not file.is_file():
        partial = any(directory.glob("progress-rank*.json"))
        raise DistillError(f"`{directory}` has no {MANIFEST}" + (": its cache build did not finish" if partial else ""),
                           field=field, fix=f"run `distill cache <recipe>` to {'finish' if partial else 'build'} it")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DistillError(f"`{file}` is not JSON ({getattr(error, 'msg', error)})", field=field,
                           fix="rebuild the cache with `distill cache`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DistillError(f"`{file}` is not a distill teacher cache manifest", field=field,
                           fix="point regime.path at a directory written by `distill cache`")
    if not isinstance(manifest.get("version", 0), int) or int(manifest.get("version", 0)) > FORMAT_VERSION:
        raise DistillError(f"`{file}` has cache format version {manifest['version']}, newer than this distill "
                           f"reads ({FORMAT_VERSION})", field=field, fix="upgrade distill, or rebuild the cache")
    _check_manifest(manifest, file, field)
    return manifest


def verify_cache(directory: Path) -> list[str]:
    """Every problem found (missing, truncated or corrupted shards by checksum); [] when sound."""
    manifest = read_manifest(directory, field="cache")
    problems = []
    for shard in manifest["shards"]:
        path = shard_path(directory, shard, "cache")
        if not path.is_file():
            problems.append(f"{shard['file']}: missing")
        elif path.stat().st_size != shard["bytes"]:
            problems.append(f"{shard['file']}: {path.stat().st_size} bytes, the manifest says {shard['bytes']} "
                            "(truncated or replaced)")
        elif sha256_file(path) != shard["sha256"]:
            problems.append(f"{shard['file']}: checksum differs from the manifest (corrupted)")
    return problems


def load_shard(directory: Path, shard: dict, manifest: dict) -> tuple[dict, np.ndarray, np.ndarray, np.ndarray]:
    """(metadata, ids [T, k], logprobs [T, k], tail [T]) of one shard, its checksum verified."""
    from safetensors.numpy import load

    path = shard_path(directory, shard)
    if not path.is_file():
        raise DistillError(f"cache shard `{path}` is missing", field=FIELD,
                           fix=f"run `distill cache --verify {directory}`, then rebuild the cache")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != shard["sha256"]:
        raise DistillError(f"cache shard `{path}` does not match its checksum (truncated or corrupted)", field=FIELD,
                           fix=f"run `distill cache --verify {directory}`, then rebuild the cache")
    # The header (8-byte length, then JSON) of the bytes already read and verified: no second read.
    header = json.loads(data[8:8 + int.from_bytes(data[:8], "little")])
    metadata = json.loads(header.get("__metadata__", {}).get("distill", "{}"))
    arrays = load(data)
    tokens = arrays.pop("tokens")
    metadata["token_logprobs"] = arrays.pop("token_logprobs", None)  # the actual tokens' log-probs (newer caches)
    ids, logprobs, tail = decode_topk(arrays, num_tokens=int(tokens.sum()), k=manifest["k"],
                                      vocab_size=manifest["vocab_size"], ids_scheme=manifest["ids"],
                                      values=manifest["values"])
    metadata["tokens"] = tokens
    return metadata, ids, logprobs, tail


class TopkRows:
    """The teacher's top-k ids, log-probs and tail of consecutive loss tokens, placed into batches by spans."""

    def __init__(self, ids: torch.Tensor, logprobs: torch.Tensor, tail: torch.Tensor):
        self.ids, self.logprobs, self.tail, self.k = ids, logprobs, tail, ids.shape[-1]

    def batch(self, spans: list[tuple[int, int]], mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Top-k ids [B, L, k], log-probs [B, L, k] and tail [B, L] placed at the True entries of
        `mask` [B, L] (row b's entries in order are its example's cached tokens)."""
        return tuple(self.place(rows, spans, mask) for rows in (self.ids, self.logprobs, self.tail))

    @staticmethod
    def place(rows: torch.Tensor, spans: list[tuple[int, int]], mask: torch.Tensor) -> torch.Tensor:
        """`rows` [N, ...] of consecutive tokens placed at the True entries of `mask` [B, L]: row b of the batch
        takes rows[offset:offset + count] of its span (zeros elsewhere)."""
        out = torch.zeros(*mask.shape, *rows.shape[1:], dtype=rows.dtype)
        for row, (offset, count) in enumerate(spans):
            positions = mask[row].nonzero().squeeze(-1)
            if positions.numel() != count:
                raise DistillError(f"a batch row has {positions.numel()} completion tokens but its cache entry "
                                   f"{count}", field=FIELD, fix="rebuild the cache for this data")
            out[row, positions] = rows[offset:offset + count]
        return out


class TeacherCache(TopkRows):
    """A finished cache, decoded in memory, looked up by example id.

    `k` may be lower than the cache's: the smallest entries are folded into the tail mass."""

    def __init__(self, directory: str | Path, k: int | None = None):
        self.directory = Path(directory).expanduser()
        self.manifest = read_manifest(self.directory)
        stored_k = self.manifest["k"]
        self.k = k or stored_k
        if self.k > stored_k:
            raise DistillError(f"the cache holds the teacher's top-{stored_k}, fewer than k={self.k}", field="regime.k",
                               fix=f"set regime.k <= {stored_k}, or rebuild the cache with a larger k")
        self.rows: dict[str, dict[str, tuple[str, int, int]]] = {}  # split -> id -> (hash, offset, count)
        ids, logprobs, tails, targets, offset = [], [], [], [], 0
        for shard in self.manifest["shards"]:
            metadata, shard_ids, shard_logprobs, shard_tail = load_shard(self.directory, shard, self.manifest)
            split = self.rows.setdefault(shard["split"], {})
            for example_id, content, count in zip(metadata["example_ids"], metadata["example_hashes"],
                                                  metadata["tokens"].tolist()):
                split[example_id] = (content, offset, count)
                offset += count
            ids.append(shard_ids)
            logprobs.append(shard_logprobs)
            tails.append(shard_tail)
            targets.append(metadata["token_logprobs"])
        self.ids = torch.from_numpy(np.concatenate(ids)) if ids else torch.zeros(0, stored_k, dtype=torch.long)
        self.logprobs = torch.from_numpy(np.concatenate(logprobs)) if logprobs else torch.zeros(0, stored_k)
        self.tail = torch.from_numpy(np.concatenate(tails)) if tails else torch.zeros(0)
        # log p_T of each cached token itself (what ALM needs); None for caches written before it was stored
        self.token_logprobs = (torch.from_numpy(np.concatenate(targets)) if targets and all(
            t is not None for t in targets) else None)
        if self.k < stored_k:
            self._keep_top(self.k)

    def _keep_top(self, k: int) -> None:
        order = self.logprobs.argsort(-1, descending=True)
        ids, logprobs = self.ids.gather(-1, order), self.logprobs.gather(-1, order)
        dropped = logprobs[:, k:].logsumexp(-1)
        self.tail = torch.logaddexp(self.tail, dropped)
        self.ids, self.logprobs = ids[:, :k].contiguous(), logprobs[:, :k].contiguous()

    def rows_for(self, split: str, examples: list, field: str = "data.train") -> list[tuple[int, int]]:
        """(offset, count) per example, matched by id; refuses missing or changed examples."""
        table = self.rows.get(split, {})
        spans = []
        for example in examples:
            found = table.get(example.id)
            if found is None:
                raise DistillError(f"example id `{example.id}` of the {split} data is not in the cache at "
                                   f"`{self.directory}` ({len(table)} {split} examples cached)", field=field,
                                   fix="rebuild the cache for this data with `distill cache <recipe>`")
            content, offset, count = found
            if content != example_hash(example.input_ids, example.labels):
                raise DistillError(f"example id `{example.id}` has other tokens than when the cache was built "
                                   "(the data, the tokenizer or data.max_length changed)", field=field,
                                   fix="rebuild the cache for this data with `distill cache <recipe>`")
            spans.append((offset, count))
        return spans

class CachedTeacher:
    """The teacher as its cached top-k: a teacher source like `LiveTeacher` (distill/lm/teacher/live.py).
    `spans` are the cache rows of the training examples, by index (`TeacherCache.rows_for`); `sparse` is how
    the top-k meets the student: "tail" (k + 1 outcomes) or "renormalize"."""

    def __init__(self, cache: TeacherCache, spans: list[tuple[int, int]], sparse: str):
        self.cache, self.spans, self.sparse = cache, spans, sparse

    def signal(self, batch: dict, *, hidden: bool = False) -> TeacherSignal:
        mask = batch["labels"][:, 1:] != IGNORE_INDEX
        spans = [self.spans[i] for i in batch["example_index"].tolist()]
        ids, logprobs, tail = (t.to(mask.device) for t in self.cache.batch(spans, mask.cpu()))
        return TeacherSignal(topk_ids=ids, topk_logprobs=logprobs, tail_logmass=tail if self.sparse == "tail" else None)

    def token_logprobs(self, batch: dict) -> torch.Tensor:
        """[B, L - 1]: log p_T of each completion token itself (what OPD's reward reads), zeros elsewhere."""
        mask = batch["labels"][:, 1:] != IGNORE_INDEX
        spans = [self.spans[i] for i in batch["example_index"].tolist()]
        return self.cache.place(self.cache.token_logprobs.float(), spans, mask.cpu()).to(mask.device)
