"""Cross-tokenizer KD end to end: a teacher and a student with different real-format tokenizers (built offline,
distill/lm/tokenizer_zoo.py), tiny Llama models around them, prompt/completion and chat rows, every
cross-tokenizer objective through the CLI."""
from __future__ import annotations

import json

import pytest
import torch

from distill.lm.cross_tokenizer.data import collate_pairs, pair_examples
from distill.lm.tokenizer_zoo import build_tokenizer, default_corpus, tiny_causal_lm

KINDS = {"bpe": ("bytelevel_bpe", 300), "bpe1000": ("bytelevel_bpe", 1000), "wordpiece": ("wordpiece", 300),
         "unigram": ("unigram_metaspace", 300)}
PAIRS = [("bpe1000", "bpe"), ("wordpiece", "bpe"), ("bpe", "unigram"), ("unigram", "wordpiece")]  # (teacher, student)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> directory of a saved tiny causal LM with that tokenizer."""
    corpus = default_corpus()
    out = {}
    for name, (kind, size) in KINDS.items():
        directory = tmp_path_factory.mktemp(name)
        tokenizer = build_tokenizer(kind, corpus, vocab_size=size)
        tiny_causal_lm(tokenizer, hidden_size=32, num_hidden_layers=1).save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        out[name] = directory
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    corpus = default_corpus()
    rows = [{"prompt": corpus[i][:20], "completion": corpus[i][20:60]} for i in range(40)]
    rows += [{"messages": [{"role": "user", "content": corpus[i][:15]},
                           {"role": "assistant", "content": corpus[i][15:50]}]} for i in range(40, 56)]
    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def recipe(models, data, tmp_path, teacher="bpe", student="unigram", loss="alm", **objective):
    return {"teacher": {"path": str(models[teacher])}, "student": {"path": str(models[student])},
            "data": {"train": str(data), "eval_size": 8, "max_length": 96},
            "objective": {"loss": loss, "ce_weight": 0.5, **objective},
            "train": {"steps": 3, "batch_size": 4, "threads": 1, "log_every": 1, "checkpoint_every": 3},
            "eval": {"every": 3, "batch_size": 8, "generate_size": 2, "throughput_tokens": 4},
            "output": str(tmp_path / "run")}


def test_paired_rows_align_the_same_completion_text(models):
    from transformers import AutoTokenizer

    student, teacher = (AutoTokenizer.from_pretrained(models[name]) for name in ("unigram", "bpe"))
    rows = [{"prompt": "Zahlen 12", "completion": " und Ümlaute, 漢字 🙂 done."},
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "café naïve"}]},
            {"text": "plain text row"}]
    pairs = pair_examples(rows, student, teacher, max_length=64, append_eos=True, field="data.train")
    for pair in pairs:
        assert pair.chunks > 0
        for chunk in range(pair.chunks):  # chunk c covers the same text on both sides
            s = [t for t, c in enumerate(pair.student_chunk) if c == chunk]
            t = [k for k, c in enumerate(pair.teacher_chunk) if c == chunk]
            assert s and t and s == list(range(s[0], s[-1] + 1)) and t == list(range(t[0], t[-1] + 1))
            text_s = student.decode(pair.student.input_ids[s[0]:s[-1] + 1]).replace(" ", "")
            text_t = teacher.decode(pair.teacher.input_ids[t[0]:t[-1] + 1]).replace(" ", "")
            assert text_s == text_t
        # every completion token of both sides lies in a chunk, but EOS (on both) and chat markup
        for example, chunks, tokenizer in ((pair.student, pair.student_chunk, student),
                                           (pair.teacher, pair.teacher_chunk, teacher)):
            loose = [token for token, label, c in zip(example.input_ids, example.labels, chunks)
                     if label != -100 and c < 0]
            assert all(token in tokenizer.all_special_ids or not tokenizer.decode([token]).strip() or
                       "assistant" in tokenizer.decode([token]) for token in loose)
    batch = collate_pairs(pairs, 0, 0)
    assert batch["chunk"].shape == batch["input_ids"].shape and batch["teacher_chunk"].max() >= 0


@pytest.mark.parametrize("loss", ["alm", "uld", "gold_hybrid"])
@pytest.mark.parametrize("teacher,student", PAIRS, ids=[f"{t}-to-{s}" for t, s in PAIRS])
def test_each_objective_trains_a_student_with_another_tokenizer(models, data, tmp_path, run_cli, write_recipe,
                                                                loss, teacher, student):
    finished = run_cli("run", str(write_recipe(recipe(models, data, tmp_path, teacher, student, loss))))
    assert finished.returncode == 0, finished.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    rows, meta = results["rows"], results["meta"]
    assert meta["primary_metric"] == "rouge_l"  # the eval rows (the last 8) are chats: answers generated, scored
    for row in ("teacher", "alone", "distilled"):
        assert rows[row]["nll_per_char"] > 0 and "rouge_l" in rows[row]
    assert "teacher_kl" not in rows["distilled"]  # no per-token KL across vocabularies
    losses = [json.loads(line) for line in (tmp_path / "run" / "losses.jsonl").read_text().splitlines()]
    distilled = [record for record in losses if record["phase"] == "distilled"]
    assert len(distilled) == 3 and all(record["kd"] > 0 and record["teacher_seconds"] > 0 for record in distilled)
    from safetensors.torch import load_file
    alone, distilled_weights = (load_file(str(tmp_path / "run" / d / "model.safetensors")) for d in ("alone", "student"))
    assert any(not torch.equal(alone[k], distilled_weights[k]) for k in alone)


def test_a_same_tokenizer_loss_for_different_tokenizers_is_refused_with_the_fix(models, data, tmp_path, run_cli,
                                                                                write_recipe):
    finished = run_cli("run", str(write_recipe(recipe(models, data, tmp_path, loss="forward_kl"))))
    assert finished.returncode == 2 and "different tokenizers" in finished.stderr
    assert not (tmp_path / "run").exists()


def test_cross_tokenizer_settings_not_built_yet_are_refused(models, data, tmp_path, run_cli, write_recipe):
    opd = {**recipe(models, data, tmp_path), "regime": {"kind": "opd"}}
    finished = run_cli("run", str(write_recipe(opd)))
    assert finished.returncode == 2 and "regime.kind" in finished.stderr


@pytest.mark.parametrize("loss", ["alm", "uld", "gold_hybrid"])
@pytest.mark.parametrize("kind", ["on_policy", "sequence"])
def test_sampling_regimes_hand_the_teacher_text_not_token_ids(models, data, tmp_path, kind, loss, run_cli,
                                                              write_recipe):
    """on_policy: the student samples, the text is tokenized again by the teacher; sequence: the teacher
    generates with its own tokenizer, the text is tokenized by the student. Every objective in both."""
    run = {**recipe(models, data, tmp_path, loss=loss),
           "regime": {"kind": kind, "lmbda": 1.0, "max_new_tokens": 12, "sample_temperature": 1.0}}
    finished = run_cli("run", str(write_recipe(run)))
    assert finished.returncode == 0, finished.stderr
    losses = [json.loads(line) for line in (tmp_path / "run" / "losses.jsonl").read_text().splitlines()]
    distilled = [record for record in losses if record["phase"] == "distilled"]
    assert all(record["kd"] > 0 for record in distilled)
    if kind == "on_policy":
        assert all(record["sampled_batches"] == 1 for record in distilled)
    else:  # the teacher's generations, in its own token ids
        from transformers import AutoTokenizer

        teacher = AutoTokenizer.from_pretrained(models["bpe"])
        rows = [json.loads(line) for line in
                (tmp_path / "run" / "teacher-generations" / "chunk-00000.jsonl").read_text().splitlines()]
        assert rows and all(max(row["completion_ids"], default=0) < len(teacher) for row in rows)


def test_on_policy_samples_reach_the_teacher_as_its_own_tokens(models):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.lm.cross_tokenizer.regime import CrossOnPolicy
    from distill.lm.regimes import Sampling, StudentView

    student_tokenizer, teacher_tokenizer = (AutoTokenizer.from_pretrained(models[n]) for n in ("unigram", "bpe"))
    student = AutoModelForCausalLM.from_pretrained(models["unigram"])
    records = [{"prompt": "Zahlen und", "completion": " Ümlaute"}, {"prompt": "a b", "completion": " c d"}]
    pairs = pair_examples(records, student_tokenizer, teacher_tokenizer, max_length=64, append_eos=True, field="x")
    sampling = Sampling(lmbda=1.0, max_new_tokens=10, eos_token_id=student_tokenizer.eos_token_id)
    regime = CrossOnPolicy(None, student, pairs, records=records, sampling=sampling,
                           student_tokenizer=student_tokenizer, teacher_tokenizer=teacher_tokenizer, max_length=64,
                           student_pad=student_tokenizer.pad_token_id, teacher_pad=teacher_tokenizer.pad_token_id)
    view = StudentView(model=student, engine=student, head=None, vocab_size=len(student_tokenizer),
                       pad_token_id=student_tokenizer.pad_token_id, seed=0, grad_accum=1)
    batch = regime.micro_batch(None, [0, 1], view, step=0, micro=0, rank=0).tensors
    for row in range(2):
        def completion(prefix, tokenizer):
            ids = batch[f"{prefix}input_ids"][row][batch[f"{prefix}labels"][row] != -100].tolist()
            return tokenizer.decode(ids, skip_special_tokens=True).replace(" ", "")
        assert completion("", student_tokenizer) == completion("teacher_", teacher_tokenizer)
        assert batch["teacher_input_ids"][row].max() < len(teacher_tokenizer)


def test_the_two_tokenizer_oracle_scores_every_row_per_symbol(tiny_lm_dir, tmp_path, run_cli, write_recipe):
    """The oracle teacher reads one token per symbol, the student a byte-level BPE of the symbols' text; every
    row gets the tokenization-free metrics per symbol, and the teacher also its exact per-token ones."""
    from distill.lm.tasks.oracle import OracleTask

    tokenizer = OracleTask().student_tokenizer(vocab_size=300, size=300)
    student_dir = tmp_path / "bpe-student"
    tiny_causal_lm(tokenizer, hidden_size=32, num_hidden_layers=1).save_pretrained(student_dir)
    tokenizer.save_pretrained(student_dir)
    run = {"teacher": {"path": str(tiny_lm_dir)}, "student": {"path": str(student_dir)},
           "data": {"builtin": "oracle", "train_size": 16, "eval_size": 8},
           "objective": {"loss": "alm", "ce_weight": 1.0},
           "train": {"steps": 2, "batch_size": 4, "threads": 1, "checkpoint_every": 2,
                     "same_tokenizer_reference": True},
           "eval": {"every": 2, "batch_size": 8, "generate_size": 2, "throughput_tokens": 4},
           "output": str(tmp_path / "run")}
    finished = run_cli("run", str(write_recipe(run)))
    assert finished.returncode == 0, finished.stderr
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    rows = results["rows"]
    assert results["meta"]["primary_metric"] == "oracle_kl_per_symbol"
    # the reference: a student of the same size on the teacher's tokenizer, forward KL (saved, scored both ways)
    assert list(rows) == ["teacher", "same_tokenizer", "alone", "distilled"]
    assert "teacher_top1_agreement" in rows["same_tokenizer"] and "oracle_forward_kl" in rows["same_tokenizer"]
    assert rows["same_tokenizer"]["parameters"] < rows["teacher"]["parameters"]
    assert (tmp_path / "run" / "same-tokenizer" / "config.json").is_file()
    for row in rows.values():
        assert row["oracle_kl_per_symbol"] > 0
        assert row["oracle_nll_per_symbol"] == pytest.approx(row["oracle_kl_per_symbol"]
                                                             + row["oracle_entropy_per_symbol"], rel=1e-9)
    # the teacher reads symbols: its per-symbol NLL is its per-token NLL (one token per symbol, no EOS)
    assert rows["teacher"]["oracle_nll_per_symbol"] == pytest.approx(rows["teacher"]["nll"], rel=1e-5)
    assert "oracle_forward_kl" in rows["teacher"] and "oracle_forward_kl" not in rows["distilled"]


def test_a_slow_tokenizer_is_refused_with_the_fix(models, tmp_path):
    from transformers import AutoTokenizer, ByT5Tokenizer

    from distill.core.errors import DistillError

    slow = ByT5Tokenizer()  # a Python tokenizer (no Rust backend): no offsets
    assert not slow.is_fast
    fast = AutoTokenizer.from_pretrained(models["bpe"])
    with pytest.raises(DistillError, match="no character offsets") as error:
        pair_examples([{"prompt": "a", "completion": " b"}], slow, fast, max_length=16, append_eos=True,
                      field="student.path")
    assert "fast tokenizer" in error.value.fix


def test_a_chat_template_on_one_side_only_still_aligns_the_answer(models):
    """The teacher renders chats with its template, the student (template removed) as a plain transcript: the
    answer's text is what both align, whatever surrounds it."""
    from transformers import AutoTokenizer

    teacher = AutoTokenizer.from_pretrained(models["bpe"])
    student = AutoTokenizer.from_pretrained(models["unigram"])
    student.chat_template = None
    row = {"messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "naïve café 12"}]}
    pair, = pair_examples([row], student, teacher, max_length=64, append_eos=True, field="data.train")
    assert pair.text == "naïve café 12" and pair.chunks >= 2
    teacher_answer = [t for t, c in zip(pair.teacher.input_ids, pair.teacher_chunk) if c >= 0]
    student_answer = [t for t, c in zip(pair.student.input_ids, pair.student_chunk) if c >= 0]
    assert teacher.decode(teacher_answer).replace(" ", "") == student.decode(student_answer).replace(" ", "")


def test_rows_whose_answers_do_not_align_are_refused_when_none_is_left(models, tmp_path, run_cli, write_recipe):
    """Only whitespace to align (WordPiece drops it all): no chunk, so nothing to distil: a clear error."""
    path = tmp_path / "blank.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": "   "}) + "\n" for i in range(12)))
    run = {**recipe(models, path, tmp_path, teacher="wordpiece", student="bpe"),
           "data": {"train": str(path), "eval_size": 4, "max_length": 32}}
    finished = run_cli("run", str(write_recipe(run)))
    assert finished.returncode == 2 and "no training row has a completion chunk" in finished.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("loss", ["alm", "uld", "gold_hybrid"])
def test_a_cache_of_the_teachers_own_tokens_trains_the_student_the_live_teacher_does(models, data, tmp_path, run_cli,
                                                                                    write_recipe, loss):
    """`distill cache` stores the teacher's top-k and log-probability of each of its own tokens; a student with
    another tokenizer aligns to them at training time (the cache holds no student tokens: any student can use
    it). ALM reads the token log-probabilities (float32: equal to the live teacher); ULD and GOLD the top-k, here
    the whole vocabulary, in float16 (equal to the float16 rounding; ULD's gradient is the sign of the sorted
    differences, which the rounding did not flip here: the same weights)."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    vocabulary = len(AutoTokenizer.from_pretrained(models["bpe"]))
    live = {**recipe(models, data, tmp_path, loss=loss), "output": str(tmp_path / "live")}
    live["train"]["baseline"] = False
    cached = {**live, "regime": {"kind": "cache", "path": str(tmp_path / "cache"), "k": vocabulary,
                                 "values": "float16"}, "output": str(tmp_path / "cached")}
    assert run_cli("run", str(write_recipe(live, "live.yaml"))).returncode == 0
    built = run_cli("cache", str(write_recipe(cached, "cached.yaml")))
    assert built.returncode == 0, built.stderr
    trained = run_cli("run", str(write_recipe(cached, "cached.yaml")))
    assert trained.returncode == 0, trained.stderr
    first, second = load_file(str(tmp_path / "live/student/model.safetensors")), load_file(
        str(tmp_path / "cached/student/model.safetensors"))
    difference = max(float((first[k] - second[k]).abs().max()) for k in first)
    assert difference < (1e-5 if loss == "alm" else 2e-4), difference
    rows = json.loads((tmp_path / "cached" / "results.json").read_text())["rows"]
    assert rows["teacher"]["nll_per_char"] > 0


def test_a_served_teacher_with_another_tokenizer_is_asked_about_its_own_tokens(models, data, tmp_path, run_cli,
                                                                               write_recipe):
    """ALM against `distill serve` (the teacher's tokenizer checked against teacher.path) equals the live teacher;
    ULD against it runs on its top-k."""
    from safetensors.torch import load_file

    from conftest import serving

    live = {**recipe(models, data, tmp_path, loss="alm"), "output": str(tmp_path / "live")}
    live["train"]["baseline"] = False
    assert run_cli("run", str(write_recipe(live, "live.yaml"))).returncode == 0
    with serving(models["bpe"]) as base:
        served = {**live, "teacher": {"path": str(models["bpe"]), "url": f"{base}/v1", "top_k": 8},
                  "output": str(tmp_path / "served")}
        finished = run_cli("run", str(write_recipe(served, "served.yaml")))
        assert finished.returncode == 0, finished.stderr
        uld = {**served, "objective": {"loss": "uld", "ce_weight": 0.5}, "output": str(tmp_path / "uld")}
        assert run_cli("run", str(write_recipe(uld, "uld.yaml"))).returncode == 0
    first, second = load_file(str(tmp_path / "live/student/model.safetensors")), load_file(
        str(tmp_path / "served/student/model.safetensors"))
    assert max(float((first[k] - second[k]).abs().max()) for k in first) < 1e-5
    rows = json.loads((tmp_path / "served" / "results.json").read_text())["rows"]
    live_rows = json.loads((tmp_path / "live" / "results.json").read_text())["rows"]
    assert rows["teacher"]["nll_per_char"] == pytest.approx(live_rows["teacher"]["nll_per_char"], rel=1e-5)


def test_the_other_direction_a_bpe_teacher_for_a_student_that_reads_symbols(tmp_path, run_cli, write_recipe):
    """`distill train-teacher builtin:oracle --tokenizer bpe` trains a teacher on the BPE; a student with one token
    per symbol learns from it; both are scored per symbol (the student also per token, exactly)."""
    from distill.lm.tasks.oracle import OracleTask

    trained = run_cli("train-teacher", "builtin:oracle", "--tokenizer", "bpe", "--out", str(tmp_path / "teacher"),
                      "--steps", "2", "--train-size", "64", "--threads", "1")
    assert trained.returncode == 0, trained.stderr
    card = json.loads((tmp_path / "teacher" / "teacher_card.json").read_text())
    assert "--tokenizer bpe" in card["command"] and "oracle_kl_per_symbol" in card["metrics"]
    OracleTask().make_bpe_student(tmp_path / "student", hidden_size=32, num_hidden_layers=1, symbols=True)
    run = {"teacher": {"path": str(tmp_path / "teacher")}, "student": {"path": str(tmp_path / "student")},
           "data": {"builtin": "oracle", "train_size": 16, "eval_size": 8},
           "objective": {"loss": "alm", "ce_weight": 1.0},
           "train": {"steps": 2, "batch_size": 4, "threads": 1, "checkpoint_every": 2},
           "eval": {"every": 2, "batch_size": 8, "generate_size": 2, "throughput_tokens": 4},
           "output": str(tmp_path / "run")}
    finished = run_cli("run", str(write_recipe(run)))
    assert finished.returncode == 0, finished.stderr
    rows = json.loads((tmp_path / "run" / "results.json").read_text())["rows"]
    assert "oracle_forward_kl" not in rows["teacher"] and "oracle_forward_kl" in rows["distilled"]
    assert all(row["oracle_kl_per_symbol"] > 0 for row in rows.values())
    refused = run_cli("train-teacher", "builtin:arithmetic", "--tokenizer", "bpe", "--out", str(tmp_path / "x"))
    assert refused.returncode == 2 and "--tokenizer" in refused.stderr


def test_alm_with_debiasing_and_merging_trains_end_to_end(models, data, tmp_path, run_cli, write_recipe):
    run = recipe(models, data, tmp_path, loss="alm", debias=True, merge_threshold=0.1)
    finished = run_cli("run", str(write_recipe(run)))
    assert finished.returncode == 0, finished.stderr
    losses = [json.loads(line) for line in (tmp_path / "run" / "losses.jsonl").read_text().splitlines()]
    assert all(record["kd"] > 0 for record in losses if record["phase"] == "distilled")
    cached = {**run, "regime": {"kind": "cache", "path": str(tmp_path / "cache")}, "output": str(tmp_path / "x")}
    refused = run_cli("run", str(write_recipe(cached, "cached.yaml")))
    assert refused.returncode == 2 and "objective.debias" in refused.stderr


def test_boundary_tokens_of_each_tokenizer_family(models):
    from transformers import AutoTokenizer

    from distill.lm.cross_tokenizer.regime import boundary_mask
    from distill.lm.tasks.oracle import OracleTask

    for name in ("bpe", "wordpiece", "unigram"):
        tokenizer = AutoTokenizer.from_pretrained(models[name])
        mask = boundary_mask(tokenizer)
        word = tokenizer("hello world", add_special_tokens=False).input_ids
        pieces = tokenizer.convert_ids_to_tokens(word)
        # the token that begins "world" (after the space) starts a unit; a token inside a word does not
        starts = [mask[t].item() for t in word]
        assert any(starts), (name, pieces)
        assert all(mask[t] for t in tokenizer.all_special_ids)
        if name == "wordpiece":
            assert all(mask[t].item() == (not p.startswith("##")) for t, p in zip(word, pieces))
    words = OracleTask().tokenizer()
    assert boundary_mask(words).all()  # one token per word: every token starts one


def test_an_overlap_divergence_on_the_shared_vocabulary(models, data, tmp_path, run_cli, write_recipe):
    """objective.overlap_loss: the divergence between aligned chunk rows over the entries both vocabularies share,
    renormalised there; against a loop over the chunks, and end to end with ALM."""
    from transformers import AutoTokenizer

    from distill.core.recipe import load_recipe
    from distill.losses import forward_kl
    from distill.lm.cross_tokenizer.regime import CrossObjective, matched_vocabulary

    student_tokenizer, teacher_tokenizer = (AutoTokenizer.from_pretrained(models[n]) for n in ("unigram", "bpe"))
    rows = [{"prompt": "a b", "completion": " hello world, café"}, {"prompt": "x", "completion": " 12 apples"}]
    pairs = pair_examples(rows, student_tokenizer, teacher_tokenizer, max_length=64, append_eos=True, field="x")
    batch = collate_pairs(pairs, 0, 0)
    spec = load_recipe(recipe(models, data, tmp_path, loss="alm", overlap_loss="forward_kl")).objective
    matched = matched_vocabulary(student_tokenizer, teacher_tokenizer)
    objective = CrossObjective(spec, student_vocab=len(student_tokenizer), teacher_vocab=len(teacher_tokenizer),
                               matched=matched)
    generator = torch.Generator().manual_seed(0)
    student = torch.randn(2, batch["input_ids"].shape[1] - 1, len(student_tokenizer), generator=generator)
    teacher = torch.randn(2, batch["teacher_input_ids"].shape[1] - 1, len(teacher_tokenizer), generator=generator)
    value = objective._overlap(objective._chunks(student, teacher, batch, None, from_cache=False))
    expected, count = 0.0, 0
    for b, pair in enumerate(pairs):
        for c in range(pair.chunks):
            rows_ = []
            for logits, chunk, ids, ids_key in ((student, batch["chunk"], matched[0], "input_ids"),
                                                (teacher, batch["teacher_chunk"], matched[1], "teacher_input_ids")):
                positions = [t for t in range(chunk.shape[1] - 1) if chunk[b, t + 1] == c]
                logprobs = torch.log_softmax(logits[b], -1)
                prefix = sum(logprobs[t, batch[ids_key][b, t + 1]] for t in positions[:-1])
                rows_.append((logprobs[positions[-1]] + prefix)[ids])
            expected += forward_kl(rows_[0][None], rows_[1][None]).item()
            count += 1
    assert value.item() == pytest.approx(expected / count, rel=1e-5)
    finished = run_cli("run", str(write_recipe(recipe(models, data, tmp_path, loss="alm", overlap_loss="forward_kl"))))
    assert finished.returncode == 0, finished.stderr
    losses = [json.loads(line) for line in (tmp_path / "run" / "losses.jsonl").read_text().splitlines()]
    assert all(record.get("overlap", 0) > 0 for record in losses if record["phase"] == "distilled")
