"""Real-size levers on tiny models: mixed precision, gradient checkpointing, LoRA students, and the
behaviour of real checkpoints (no pad token, generation config, chat template, remote code, tied
embeddings). Sharding has its own file (test_sharding.py); memory and speed are benchmarks/scale.py's."""
from __future__ import annotations

import gc
import json
import math
from pathlib import Path

import pytest
import torch

import distill
from distill.core.errors import DistillError
from tests.conftest import assert_same_student, run_interrupted_and_resumed


def _losses(run_dir: Path, phase: str = "distilled") -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "losses.jsonl").read_text().splitlines()]
    return [row["loss"] for row in rows if row["phase"] == phase]


def _no_baseline(recipe: dict, **train) -> dict:
    return {**recipe, "train": {**recipe["train"], "baseline": False, **train}}


# ---- precision ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_tracks_fp32(tiny_recipe, tmp_path, precision):
    """Autocast runs track the fp32 run's per-step losses (bf16 has ~3 significant digits: 2% relative;
    fp16 ~1%), while master weights stay float32."""
    fp32 = distill.run({**_no_baseline(tiny_recipe), "output": str(tmp_path / "fp32")})
    mixed = distill.run({**_no_baseline(tiny_recipe, precision=precision), "output": str(tmp_path / precision)})
    reference, losses = _losses(fp32.run_dir), _losses(mixed.run_dir)
    assert len(losses) == len(reference) == 4
    assert losses != reference  # it did compute in lower precision
    for a, b in zip(losses, reference):
        assert abs(a - b) <= 0.02 * abs(b), (losses, reference)
    from safetensors.torch import load_file

    weights = load_file(str(mixed.run_dir / "student" / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}


def test_fp16_resume_restores_the_grad_scaler(tiny_recipe, tmp_path, monkeypatch):
    recipe = _no_baseline(tiny_recipe, precision="fp16")
    straight, resumed = run_interrupted_and_resumed(recipe, tmp_path, monkeypatch)
    assert_same_student(straight.run_dir, resumed.run_dir)


def test_pure_bf16_student(tiny_recipe, tmp_path):
    recipe = {**_no_baseline(tiny_recipe), "student": {**tiny_recipe["student"], "dtype": "bfloat16"}}
    result = distill.run({**recipe, "output": str(tmp_path / "bf16")})
    from safetensors.torch import load_file

    weights = load_file(str(result.run_dir / "student" / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.bfloat16}
    assert all(math.isfinite(x) for x in _losses(result.run_dir))


def test_half_precisions_do_not_mix(tiny_recipe, tmp_path):
    recipe = {**_no_baseline(tiny_recipe, precision="fp16"), "student": {**tiny_recipe["student"],
                                                                         "dtype": "bfloat16"}}
    with pytest.raises(DistillError, match="fp16"):
        distill.run(recipe)
    assert not Path(tiny_recipe["output"]).exists()


# ---- gradient checkpointing ------------------------------------------------------------------------

def _one_step_grads(tiny_lm_dir, *, fused: bool, checkpointing: bool, tied: bool = False) -> dict:
    """Gradients of one distillation micro-batch through the trainer's own objects."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from distill.lm.data import collate
    from distill.lm.models import build_student
    from distill.lm.objective import TokenObjective
    from distill.lm.recipe import ObjectiveSpec, TrainSpec
    from distill.lm.regimes import Distill
    from distill.lm.teacher.live import LiveTeacher
    from distill.lm.trainer import LMTrainer

    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_lm_dir).eval()
    student = build_student(teacher, {"num_hidden_layers": 2, "tie_word_embeddings": tied}, None, seed=1)
    objective = TokenObjective(ObjectiveSpec(loss="jsd", beta=0.3, ce_weight=0.5), vocab_size=teacher.vocab_size,
                               memory_budget_bytes=2**16)
    spec = TrainSpec(steps=1, batch_size=4, fused_loss=fused, gradient_checkpointing=checkpointing)
    trainer = LMTrainer(accelerator=Accelerator(cpu=True), student=student, regime=Distill(objective,
                        LiveTeacher(teacher)), phase="distilled", examples=[], pad_token_id=0,
                        vocab_size=teacher.vocab_size, spec=spec, eval_every=1, evaluate=dict, run_dir=None)
    assert (trainer.student.head is not None) == fused
    generator = torch.Generator().manual_seed(3)
    from distill.lm.data import Example

    examples = []
    for length in (12, 9, 16, 5):
        ids = torch.randint(3, teacher.vocab_size, (length,), generator=generator).tolist()
        examples.append(Example(ids, [-100] * 3 + ids[3:], str(length)))
    batch = collate(examples, 0)
    trainer.engine.train()
    valid = int((batch["labels"][:, 1:] != -100).sum())
    trainer.regime.loss(batch, trainer.student, valid).loss.backward()
    uses_checkpoints = any(getattr(m, "gradient_checkpointing", False) for m in student.modules())
    assert uses_checkpoints == checkpointing
    return {name: p.grad.clone() for name, p in student.named_parameters()}


@pytest.mark.parametrize("fused", [True, False])
def test_gradient_checkpointing_gives_the_same_gradients(tiny_lm_dir, fused):
    """float32: recomputed activations give the same gradients (tolerance 1e-6 absolute / 1e-5 relative)."""
    plain = _one_step_grads(tiny_lm_dir, fused=fused, checkpointing=False)
    checkpointed = _one_step_grads(tiny_lm_dir, fused=fused, checkpointing=True)
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_tied_embeddings_on_the_fused_path(tiny_lm_dir):
    """SmolLM-style tied head: the fused path's gradients equal the plain path's (the shared matrix gets
    both its embedding and its head gradient)."""
    fused = _one_step_grads(tiny_lm_dir, fused=True, checkpointing=False, tied=True)
    plain = _one_step_grads(tiny_lm_dir, fused=False, checkpointing=False, tied=True)
    assert "lm_head.weight" not in fused  # one parameter, listed once
    for name in plain:
        torch.testing.assert_close(fused[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_gradient_checkpointing_run_end_to_end(tiny_recipe, tmp_path, run_cli):
    import yaml

    recipe = _no_baseline(tiny_recipe, gradient_checkpointing=True)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = run_cli("run", str(path))
    assert result.returncode == 0, result.stderr
    plain = distill.run({**_no_baseline(tiny_recipe), "output": str(tmp_path / "plain")})
    assert len(_losses(Path(recipe["output"]))) == len(_losses(plain.run_dir)) == 4
    for a, b in zip(_losses(Path(recipe["output"])), _losses(plain.run_dir)):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)


# ---- LoRA --------------------------------------------------------------------------------------------

LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": ["q_proj", "v_proj", "up_proj"]}


@pytest.fixture
def lora_recipe(tiny_recipe, tiny_lm_dir):
    """A LoRA student on a full copy of the teacher (`student.path`)."""
    return {**_no_baseline(tiny_recipe), "student": {"path": str(tiny_lm_dir), "lora": LORA},
            "train": {**tiny_recipe["train"], "baseline": False, "lr": 1e-2}}


def test_lora_trains_only_adapters_and_saves_adapter_and_merged_model(lora_recipe, tiny_lm_dir):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    result = distill.run(lora_recipe)
    student_dir = result.run_dir / "student"
    merged = AutoModelForCausalLM.from_pretrained(student_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    changed = {name for name, tensor in merged.state_dict().items()
               if not torch.equal(tensor, base.state_dict()[name])}
    # Only the adapted projections moved (merged: W + (alpha / r) B A); embeddings, norms, head, the rest not.
    assert changed and all(name.rsplit(".", 2)[-2] in LORA["target_modules"] for name in changed), changed
    adapter = load_file(str(student_dir / "adapter" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in name for name in adapter)
    # base + adapter == merged
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm_dir), student_dir / "adapter")
    ids = torch.tensor([[1, 5, 7, 9, 4]])
    torch.testing.assert_close(reloaded(ids).logits, merged(ids).logits, atol=1e-5, rtol=1e-5)
    assert result.rows["distilled"]["nll"] != result.rows["teacher"]["nll"]


def test_lora_student_built_from_config_and_resume_is_bit_identical(tiny_recipe, tmp_path, monkeypatch):
    recipe = {**_no_baseline(tiny_recipe), "student": {**tiny_recipe["student"], "lora": {"r": 2}}}
    straight, resumed = run_interrupted_and_resumed(recipe, tmp_path, monkeypatch)
    assert_same_student(straight.run_dir, resumed.run_dir)
    from safetensors.torch import load_file

    checkpoint = next((resumed.run_dir / "checkpoints" / "distilled").glob("**/model.safetensors"))
    assert all("lora_" in name for name in load_file(str(checkpoint)))  # adapters only, not the frozen base


def test_lora_bad_target_modules_list_the_names_that_exist(lora_recipe):
    lora_recipe["student"]["lora"] = {"target_modules": ["query", "v_proj"]}
    with pytest.raises(DistillError) as caught:
        distill.run(lora_recipe)
    message = str(caught.value)
    assert "student.lora.target_modules" in message and "query" in message and "q_proj" in message
    assert not Path(lora_recipe["output"]).exists()


def test_adapter_directory_as_student_path_is_refused(lora_recipe, tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "my/base"}))
    lora_recipe["student"] = {"path": str(adapter)}
    with pytest.raises(DistillError) as caught:
        distill.run(lora_recipe)
    assert "student.path" in str(caught.value) and "my/base" in str(caught.value)
    assert not Path(lora_recipe["output"]).exists()


def _distinct_weight_storages() -> int:
    storages = set()
    for obj in gc.get_objects():
        if isinstance(obj, torch.nn.Module):
            for tensor in obj.state_dict().values():
                storages.add(tensor.untyped_storage().data_ptr())
    return len(storages)


def test_self_distillation_with_lora_keeps_one_copy_of_the_base(tiny_recipe, tmp_path, monkeypatch):
    """OPSD + LoRA: the teacher is the base with adapters disabled; no snapshot copy is made, and the
    teacher's logits are the base model's."""
    from distill.core.recipe import parse_recipe
    from distill.core.rundir import RunDirectory
    from distill.lm import regimes
    from distill.lm.run import prepare

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"a{i % 3} b{i % 5}", "completion": f" c{i % 4} d{i % 2}"}) + "\n"
                            for i in range(16)))
    recipe = {**_no_baseline(tiny_recipe), "data": {"train": str(rows), "eval_size": 4},
              "regime": {"kind": "self", "max_new_tokens": 3}}
    counts = {}
    for name, lora in (("full", None), ("lora", {"r": 2})):
        student = {**tiny_recipe["student"], **({"lora": lora} if lora else {})}
        parsed = parse_recipe({**recipe, "student": student, "output": str(tmp_path / name)})
        gc.collect()
        job = prepare(parsed, RunDirectory(parsed.output))
        before = _distinct_weight_storages()
        regime, _ = job.distill_regime(RunDirectory(parsed.output))
        gc.collect()
        counts[name] = _distinct_weight_storages() - before
        assert isinstance(regime, regimes.SelfDistill)
        assert regime.base_teacher == (lora is not None) and (regime.snapshot is None) == (lora is not None)
        del job, regime
    assert counts["lora"] == 0 and counts["full"] > 0, counts
    seen = {}
    original = regimes.StudentView.base_logits

    def spy(self, input_ids, attention_mask):
        logits = original(self, input_ids, attention_mask)
        with torch.no_grad():
            seen["adapted"] = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        seen["base"] = logits
        return logits

    monkeypatch.setattr(regimes.StudentView, "base_logits", spy)
    result = distill.run({**recipe, "student": {**tiny_recipe["student"], "lora": {"r": 2}},
                          "output": str(tmp_path / "run")})
    assert (result.run_dir / "student" / "adapter" / "adapter_config.json").is_file()
    assert "base" in seen and not torch.equal(seen["base"], seen["adapted"])  # adapters were off for the teacher


# ---- real checkpoints ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def llama_style_teacher(tmp_path_factory, tiny_lm_dir) -> Path:
    """The tiny teacher re-saved the way Llama/SmolLM checkpoints come: no pad token, a chat template,
    a generation config of its own and tied embeddings."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    directory = tmp_path_factory.mktemp("llama_style")
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm_dir)
    tokenizer.pad_token = None
    tokenizer.chat_template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    model = AutoModelForCausalLM.from_pretrained(tiny_lm_dir)
    config = model.config
    config.tie_word_embeddings = True
    config.pad_token_id = None
    torch.manual_seed(0)
    tied = AutoModelForCausalLM.from_config(config)
    tied.generation_config = GenerationConfig(eos_token_id=[2, 3], temperature=0.6, top_p=0.9, do_sample=True)
    tied.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    assert AutoTokenizer.from_pretrained(directory).pad_token is None
    return directory


def test_real_checkpoint_conventions_travel_into_the_student(tiny_recipe, llama_style_teacher, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    recipe = {**_no_baseline(tiny_recipe), "teacher": {"path": str(llama_style_teacher)},
              "student": {"config": {"num_hidden_layers": 1}, "init_from_teacher_layers": [1]}}
    result = distill.run(recipe)
    student_dir = result.run_dir / "student"
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    assert tokenizer.pad_token == tokenizer.eos_token  # padded with EOS, no new embedding row
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(llama_style_teacher).chat_template
    generation = GenerationConfig.from_pretrained(student_dir)
    assert generation.eos_token_id == [2, 3] and generation.temperature == 0.6
    student = AutoModelForCausalLM.from_pretrained(student_dir)
    assert student.config.tie_word_embeddings
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    rows = [json.loads(line) for line in (result.run_dir / "losses.jsonl").read_text().splitlines()]
    assert all(row["fused_loss"] for row in rows)


def test_remote_code_is_refused_unless_trusted(tiny_recipe, tiny_lm_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    custom = tmp_path / "custom"
    AutoModelForCausalLM.from_pretrained(tiny_lm_dir).save_pretrained(custom)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (Path(tiny_lm_dir) / name).is_file():
            (custom / name).write_bytes((Path(tiny_lm_dir) / name).read_bytes())
    (custom / "modeling_custom.py").write_text(
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'distill_custom'\n"
        "class CustomForCausalLM(LlamaForCausalLM):\n    config_class = CustomConfig\n")
    config = json.loads((custom / "config.json").read_text())
    config.update(model_type="distill_custom", architectures=["CustomForCausalLM"],
                  auto_map={"AutoConfig": "modeling_custom.CustomConfig",
                            "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (custom / "config.json").write_text(json.dumps(config))
    recipe = {**_no_baseline(tiny_recipe), "teacher": {"path": str(custom)}}
    with pytest.raises(DistillError) as caught:
        distill.run(recipe)
    assert "teacher.trust_remote_code" in str(caught.value)
    assert not Path(recipe["output"]).exists()
    recipe["teacher"]["trust_remote_code"] = True
    result = distill.run(recipe)
    assert result.rows["teacher"]["nll"] > 0


def test_unsupported_precision_is_refused_before_anything_is_written(tiny_recipe, monkeypatch):
    """A device without bf16 (an old GPU): the run stops at train.precision, no run directory."""
    import distill.lm.trainer as trainer

    def no_autocast(*args, **kwargs):
        raise RuntimeError("autocast: this device has no bfloat16")

    monkeypatch.setattr(trainer.torch, "autocast", no_autocast)
    with pytest.raises(DistillError, match=r"train\.precision"):
        distill.run(_no_baseline(tiny_recipe, precision="bf16"))
    assert not Path(tiny_recipe["output"]).exists()
