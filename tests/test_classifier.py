"""task: classifier end to end: recipes through the CLI on the built-in digits teacher, every regime,
hooked features with projectors, the Python API on any nn.Module and on a transformers encoder pair,
and the bad inputs that must be refused (or warned about) before training."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import distill
from distill.classifier.models import build_classifier

torch.set_num_threads(1)


def _recipe(tmp_path, **sections) -> dict:
    recipe = {"name": "digits-test", "task": "classifier", "teacher": {"path": "builtin:digits-teacher"},
              "student": {"arch": "mlp", "options": {"hidden": [16]}},
              "data": {"builtin": "digits", "eval_size": 200, "train_size": 400},
              "objective": {"terms": [{"loss": "kd", "temperature": 4}]},
              "train": {"epochs": 2, "batch_size": 64, "lr": 0.003, "log_every": 2},
              "eval": {"every_epochs": 1}, "output": str(tmp_path / "run")}
    recipe.update(sections)
    return recipe


def _rows(run_dir):
    return json.loads((run_dir / "results.json").read_text())["rows"]


def test_recipe_with_logit_and_feature_terms_runs_through_the_cli(tmp_path, write_recipe, run_cli):
    recipe = _recipe(tmp_path, objective={"terms": [
        {"loss": "kd", "temperature": 4, "alpha": 0.9},
        {"loss": "fitnets", "weight": 0.5, "student_layer": "fc1", "teacher_layer": "fc"},  # 16 -> 128: projector
        {"loss": "rkd_distance", "weight": 0.1, "student_layer": "act1", "teacher_layer": "fc_act"},
        {"loss": "nd", "weight": 0.1, "student_layer": "act1", "teacher_layer": "fc_act"}]})
    done = run_cli("run", write_recipe(recipe))
    assert done.returncode == 0, done.stderr[-3000:]
    run_dir = tmp_path / "run"
    rows = _rows(run_dir)
    assert set(rows) == {"teacher", "alone", "distilled"}
    for row in rows.values():
        assert 0 <= row["accuracy"] <= 1 and 0 <= row["ece"] <= 1 and row["examples_per_second"] > 0
    assert rows["teacher"]["accuracy"] > 0.9 and rows["distilled"]["parameters"] < rows["teacher"]["parameters"]
    # The saved student is the bare MLP: the projector trained with it is not part of it.
    saved = load_file(str(run_dir / "student" / "model.safetensors"))
    assert set(saved) == set(build_classifier("mlp", (1, 8, 8), 10, {"hidden": [16]}).state_dict())
    losses = [json.loads(line) for line in (run_dir / "losses.jsonl").read_text().splitlines()]
    distilled = [r for r in losses if r["phase"] == "distilled"]
    assert {"kd", "fitnets.1", "rkd_distance.2", "nd.3"} <= set(distilled[-1])
    assert distilled[-1]["fitnets.1"] < distilled[0]["fitnets.1"]  # the projected features moved towards the teacher
    assert (run_dir / "report.html").is_file() and (run_dir / "alone" / "classifier.json").is_file()


@pytest.mark.parametrize("regime, objective", [
    ({"kind": "multi_teacher", "combine": "entropy_balanced"}, [{"loss": "kd"}, {"loss": "dkd", "weight": 0.1}]),
    ({"kind": "self", "self_teacher": "ema", "ema_decay": 0.9}, [{"loss": "ce"}, {"loss": "kd", "alpha": 1.0}]),
    ({"kind": "self", "self_teacher": "checkpoint"}, [{"loss": "ce"}, {"loss": "nkd"}]),
    ({"kind": "online"}, [{"loss": "ce"}, {"loss": "bdkd"}]),
])
def test_every_regime_runs_from_a_recipe(tmp_path, regime, objective):
    sections = {"regime": regime, "objective": {"terms": objective}}
    if regime["kind"] == "multi_teacher":
        distill.distill_classifier(None, build_classifier("mlp", (1, 8, 8), 10, {"hidden": [32]}, seed=3),
                                   train=_digits_split()[0], eval=_digits_split()[1], objective=[{"loss": "ce"}],
                                   train_options={"epochs": 6, "lr": 0.01, "baseline": False},
                                   output=tmp_path / "b-run")
        sections.update(teacher=None, teachers=[{"path": "builtin:digits-teacher"}, {"path": str(tmp_path / "b-run" / "student")}])
    if regime["kind"] in ("self", "online"):
        sections["teacher"] = None
    sections["train"] = {"epochs": 12, "batch_size": 64, "lr": 0.01, "baseline": False}
    result = distill.run({k: v for k, v in _recipe(tmp_path, **sections).items() if v is not None})
    rows = result.rows
    assert rows["distilled"]["accuracy"] > 0.5  # 12 epochs of 400 digits: well above chance (0.1)
    assert ("teacher" in rows) == (regime["kind"] != "self")


def _digits_split():
    from distill.classifier.data import load_image_task

    data = load_image_task("digits", eval_size=200, seed=0, train_size=400)
    return (data.train_x, data.train_y), (data.eval_x, data.eval_y)


def test_omitted_class_is_left_out_of_the_transfer_set_and_scored(tmp_path):
    recipe = _recipe(tmp_path, data={"builtin": "digits", "eval_size": 200, "train_size": 400,
                                     "exclude_classes": [3]})
    result = distill.run(recipe)
    assert result.meta["train_examples"] < 400 * 0.95  # ~10% of the examples were 3s
    assert "accuracy_class_3" in result.rows["distilled"] and "accuracy_class_3" in result.rows["alone"]
    # The student alone never saw a 3 and never predicts one.
    assert result.rows["alone"]["accuracy_class_3"] == 0.0


def test_bad_input_is_refused_before_training(tmp_path, write_recipe, run_cli):
    wrong_hook = _recipe(tmp_path, objective={"terms": [{"loss": "fitnets", "student_layer": "fc_1",
                                                         "teacher_layer": "fc"}]})
    done = run_cli("run", write_recipe(wrong_hook))
    assert done.returncode == 2 and "objective.terms.0.student_layer" in done.stderr
    assert "no module `fc_1`" in done.stderr and "fc1" in done.stderr  # the closest valid names
    assert not (tmp_path / "run" / "results.json").exists()
    no_projector = _recipe(tmp_path, objective={"terms": [{"loss": "fitnets", "student_layer": "fc1",
                                                           "teacher_layer": "fc", "projector": "none"}]})
    with pytest.raises(distill.DistillError, match=r"shape \(16,\) and teacher feature `fc` \(128,\)") as refused:
        distill.run(no_projector, overwrite=True)
    assert "objective.terms.0.projector" in str(refused.value)
    unknown = _recipe(tmp_path, objective={"terms": [{"loss": "kd", "temprature": 4}]})
    with pytest.raises(distill.DistillError, match="objective.terms.0.temprature") as refused:
        distill.run(unknown, overwrite=True)
    assert "temperature" in str(refused.value)


def test_python_api_refuses_class_mismatch_and_puts_a_training_teacher_in_eval(tmp_path):
    train, evaluation = _digits_split()
    teacher = build_classifier("mlp", (1, 8, 8), 10, {"hidden": [32]}, seed=0)
    with pytest.raises(distill.DistillError, match="10 classes and the student 5"):
        distill.distill_classifier(teacher.eval(), build_classifier("mlp", (1, 8, 8), 5), train=train, eval=evaluation,
                                   output=tmp_path / "a")
    teacher.train()
    with pytest.warns(UserWarning, match="training mode"):
        result = distill.distill_classifier(teacher, build_classifier("mlp", (1, 8, 8), 10, {"hidden": [8]}),
                                            train=train, eval=evaluation, output=tmp_path / "b",
                                            train_options={"epochs": 1, "baseline": False})
    assert not teacher.training and set(result.rows) == {"teacher", "distilled"}


class TinyConvNet(nn.Module):
    """Any nn.Module works: a student the project does not know."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(4 * 8 * 8, 10)

    def forward(self, x):
        return self.head(self.body(x).flatten(1))


def test_any_module_distils_with_attention_transfer_between_conv_maps(tmp_path):
    train, evaluation = _digits_split()
    from distill.classifier.models import load_classifier

    teacher, _ = load_classifier("builtin:digits-teacher", "teacher")
    result = distill.distill_classifier(
        teacher, TinyConvNet(), train=train, eval=evaluation, output=tmp_path / "run",
        objective=[{"loss": "kd"}, {"loss": "attention", "student_layer": "body.1", "teacher_layer": "act1"},
                   {"loss": "fitnets", "student_layer": "body.1", "teacher_layer": "act1"}],  # 4 -> 32 channels: conv projector
        train_options={"epochs": 12, "lr": 0.01, "baseline": False})
    assert result.rows["distilled"]["accuracy"] > 0.5
    config = json.loads((tmp_path / "run" / "student" / "classifier.json").read_text())
    assert config["class"] == "TinyConvNet"


def test_transformers_encoder_pair_distils_with_hidden_states_and_attentions(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    def encoder(hidden, layers, heads, seed):
        torch.manual_seed(seed)
        config = BertConfig(vocab_size=40, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                            intermediate_size=2 * hidden, max_position_embeddings=16, num_labels=3,
                            attn_implementation="eager")
        return BertForSequenceClassification(config)

    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1, 40, (96, 12), generator=generator)
    labels = (input_ids[:, 0] % 3).long()  # the class is in the first token: learnable
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
    split = lambda part: {k: v[part] for k, v in inputs.items()}  # noqa: E731
    teacher, student = encoder(32, 2, 4, 0).eval(), encoder(16, 1, 2, 1)
    result = distill.distill_classifier(
        teacher, student, train=(split(slice(0, 64)), labels[:64]), eval=(split(slice(64, None)), labels[64:]),
        objective=[{"loss": "kd"},
                   {"loss": "fitnets", "student_layer": "hidden_states.-1", "teacher_layer": "hidden_states.-1"},
                   {"loss": "attention", "student_layer": "attentions.0", "teacher_layer": "attentions.1"}],
        train_options={"epochs": 2, "batch_size": 16}, output=tmp_path / "run")
    losses = [json.loads(line) for line in (tmp_path / "run" / "losses.jsonl").read_text().splitlines()]
    distilled = [r for r in losses if r["phase"] == "distilled"]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in distilled) and "attention.2" in distilled[-1]
    assert (tmp_path / "run" / "student" / "config.json").is_file()  # save_pretrained
    assert result.rows["distilled"]["parameters"] < result.rows["teacher"]["parameters"]


def test_layers_command_lists_hookable_modules(run_cli):
    done = run_cli("layers", "builtin:digits-teacher")
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("conv1", "conv2", "fc_act", "head"):
        assert name in done.stdout
    missing = run_cli("layers", "/nonexistent/model")
    assert missing.returncode == 2 and "MODEL" in missing.stderr


@pytest.mark.parametrize("regime, objective, teacher", [
    ({"kind": "frozen"}, [{"loss": "kd", "temperature": 4},
                          {"loss": "fitnets", "weight": 0.1, "student_layer": "fc1", "teacher_layer": "fc"}], True),
    ({"kind": "multi_teacher"}, [{"loss": "kd"}], True),
    ({"kind": "self", "self_teacher": "ema", "ema_decay": 0.9}, [{"loss": "ce"}, {"loss": "kd"}], False),
    ({"kind": "online"}, [{"loss": "ce"}, {"loss": "bdkd"}], False),
])
def test_killed_and_resumed_run_ends_bit_identical(tmp_path, monkeypatch, regime, objective, teacher):
    # 400 examples / 64 = 7 steps per epoch; the crash after step 10 falls inside the second epoch (a
    # data order drawn before the crash must be drawn again), the projector and EMA teacher are restored.
    from conftest import assert_same_student, run_interrupted_and_resumed

    sections = {"regime": regime, "objective": {"terms": objective},
                "train": {"epochs": 3, "batch_size": 64, "lr": 0.003, "log_every": 2, "checkpoint_every": 5}}
    if regime["kind"] == "multi_teacher":
        sections.update(teacher=None, teachers=[{"path": "builtin:digits-teacher"}] * 2)
    if not teacher:
        sections["teacher"] = None
    recipe = {k: v for k, v in _recipe(tmp_path, **sections).items() if v is not None}
    straight, resumed = run_interrupted_and_resumed(recipe, tmp_path, monkeypatch, crash_after=10)
    assert_same_student(straight.run_dir, resumed.run_dir)
    timing = {"examples_per_second"}
    assert {r: {k: v for k, v in m.items() if k not in timing} for r, m in straight.rows.items()} == \
        {r: {k: v for k, v in m.items() if k not in timing} for r, m in resumed.rows.items()}
    for log in ("metrics.jsonl", "losses.jsonl"):  # appended, never deleted: the same lines, none twice
        lines = [{k: v for k, v in json.loads(line).items() if "seconds" not in k and k not in timing}
                 for line in (resumed.run_dir / log).read_text().splitlines()]
        straight_lines = [{k: v for k, v in json.loads(line).items() if "seconds" not in k and k not in timing}
                          for line in (straight.run_dir / log).read_text().splitlines()]
        assert lines == straight_lines, log


def test_python_api_writes_the_resolved_call_as_yaml_and_resumes(tmp_path, monkeypatch):
    import yaml

    train, evaluation = _digits_split()

    def call(output, **options):
        torch.manual_seed(0)
        teacher = build_classifier("mlp", (1, 8, 8), 10, {"hidden": [32]}, seed=1)
        student = build_classifier("mlp", (1, 8, 8), 10, {"hidden": [8]}, seed=2)
        return distill.distill_classifier(teacher.eval(), student, train=train, eval=evaluation,
                                          train_options={"epochs": 2, "checkpoint_every": 4}, output=output, **options)
    straight = call(tmp_path / "a")
    saved = yaml.safe_load((tmp_path / "a" / "recipe.yaml").read_text())
    assert saved["api"] == "distill_classifier" and saved["objective"]["terms"][0]["loss"] == "kd"
    assert saved["train"]["epochs"] == 2 and saved["train"]["batch_size"] == 64  # defaults resolved
    monkeypatch.setenv("DISTILL_CRASH_AFTER_STEP", "4")
    with pytest.raises(SystemExit):
        call(tmp_path / "b")
    monkeypatch.delenv("DISTILL_CRASH_AFTER_STEP")
    resumed = call(tmp_path / "b", resume=True)
    for key, value in load_file(str(straight.run_dir / "student" / "model.safetensors")).items():
        assert torch.equal(value, load_file(str(resumed.run_dir / "student" / "model.safetensors"))[key]), key


def test_eval_and_compare_through_the_cli(tmp_path, run_cli):
    first = distill.run(_recipe(tmp_path, output=str(tmp_path / "kd")))
    second = distill.run(_recipe(tmp_path, output=str(tmp_path / "dkd"),
                                 objective={"terms": [{"loss": "dkd", "warmup_epochs": 1}]}))
    # A finished run re-evaluated: the same rows (throughput aside), teacher first.
    done = run_cli("eval", first.run_dir, "--output", tmp_path / "eval.json")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "eval.json").read_text())["rows"]
    assert list(rows) == ["teacher", "alone", "distilled"]
    for row, metrics in first.rows.items():
        assert rows[row]["accuracy"] == metrics["accuracy"] and rows[row]["nll"] == pytest.approx(metrics["nll"])
    # A lone saved student on a task: its own row, no teacher.
    lone = run_cli("eval", first.run_dir / "student", "--data", "builtin:digits", "--set", "data.eval_size=200",
                   "--set", "data.train_size=400", "--output", tmp_path / "lone.json")
    assert lone.returncode == 0, lone.stderr[-3000:]
    lone_rows = json.loads((tmp_path / "lone.json").read_text())["rows"]
    assert list(lone_rows) == ["model"] and lone_rows["model"]["accuracy"] == first.rows["distilled"]["accuracy"]
    compared = run_cli("compare", first.run_dir, second.run_dir, "--output", tmp_path / "cmp")
    assert compared.returncode == 0, compared.stderr[-3000:]
    markdown = (tmp_path / "cmp" / "compare.md").read_text()
    assert "kd / distilled" in markdown and "dkd / distilled" in markdown and " *" in markdown
    best = max(r["accuracy"] for run in (first, second) for r in run.rows.values())
    assert f"{best:.4f} *" in markdown
    assert (tmp_path / "cmp" / "compare.html").is_file() and (tmp_path / "cmp" / "plots" / "eval_curves.png").is_file()
    bad = run_cli("eval", tmp_path / "nowhere")
    assert bad.returncode == 2 and "TARGET" in bad.stderr
