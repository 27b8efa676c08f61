"""Models: building a student from the teacher's config, copying teacher layers, vocabulary
checks, and loading from local directories (never from a hub)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from distill.core.errors import DistillError
from distill.core.metrics import count_parameters
from distill.core.assets import ASSETS
from distill.lm.models import (build_student, check_same_vocabulary, copy_teacher_layers,
                            load_causal_lm, load_tokenizer, resolve_model_path, tiny_llama_config)
from distill.lm.tasks.arithmetic import ArithmeticTask
from distill.lm.tasks.oracle import OracleTask

torch.set_num_threads(1)

SMALL = dict(hidden_size=16, num_attention_heads=2, num_hidden_layers=1, intermediate_size=32)


@pytest.fixture(scope="module")
def tokenizer(tiny_lm_dir):
    return load_tokenizer(str(tiny_lm_dir), "teacher.path")


@pytest.fixture(scope="module")
def teacher(tiny_lm_dir):
    return load_causal_lm(str(tiny_lm_dir), "teacher.path").eval()


def _same_weights(a, b) -> bool:
    a_state, b_state = a.state_dict(), b.state_dict()
    return a_state.keys() == b_state.keys() and all(torch.equal(a_state[k], b_state[k]) for k in a_state)


# ---- build_student ------------------------------------------------------------------------------

def test_build_student_takes_the_overrides(teacher):
    student = build_student(teacher, SMALL, None, seed=0)
    config = student.config
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (16, 1, 2)
    assert config.intermediate_size == 32 and config.num_key_value_heads == 2
    assert config.head_dim == 8  # follows hidden_size / heads, as the teacher's did
    assert config.vocab_size == teacher.config.vocab_size
    attention = student.model.layers[0].self_attn
    assert attention.q_proj.weight.shape == (16, 16) and attention.k_proj.weight.shape == (16, 16)
    assert student.lm_head.weight.shape == (teacher.config.vocab_size, 16)
    assert len(student.model.layers) == 1
    assert count_parameters(student) < count_parameters(teacher)
    assert teacher.config.hidden_size == 32  # the teacher's config is not touched
    input_ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        logits = student(input_ids=input_ids).logits
    assert logits.shape == (1, 5, teacher.config.vocab_size) and torch.isfinite(logits).all()


def test_build_student_with_no_overrides_copies_the_shape(teacher):
    student = build_student(teacher, {}, None, seed=0)
    assert student.config.to_dict() == teacher.config.to_dict()
    assert count_parameters(student) == count_parameters(teacher)


def test_build_student_unknown_override_names_the_key(teacher):
    with pytest.raises(DistillError) as raised:
        build_student(teacher, {"hiden_size": 16}, None, seed=0)
    assert raised.value.field == "student.config.hiden_size"


@pytest.mark.parametrize("overrides", [{"hidden_size": 30}, {"num_key_value_heads": 3}],
                         ids=["odd-head-dim", "kv-heads-not-dividing"])
def test_build_student_inconsistent_sizes_is_a_distill_error(teacher, overrides):
    """These build without complaint but would fail in the first training step."""
    with pytest.raises(DistillError, match="does not run") as raised:
        build_student(teacher, overrides, None, seed=0)
    assert raised.value.field == "student.config"


def test_build_student_same_seed_same_init(teacher):
    first, again = build_student(teacher, SMALL, None, seed=3), build_student(teacher, SMALL, None, seed=3)
    other = build_student(teacher, SMALL, None, seed=4)
    assert _same_weights(first, again)
    assert not _same_weights(first, other)


# ---- copying teacher layers ---------------------------------------------------------------------

def test_init_from_teacher_layers_copies_layer_embeddings_and_head(teacher):
    student = build_student(teacher, {"num_hidden_layers": 1}, [1], seed=0)
    teacher_layer = teacher.model.layers[1].state_dict()
    student_layer = student.model.layers[0].state_dict()
    assert teacher_layer.keys() == student_layer.keys()
    assert all(torch.equal(teacher_layer[k], student_layer[k]) for k in teacher_layer)
    assert not torch.equal(student.model.layers[0].self_attn.q_proj.weight,
                           teacher.model.layers[0].self_attn.q_proj.weight)
    assert torch.equal(student.model.embed_tokens.weight, teacher.model.embed_tokens.weight)
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight)
    assert torch.equal(student.model.norm.weight, teacher.model.norm.weight)
    assert student.model.embed_tokens.weight.data_ptr() != teacher.model.embed_tokens.weight.data_ptr()


def test_copied_student_matches_a_truncated_teacher(teacher):
    """Two copied layers [0, 1] reproduce the teacher exactly (same logits)."""
    student = build_student(teacher, {}, [0, 1], seed=5)
    input_ids = torch.tensor([[1, 9, 10, 11]])
    with torch.no_grad():
        assert torch.allclose(student(input_ids=input_ids).logits, teacher(input_ids=input_ids).logits)


def test_copy_layers_needs_the_same_hidden_size(teacher):
    with pytest.raises(DistillError, match="same hidden_size") as raised:
        build_student(teacher, SMALL, [1], seed=0)
    assert raised.value.field == "student.init_from_teacher_layers"


def test_copy_layers_out_of_range(teacher):
    with pytest.raises(DistillError, match=r"not \[2\]") as raised:
        build_student(teacher, {"num_hidden_layers": 1}, [2], seed=0)
    assert raised.value.field == "student.init_from_teacher_layers"


def test_copy_layers_count_must_match_the_student(teacher):
    with pytest.raises(DistillError, match="2 layers given for a student of 1"):
        build_student(teacher, {"num_hidden_layers": 1}, [0, 1], seed=0)


def test_copy_layers_with_other_layer_sizes_is_a_distill_error(teacher):
    student = build_student(teacher, {"num_hidden_layers": 1, "intermediate_size": 48}, None, seed=0)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(DistillError, match="mlp") as raised:
        copy_teacher_layers(teacher, student, [0])
    assert raised.value.field == "student.init_from_teacher_layers"
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())  # nothing half-copied


# ---- vocabularies -------------------------------------------------------------------------------

def test_padded_output_embedding_passes(teacher, tokenizer):
    """Same tokenizer, teacher head padded with extra rows (like 152064 vs 151936)."""
    padded = build_student(teacher, {}, None, seed=0)
    padded.resize_token_embeddings(len(tokenizer) + 5)
    assert padded.get_output_embeddings().weight.shape[0] == len(tokenizer) + 5
    student = build_student(teacher, SMALL, None, seed=0)
    assert check_same_vocabulary(tokenizer, tokenizer, padded, student) == len(tokenizer)
    assert check_same_vocabulary(tokenizer, tokenizer, student, padded) == len(tokenizer)


def test_different_tokenizers_are_refused(teacher, tokenizer):
    other = ArithmeticTask().tokenizer()
    with pytest.raises(DistillError, match="different tokenizers") as raised:
        check_same_vocabulary(tokenizer, other, teacher, teacher)
    assert "cross-tokenizer" in raised.value.fix
    assert raised.value.field == "student.path"


def test_model_with_fewer_rows_than_the_tokenizer_is_refused(teacher, tokenizer):
    short = AutoModelForCausalLM.from_config(tiny_llama_config(len(tokenizer) - 3, hidden_size=16,
                                                               num_hidden_layers=1, num_attention_heads=2))
    with pytest.raises(DistillError, match=f"{len(tokenizer) - 3} output rows") as raised:
        check_same_vocabulary(tokenizer, tokenizer, teacher, short)
    assert raised.value.field == "student.path"
    with pytest.raises(DistillError) as raised:
        check_same_vocabulary(tokenizer, tokenizer, short, teacher)
    assert raised.value.field == "teacher.path"


# ---- loading ------------------------------------------------------------------------------------

def test_load_from_a_saved_directory(tiny_lm_dir, teacher, tokenizer):
    assert resolve_model_path(str(tiny_lm_dir), "teacher.path") == str(tiny_lm_dir)
    assert tokenizer.get_vocab() == OracleTask().tokenizer().get_vocab()
    assert tokenizer("w0 w1").input_ids == [tokenizer.bos_token_id, 4, 5]
    assert teacher.config.hidden_size == 32 and teacher.dtype == torch.float32
    torch.manual_seed(0)
    fresh = AutoModelForCausalLM.from_config(teacher.config)  # the fixture's seed and config
    assert _same_weights(fresh, teacher)


def test_load_in_bfloat16(tiny_lm_dir):
    model = load_causal_lm(str(tiny_lm_dir), "teacher.path", torch.bfloat16)
    assert model.dtype == torch.bfloat16


@pytest.mark.parametrize("path", ["./nope", "/nonexistent/teacher", "a/b/c"])
def test_missing_local_path_names_the_field(path, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    for load in (load_causal_lm, load_tokenizer):
        with pytest.raises(DistillError, match="no model directory") as raised:
            load(path, "student.path")
        assert raised.value.field == "student.path"


def test_directory_without_config_is_refused(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    for load in (load_causal_lm, load_tokenizer):
        with pytest.raises(DistillError, match="no config.json") as raised:
            load(str(tmp_path), "teacher.path")
        assert raised.value.field == "teacher.path"


def test_directory_without_tokenizer_files_is_a_distill_error(tmp_path, teacher):
    teacher.config.save_pretrained(tmp_path)
    with pytest.raises(DistillError, match="could not load a tokenizer") as raised:
        load_tokenizer(str(tmp_path), "teacher.path")
    assert raised.value.field == "teacher.path"


def test_missing_builtin_teacher_says_how_to_build_it():
    with pytest.raises(DistillError) as raised:
        load_causal_lm("builtin:nonexistent-teacher", "teacher.path")
    assert raised.value.field == "teacher.path"
    assert "distill train-teacher builtin:nonexistent" in raised.value.fix
    assert str(ASSETS / "nonexistent-teacher") in raised.value.fix
