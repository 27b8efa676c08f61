"""The offline teacher cache: `distill cache` stores the teacher's top-k + tail per completion
token, `regime: {kind: cache}` trains from it with no teacher loaded. Round-trip exactness,
resume after a killed build, several processes, and every bad input the issue lists."""
from __future__ import annotations

import json
import math

import pytest
import torch

import distill
from conftest import launch_two_processes
from distill.lm.teacher.cache.build import teacher_topk
from distill.core.io import sha256_file
from distill.lm.teacher.cache.store import TeacherCache
from distill.lm.data import IGNORE_INDEX, Example, collate
from distill.core.errors import DistillError

K = 8


def _cache_recipe(tiny_recipe, tmp_path, **regime):
    return {**tiny_recipe, "regime": {"kind": "cache", "path": str(tmp_path / "cache"), "k": K, "shard_examples": 10,
                                      **regime}}


@pytest.fixture(scope="module")
def built_once(tiny_lm_dir, tmp_path_factory):
    """A cache built through the CLI once per module (tests get a copy: they may damage it)."""
    import yaml

    from conftest import run_distill_cli, tiny_recipe_for

    directory = tmp_path_factory.mktemp("cache-once")
    recipe = _cache_recipe(tiny_recipe_for(tiny_lm_dir, directory), directory)
    (directory / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    done = run_distill_cli("cache", directory / "recipe.yaml")
    assert done.returncode == 0, done.stderr[-3000:]
    return directory / "cache"


@pytest.fixture
def built(built_once, tiny_recipe, write_recipe, tmp_path):
    """A recipe (dict and file) whose cache (a fresh copy of `built_once`) is at tmp_path/cache."""
    import shutil

    shutil.copytree(built_once, tmp_path / "cache")
    recipe = _cache_recipe(tiny_recipe, tmp_path)
    return recipe, write_recipe(recipe)


def test_teacher_topk_and_tail_make_a_distribution():
    logits = torch.randn(3, 5, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3
    ids, logprobs, tail = teacher_topk(logits, 7)
    full = torch.log_softmax(logits, -1)
    torch.testing.assert_close(ids, full.topk(7, -1).indices)
    torch.testing.assert_close(logprobs, full.topk(7, -1).values.float())
    # tail = log(1 - sum of the top-k), computed here the naive way in float64
    expected_tail = torch.log1p(-full.gather(-1, ids).exp().sum(-1))
    torch.testing.assert_close(tail.double(), expected_tail, rtol=1e-5, atol=1e-6)
    assert torch.allclose(torch.cat([logprobs, tail[..., None]], -1).double().logsumexp(-1), torch.zeros(3, 5,
                          dtype=torch.float64), atol=1e-5)


def test_build_stores_the_teachers_top_k_and_tail(built, tiny_lm_dir, tmp_path, run_cli):
    """Round trip: the ids stored per completion token are the live teacher's top-k, the values its
    log-probs (int8: within the quantisation bound), the tail its remaining mass."""
    recipe, _ = built
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert manifest["k"] == K and manifest["examples"] == {"train": 32, "eval": 8}
    assert len(manifest["shards"]) == 4 + 1  # 32 train examples in shards of 10, then 8 eval
    assert manifest["teacher_eval"]["teacher_top1_agreement"] == 1.0
    done = run_cli("cache", "--verify", tmp_path / "cache")
    assert done.returncode == 0 and "every checksum matches" in done.stdout

    from transformers import AutoModelForCausalLM

    from distill.lm.models import load_tokenizer
    from distill.lm.data import load_data
    from distill.core.recipe import load_recipe
    from distill.lm.tasks import get_task

    tokenizer = load_tokenizer(str(tiny_lm_dir), "teacher.path")
    _, _, train_examples, _ = load_data(load_recipe(recipe).data, tokenizer, get_task("oracle"))
    teacher = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    cache = TeacherCache(tmp_path / "cache")
    spans = cache.rows_for("train", train_examples)
    batch = collate(train_examples[:6], tokenizer.pad_token_id)
    with torch.no_grad():
        logprobs = torch.log_softmax(teacher(input_ids=batch["input_ids"],
                                             attention_mask=batch["attention_mask"]).logits[:, :-1].float(), -1)
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    ids, values, tail = cache.batch(spans[:6], mask)
    live = logprobs[mask]
    top = live.topk(K, -1)
    assert torch.equal(ids[mask].sort(-1).values, top.indices.sort(-1).values)  # same token sets
    stored = values[mask]
    truth = live.gather(-1, ids[mask])
    bound = (top.values[:, :1] - top.values[:, -1:]) / 510 + 2e-3  # int8 step / 2 + float16 range rounding
    assert ((stored - truth).abs() <= bound).all()
    expected_tail = torch.log1p(-top.values.double().exp().sum(-1))
    torch.testing.assert_close(tail[mask].double(), expected_tail, rtol=2e-3, atol=2e-3)  # float16


def test_training_from_the_cache_loads_no_teacher(built, monkeypatch):
    """End to end through the public API; any attempt to load the teacher's weights fails the test."""
    recipe, _ = built
    import distill.lm.run as pipeline

    real = pipeline.load_causal_lm

    def refuse_teacher(path, field, *args, **kwargs):
        assert field != "teacher.path", "the teacher was loaded during a cache run"
        return real(path, field, *args, **kwargs)

    monkeypatch.setattr(pipeline, "load_causal_lm", refuse_teacher)
    result = distill.run(recipe)
    assert set(result.rows) == {"teacher", "alone", "distilled"}
    losses = [json.loads(line) for line in (result.run_dir / "losses.jsonl").read_text().splitlines()]
    distilled = [r for r in losses if r["phase"] == "distilled"]
    assert len(distilled) == 4 and all(math.isfinite(r["kd"]) and r["kd"] > 0 for r in distilled)
    assert result.rows["teacher"]["teacher_top1_agreement"] == 1.0  # the build's evaluation


@pytest.mark.parametrize("fused", [True, False])
def test_full_vocabulary_cache_gives_the_live_teachers_loss(tiny_recipe, tmp_path, fused):
    """With k = V and float16 values the sparse teacher is the teacher: step 1's loss from the
    cache equals the live teacher's (the tail bucket is empty), on the fused and plain paths."""
    from distill.lm.teacher.cache.build import build_cache

    vocab = 68  # the oracle task's tokenizer
    recipe = _cache_recipe(tiny_recipe, tmp_path, k=vocab, values="float16")
    recipe["train"] = {**recipe["train"], "steps": 1, "fused_loss": fused}
    recipe["train"]["baseline"] = False
    build_cache(recipe)
    cached = distill.run({**recipe, "output": str(tmp_path / "cached")})
    live = distill.run({**recipe, "regime": {"kind": "off_policy"}, "output": str(tmp_path / "live")})

    def first_kd(run_dir):
        return json.loads((run_dir / "losses.jsonl").read_text().splitlines()[0])["kd"]

    assert first_kd(cached.run_dir) == pytest.approx(first_kd(live.run_dir), rel=2e-3)


def test_fewer_entries_than_stored_fold_into_the_tail(built, tmp_path):
    full, fewer = TeacherCache(tmp_path / "cache"), TeacherCache(tmp_path / "cache", k=3)
    assert fewer.ids.shape[1] == 3
    mass = torch.cat([fewer.logprobs, fewer.tail[:, None]], -1).double().logsumexp(-1)
    torch.testing.assert_close(mass, torch.cat([full.logprobs, full.tail[:, None]], -1).double().logsumexp(-1))
    best = full.logprobs.argmax(-1)
    assert torch.equal(fewer.ids[:, 0], full.ids.gather(-1, best[:, None])[:, 0])


def test_killed_build_resumes_from_finished_shards(tiny_recipe, write_recipe, run_cli, tmp_path):
    recipe = write_recipe(_cache_recipe(tiny_recipe, tmp_path))
    killed = run_cli("cache", recipe, env={"DISTILL_CACHE_STOP_AFTER_SHARDS": "2"})
    assert killed.returncode != 0 and not (tmp_path / "cache" / "manifest.json").exists()
    first = sorted((tmp_path / "cache").glob("*.safetensors"))
    assert len(first) == 2
    stamps = {p.name: (p.stat().st_mtime_ns, sha256_file(p)) for p in first}
    done = run_cli("cache", recipe)
    assert done.returncode == 0, done.stderr[-2000:]
    for p in first:  # kept, not recomputed
        assert (p.stat().st_mtime_ns, sha256_file(p)) == stamps[p.name]
    # the resumed cache is byte-identical to one built in one go
    clean = write_recipe({**_cache_recipe(tiny_recipe, tmp_path), "regime": {
        **_cache_recipe(tiny_recipe, tmp_path)["regime"], "path": str(tmp_path / "clean")}}, "clean.yaml")
    assert run_cli("cache", clean).returncode == 0
    resumed = json.loads((tmp_path / "cache" / "manifest.json").read_text())["shards"]
    fresh = json.loads((tmp_path / "clean" / "manifest.json").read_text())["shards"]
    assert [s["sha256"] for s in resumed] == [s["sha256"] for s in fresh]
    again = run_cli("cache", recipe)  # a finished cache: nothing to do, nothing touched
    assert again.returncode == 0 and "nothing to do" in again.stdout


def test_two_processes_build_one_cache(tiny_recipe, write_recipe, run_cli, tmp_path):
    recipe = write_recipe(_cache_recipe(tiny_recipe, tmp_path))
    launched = launch_two_processes("cache", recipe)
    assert launched.returncode == 0, launched.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "cache").glob("progress-rank*.json")) == ["progress-rank0.json",
                                                                                        "progress-rank1.json"]
    single = write_recipe({**_cache_recipe(tiny_recipe, tmp_path), "regime": {
        **_cache_recipe(tiny_recipe, tmp_path)["regime"], "path": str(tmp_path / "single")}}, "single.yaml")
    assert run_cli("cache", single).returncode == 0
    merged = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert merged["world_size"] == 2
    assert [s["sha256"] for s in merged["shards"]] == [
        s["sha256"] for s in json.loads((tmp_path / "single" / "manifest.json").read_text())["shards"]]


# ---- bad input ------------------------------------------------------------------------------

def _other_teacher(tiny_lm_dir, directory):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)
    model.save_pretrained(directory)
    (directory / "tokenizer.json").write_bytes((tiny_lm_dir / "tokenizer.json").read_bytes())
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_lm_dir / name).exists():
            (directory / name).write_bytes((tiny_lm_dir / name).read_bytes())
    return directory


def test_a_cache_of_another_teacher_or_data_is_refused(built, tiny_lm_dir, write_recipe, run_cli, tmp_path):
    recipe, _ = built
    other = _other_teacher(tiny_lm_dir, tmp_path / "other-teacher")
    done = run_cli("run", write_recipe({**recipe, "teacher": {"path": str(other)}}, "other.yaml"))
    assert done.returncode == 2 and "regime.path" in done.stderr and "teacher.weights" in done.stderr
    from transformers import AutoTokenizer

    retokenized = tmp_path / "other-tokenizer"
    (retokenized).mkdir()
    for file in tiny_lm_dir.iterdir():
        (retokenized / file.name).write_bytes(file.read_bytes())
    tokenizer = AutoTokenizer.from_pretrained(retokenized)
    tokenizer.add_tokens(["zzz"])
    tokenizer.save_pretrained(retokenized)
    done = run_cli("run", write_recipe({**recipe, "teacher": {"path": str(retokenized)}}, "tok.yaml"))
    assert done.returncode == 2 and "tokenizer_sha256" in done.stderr and "teacher.weights" not in done.stderr
    reseeded = run_cli("run", write_recipe({**recipe, "data": {**recipe["data"], "seed": 5}}, "seed.yaml"))
    assert reseeded.returncode == 2 and "data.train" in reseeded.stderr and "other tokens" in reseeded.stderr
    with pytest.raises(DistillError, match="example id `999` of the train data is not in the cache"):
        TeacherCache(tmp_path / "cache").rows_for("train", [Example([1, 5, 2], [-100, 5, 2], "999")])
    # building into it with other options refuses and changes nothing
    before = {p.name: sha256_file(p) for p in (tmp_path / "cache").iterdir()}
    rebuilt = run_cli("cache", write_recipe({**recipe, "regime": {**recipe["regime"], "k": 4}}, "k4.yaml"))
    assert rebuilt.returncode == 2 and "k" in rebuilt.stderr and "nothing was changed" in rebuilt.stderr
    assert {p.name: sha256_file(p) for p in (tmp_path / "cache").iterdir()} == before


@pytest.mark.parametrize("damage", ["corrupt", "truncate", "delete"])
def test_damaged_shards_are_named(built, run_cli, tmp_path, damage):
    recipe, path = built
    shard = tmp_path / "cache" / json.loads((tmp_path / "cache" / "manifest.json").read_text())["shards"][1]["file"]
    data = bytearray(shard.read_bytes())
    if damage == "corrupt":
        data[-5] ^= 0xFF
        shard.write_bytes(bytes(data))
    elif damage == "truncate":
        shard.write_bytes(bytes(data[: len(data) // 2]))
    else:
        shard.unlink()
    verified = run_cli("cache", "--verify", tmp_path / "cache")
    assert verified.returncode == 2 and shard.name in verified.stderr
    assert {"corrupt": "corrupted", "truncate": "truncated", "delete": "missing"}[damage] in verified.stderr
    trained = run_cli("run", path)
    assert trained.returncode == 2 and shard.name in trained.stderr and "regime.path" in trained.stderr


def test_newer_or_unfinished_caches_give_clear_errors(built, tiny_recipe, write_recipe, run_cli, tmp_path):
    recipe, path = built
    manifest_file = tmp_path / "cache" / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest_file.write_text(json.dumps({**manifest, "version": 99}))
    done = run_cli("run", path)
    assert done.returncode == 2 and "version 99" in done.stderr and "upgrade distill" in done.stderr
    # an unfinished build: training says so; another recipe's build into it is refused
    unfinished = write_recipe({**recipe, "regime": {**recipe["regime"], "path": str(tmp_path / "partial")}}, "p.yaml")
    assert run_cli("cache", unfinished, env={"DISTILL_CACHE_STOP_AFTER_SHARDS": "1"}).returncode != 0
    early = run_cli("run", unfinished)
    assert early.returncode == 2 and "did not finish" in " ".join(early.stderr.split())  # unwrap rich's lines
    other = write_recipe({**recipe, "regime": {**recipe["regime"], "path": str(tmp_path / "partial"), "k": 4}}, "o.yaml")
    refused = run_cli("cache", other)
    assert refused.returncode == 2 and "unfinished cache" in refused.stderr


@pytest.mark.parametrize("crafted", ["parent", "absolute", "symlink", "not-a-list", "progress-parent"])
def test_a_crafted_manifest_cannot_make_distill_read_or_write_outside_the_cache(built, run_cli, tmp_path, crafted):
    """Shard names are plain `<split>-<5 digits>.safetensors` files of the cache directory: a manifest or a
    progress record naming another path (relative, absolute, through a link) is refused, naming the file."""
    recipe, path = built
    cache = tmp_path / "cache"
    manifest_file = cache / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    outside = tmp_path / "outside.safetensors"
    outside.write_bytes((cache / manifest["shards"][0]["file"]).read_bytes())
    if crafted == "parent":
        manifest["shards"][0]["file"] = "../outside.safetensors"
    elif crafted == "absolute":
        manifest["shards"][0]["file"] = str(outside)
    elif crafted == "symlink":
        (cache / manifest["shards"][0]["file"]).unlink()
        (cache / manifest["shards"][0]["file"]).symlink_to(outside)
    elif crafted == "not-a-list":
        manifest["shards"] = {"file": "../outside.safetensors"}
    if crafted == "progress-parent":  # an unfinished build whose progress record points outside
        manifest_file.unlink()
        progress = cache / "progress-rank0.json"
        record = json.loads(progress.read_text())
        first = next(iter(record["shards"]))
        record["shards"][first]["file"] = "../outside.safetensors"
        progress.write_text(json.dumps(record))
    else:
        manifest_file.write_text(json.dumps(manifest))
    before = sorted(p.name for p in tmp_path.iterdir())
    command = ("cache", path) if crafted == "progress-parent" else ("run", path)
    refused = run_cli(*command)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "regime.path" in refused.stderr and ("manifest" in refused.stderr or "progress" in refused.stderr)
    assert "Traceback" not in refused.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no run directory, nothing written outside
    if crafted != "not-a-list":
        verified = run_cli("cache", "--verify", cache) if crafted != "progress-parent" else None
        assert verified is None or (verified.returncode == 2 and "outside the cache" in verified.stderr)
