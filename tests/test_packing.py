"""data.packing: whole examples packed into max_length blocks with per-document attention. A packed batch
must compute what its documents compute unpacked: logits, the CE and KD losses and their gradients."""
from __future__ import annotations

import json

import pytest
import torch

from distill.lm.data import IGNORE_INDEX, Example, check_packing, collate, model_inputs, pack, packing_honoured

LENGTHS = (5, 9, 3, 7, 4, 11, 2, 6)


def documents(vocab: int, lengths=LENGTHS, seed: int = 0, prompt: int = 0) -> list[Example]:
    """Random documents; the first `prompt` tokens of each odd-numbered one carry no loss (prompt/completion
    rows), the even-numbered ones have a loss on every token (text rows)."""
    generator = torch.Generator().manual_seed(seed)
    out = []
    for index, length in enumerate(lengths):
        ids = torch.randint(3, vocab, (length,), generator=generator).tolist()
        masked = prompt if index % 2 else 0
        out.append(Example(ids, [IGNORE_INDEX] * masked + ids[masked:], str(index)))
    return out


def test_pack_keeps_every_document_whole_and_apart():
    docs = documents(50)
    blocks = pack(docs, 16)
    assert all(len(b.input_ids) <= 16 for b in blocks)
    assert len(blocks) < len(docs)
    seen = []
    for block in blocks:
        offset = 0
        for doc_id in block.id.split("+"):
            doc = docs[int(doc_id)]
            n = len(doc.input_ids)
            assert block.input_ids[offset:offset + n] == doc.input_ids
            assert block.positions[offset:offset + n] == list(range(n))  # positions restart
            # the first token of a document is never a target (nothing before it in its document)
            assert block.labels[offset:offset + n] == [IGNORE_INDEX] + doc.labels[1:]
            offset += n
            seen.append(int(doc_id))
        assert offset == len(block.input_ids)
    assert sorted(seen) == list(range(len(docs)))
    assert [b.id for b in pack(docs, 16)] == [b.id for b in blocks]  # deterministic
    batch = collate(blocks, 0)
    assert "position_ids" in batch and model_inputs(batch)["attention_mask"] is None
    assert "position_ids" not in collate(docs, 0)


def _models():
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    # GPT-2 has absolute position embeddings: restarting positions matter, not only the mask
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, bos_token_id=1,
                                      eos_token_id=2))
    return {"llama": llama, "gpt2": gpt2}


@pytest.mark.parametrize("architecture", ["llama", "gpt2"])
@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_packed_logits_equal_unpacked(architecture, attention):
    """Tolerance 1e-5 absolute (float32)."""
    model = _models()[architecture].eval()
    model.config._attn_implementation = attention
    docs = documents(64)
    blocks = pack(docs, 16)
    with torch.no_grad():
        packed = model(**model_inputs(collate(blocks, 0)), use_cache=False).logits
        alone = model(**model_inputs(collate(docs, 0)), use_cache=False).logits
    for row, block in enumerate(blocks):
        offset = 0
        for doc_id in block.id.split("+"):
            n = len(docs[int(doc_id)].input_ids)
            torch.testing.assert_close(packed[row, offset:offset + n], alone[int(doc_id), :n], atol=1e-5, rtol=1e-5)
            offset += n
    assert packing_honoured(model)


def _loss_and_grads(student, teacher, examples, *, loss: str, fused: bool, ce_weight: float, kd_weight: float):
    from accelerate import Accelerator

    from distill.lm.objective import TokenObjective
    from distill.lm.recipe import ObjectiveSpec, TrainSpec
    from distill.lm.regimes import Distill
    from distill.lm.teacher.live import LiveTeacher
    from distill.lm.trainer import LMTrainer

    student.zero_grad(set_to_none=True)
    objective = TokenObjective(ObjectiveSpec(loss=loss, ce_weight=ce_weight, kd_weight=kd_weight),
                               vocab_size=64, memory_budget_bytes=2**14)
    trainer = LMTrainer(accelerator=Accelerator(cpu=True), student=student,
                        regime=Distill(objective, LiveTeacher(teacher) if kd_weight else None), phase="distilled",
                        examples=[], pad_token_id=0, vocab_size=64, spec=TrainSpec(steps=1, fused_loss=fused),
                        eval_every=1, evaluate=dict, run_dir=None)
    assert (trainer.student.head is not None) == fused
    batch = collate(examples, 0)
    valid = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    trainer.engine.train()
    value = trainer.regime.loss(batch, trainer.student, valid).loss
    value.backward()
    return value.detach(), {name: p.grad.clone() for name, p in student.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("objective", ["ce", "forward_kl", "jsd"])
def test_packed_loss_and_gradients_equal_unpacked(objective, fused):
    """The loss of a packed batch (a mean over its valid tokens) equals the loss of the same documents
    unpacked (the same tokens), and so do the gradients: tolerance 1e-5 relative / 1e-6 absolute (float32)."""
    from distill.lm.models import build_student

    models = _models()
    teacher = models["llama"].eval()
    student = build_student(teacher, {"num_hidden_layers": 1}, None, seed=1)
    docs = documents(64, prompt=2)  # odd documents: 2 prompt tokens masked (completion_only data); even: text
    options = dict(loss="forward_kl" if objective == "ce" else objective, fused=fused,
                   ce_weight=1.0 if objective == "ce" else 0.0, kd_weight=0.0 if objective == "ce" else 1.0)
    unpacked_loss, unpacked_grads = _loss_and_grads(student, teacher, docs, **options)
    packed_loss, packed_grads = _loss_and_grads(student, teacher, pack(docs, 16), **options)
    torch.testing.assert_close(packed_loss, unpacked_loss, atol=1e-6, rtol=1e-5)
    assert packed_grads.keys() == unpacked_grads.keys()
    for name in unpacked_grads:
        torch.testing.assert_close(packed_grads[name], unpacked_grads[name], atol=1e-6, rtol=1e-5, msg=name)


class _IgnoresPositions(torch.nn.Module):
    """A real causal LM called through a forward that drops the packing information (as an architecture
    whose mask code ignores restarting position ids would)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=False):
        return self.model(input_ids=input_ids, use_cache=use_cache)


def test_a_model_that_mixes_packed_documents_is_refused():
    from distill.core.errors import DistillError

    model = _models()["llama"]
    assert not packing_honoured(_IgnoresPositions(model))
    with pytest.raises(DistillError) as error:
        check_packing({"student": _IgnoresPositions(model), "teacher": model})
    assert error.value.field == "data.packing" and "student" in str(error.value)


def test_packing_end_to_end_cli(tiny_recipe, write_recipe, run_cli, tmp_path):
    """A text corpus trained packed through the CLI: the run reports how the blocks were filled, and the
    teacher signal and losses are finite."""
    words = ["the", "cat", "sat", "on", "a", "mat", "dog", "ran"]
    rows = [{"text": " ".join(words[(i + j) % len(words)] for j in range(3 + i % 7))} for i in range(40)]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = {**tiny_recipe, "data": {"train": str(tmp_path / "corpus.jsonl"), "eval_size": 8, "max_length": 32,
                                      "packing": True}}
    result = run_cli("run", str(write_recipe(recipe)))
    assert result.returncode == 0, result.stderr
    meta = json.loads((tmp_path / "run" / "results.json").read_text())["meta"]
    assert meta["packing"]["documents"] == 32 and meta["packing"]["blocks"] < 32
    assert 0.5 < meta["packing"]["fill"] <= 1.0
    assert any("packed 32 training examples" in note for note in meta["notes"])
    losses = [json.loads(line) for line in (tmp_path / "run" / "losses.jsonl").read_text().splitlines()]
    assert losses and all(torch.isfinite(torch.tensor(r["loss"])) for r in losses)


def test_packing_with_a_sampling_regime_is_refused_before_anything_loads(tiny_recipe, write_recipe, run_cli):
    recipe = {**tiny_recipe, "data": {**tiny_recipe["data"], "packing": True}, "regime": {"kind": "on_policy"}}
    result = run_cli("run", str(write_recipe(recipe)))
    assert result.returncode == 2
    assert "data.packing" in result.stderr and "off_policy and cache" in result.stderr


def test_packed_blocks_cached_then_trained_from_the_cache(tiny_recipe, write_recipe, run_cli, tmp_path):
    """regime cache with packing: `distill cache` stores the teacher's top-k over the packed blocks (the model
    sees their position ids), and training from the cache gives the same teacher signal as a live teacher on
    those blocks (the cached top-1 is the live teacher's argmax at every valid position)."""
    import yaml
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.lm.data import load_data
    from distill.lm.recipe import DataSpec
    from distill.lm.teacher.cache.store import TeacherCache

    words = ["the", "cat", "sat", "on", "a", "mat"]
    rows = [{"text": " ".join(words[(i * j) % len(words)] for j in range(2 + i % 6))} for i in range(30)]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = {"train": str(tmp_path / "corpus.jsonl"), "eval_size": 6, "max_length": 24, "packing": True}
    recipe = {**tiny_recipe, "data": data, "regime": {"kind": "cache", "path": str(tmp_path / "cache"), "k": 4},
              "train": {**tiny_recipe["train"], "baseline": False}}
    path = write_recipe(recipe)
    built = run_cli("cache", str(path))
    assert built.returncode == 0, built.stderr[-3000:]
    trained = run_cli("run", str(path))
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["meta"]["packing"]["blocks"] < 24

    teacher_dir = yaml.safe_load(path.read_text())["teacher"]["path"]
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    _, _, blocks, _ = load_data(DataSpec(**data), tokenizer, None)
    cache = TeacherCache(str(tmp_path / "cache"))
    spans = cache.rows_for("train", blocks)
    batch = collate(blocks, tokenizer.pad_token_id or 0)
    mask = batch["labels"][:, 1:] != IGNORE_INDEX
    ids, logprobs, _ = cache.batch(spans, mask)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    with torch.no_grad():
        live = teacher(**model_inputs(batch), use_cache=False).logits[:, :-1]
    cached_top1 = ids.gather(-1, logprobs.argmax(-1, keepdim=True)).squeeze(-1)
    assert torch.equal(cached_top1[mask], live.argmax(-1)[mask])
