"""Memory and seconds per optimizer step at the shape of a real 135M model: precision, gradient
checkpointing, LoRA, DDP vs FSDP over 2 processes, and TRL's stable DistillationTrainer.

    python benchmarks/scale.py [--steps 6 --threads 2] [--rows fp32,bf16,...] [--json FILE] [--docs FILE]
    OMP_NUM_THREADS=1 python benchmarks/scale.py --tiny --steps 2 --threads 1   # miniature, smoke test

Teacher: Llama, hidden 576, 30 layers, 9 heads / 3 KV heads, intermediate 1536, vocab 49152, tied
embeddings (SmolLM-135M's shape), random weights from the config; student: the same width, 6 layers;
the LoRA row's student is full-depth (30 layers) with its own random weights. Data: ChatML rows of
English from the Python standard library's docstrings, each exactly 512 tokens (64 prompt + 448
completion, so no row is padded), tokenized by a byte-level BPE trained here on that text (the text
runs out of merges at ~23k tokens; reserved tokens fill the vocabulary to 49152). Batch 4 x 512; the
two-process rows take 2 per process (the same global batch, so the same step-1 loss). Tokenizer,
models and data are built once into one directory that every row reads. --tiny: hidden 64, 2+1
layers, vocab 512, batch 2 x 64.

Settings everywhere: JSD(beta=0.5) (distill's `jsd` and TRL's generalized JSD are the same formula,
M = beta p_T + (1-beta) p_S), temperature 1, off-policy (the data's completions), loss on completion
tokens only, mean over the batch's completion tokens; AdamW lr 1e-4 constant, no weight decay,
max_grad_norm 1, grad-accum 1, no evaluation during training.

distill runs `distill run RECIPE` (two-process rows under `accelerate launch`) inside a wrapper that
reads the process's memory: the peak while loading ("loading peak"), the RSS once the trainer is built
and every weight has been read so that it is resident ("after load"), then the peak RSS over the
training steps, with the high-water mark reset at that point (/proc/self/clear_refs) so loading
transients do not count; evaluation and saving after the last step do not count either.
Seconds per step: the run's losses.jsonl (`step_seconds`), median over steps 2..N.

TRL's DistillationTrainer is on-policy only (it samples completions from the student); here its
`_generate` returns the same tokenized completions instead, everything else (padding, masks, chunked
generalized JSD, its normalisation, optimizer, checkpointing) is TRL's own. It reads distill's batch
order, so step 1 sees the same batch. Its bf16=True does not autocast on CPU (the worker records the
dtype its first linear layers compute in): its forward redirection calls the backbone past
accelerate's autocast wrapper, so "TRL bf16" computes in fp32. The opt-in row trl-bf16-ckpt-autocast
wraps its loss in that autocast.

Each row runs in its own process; a row whose feature is missing or broken is reported as failed
(with the error's line) and the others continue. TRL is the `bench` extra.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import resource
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FULL = dict(vocab=49152, hidden=576, teacher_layers=30, student_layers=6, heads=9, kv_heads=3, intermediate=1536,
            batch=4, tokens=512, prompt_tokens=64, system=True, corpus_chars=None,
            ask="Explain these notes from the Python standard library: ")
TINY = dict(vocab=512, hidden=64, teacher_layers=2, student_layers=1, heads=4, kv_heads=2, intermediate=128,
            batch=2, tokens=64, prompt_tokens=24, system=False, corpus_chars=200_000, ask="")
LR, MAX_GRAD_NORM, BETA, TEMPERATURE, SEED = 1e-4, 1.0, 0.5, 1.0, 0
LORA = {"r": 16, "alpha": 32, "dropout": 0.0,
        "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # ids 0, 1, 2 (pad, bos, eos), as SmolLM2
CHAT_TEMPLATE = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
                 "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
                 "{% endif %}")
SYSTEM = "You are a helpful assistant who explains the Python standard library."

# name -> what runs. `match`: the distill row a TRL row has the same settings as.
ROWS = {
    "fp32": dict(kind="distill", label="distill fp32", train={"precision": "fp32"}),
    "bf16": dict(kind="distill", label="distill bf16 autocast", train={"precision": "bf16"}),
    "bf16-ckpt": dict(kind="distill", label="distill bf16 + checkpointing",
                      train={"precision": "bf16", "gradient_checkpointing": True}),
    "lora": dict(kind="distill", label="distill LoRA r=16, full-depth student, fp32", lora=True,
                 train={"precision": "fp32"}),
    "ddp": dict(kind="distill", label="distill DDP, 2 processes, fp32", processes=2, train={"precision": "fp32"}),
    "fsdp": dict(kind="distill", label="distill FSDP, 2 processes, fp32", processes=2,
                 train={"precision": "fp32", "sharding": "fsdp"}),
    "ddp-bf16-ckpt": dict(kind="distill", label="distill DDP, 2 processes, bf16 + checkpointing", processes=2,
                          train={"precision": "bf16", "gradient_checkpointing": True}),
    "fsdp-bf16-ckpt": dict(kind="distill", label="distill FSDP, 2 processes, bf16 + checkpointing", processes=2,
                           train={"precision": "bf16", "gradient_checkpointing": True, "sharding": "fsdp"}),
    "trl-fp32": dict(kind="trl", label="TRL DistillationTrainer fp32", bf16=False, checkpointing=False, match="fp32"),
    "trl-bf16-ckpt": dict(kind="trl", label="TRL DistillationTrainer bf16 + checkpointing (its defaults)",
                          bf16=True, checkpointing=True, match="bf16-ckpt"),
    # Not run unless asked (--rows): TRL's bf16=True does not autocast its forward passes on CPU (its forward
    # redirection calls the backbone past accelerate's autocast wrapper; the worker records this). This row
    # wraps its loss in the bf16 autocast that bf16=True means to apply (student and teacher backbones).
    "trl-bf16-ckpt-autocast": dict(kind="trl", label="TRL DistillationTrainer bf16 (autocast forced) + checkpointing",
                                   bf16=True, checkpointing=True, autocast=True, match="bf16-ckpt", default=False),
}


# ---- memory of this process ------------------------------------------------------------------------

def rss_now() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> int:
    """The process's peak RSS in bytes (ru_maxrss; since the last reset_peak)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def touch_weights() -> None:
    """Read every parameter and buffer of every module alive, so that weights loaded lazily (memory-mapped
    pages) are resident before 'after load' is read: the peak above it is then what training adds."""
    import gc

    import torch

    seen = set()
    for obj in gc.get_objects():
        if isinstance(obj, torch.nn.Module):
            for tensor in (*obj.parameters(recurse=False), *obj.buffers(recurse=False)):
                local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
                if id(local) not in seen and local.device.type != "meta":
                    seen.add(id(local))
                    float(local.detach().float().sum())


def reset_peak() -> bool:
    """Reset the peak-RSS high-water mark to the current RSS (Linux clear_refs 5); False if not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
        return True
    except OSError:
        return False


# ---- the shared directory: tokenizer, models, data ------------------------------------------------------

def docstrings(limit: int | None) -> list[str]:
    """English from the standard library's docstrings, in a fixed order."""
    import ast
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    texts, size = [], 0
    for file in sorted(root.rglob("*.py")):
        if {"test", "tests", "idlelib", "site-packages"} & set(file.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(file.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                text = ast.get_docstring(node)
                if text:
                    texts.append(text)
                    size += len(text)
        if limit is not None and size >= limit:
            break
    return texts


def train_tokenizer(texts: list[str], vocab: int):
    """Byte-level BPE trained on `texts` to `vocab` tokens (reserved tokens fill what the text cannot),
    with SmolLM2's specials and ChatML template. Digits are single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    trained = bpe.get_vocab_size()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>", unk_token=None)
    tokenizer.add_tokens([f"<|reserved_{i}|>" for i in range(vocab - trained)])
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer, trained


def chat_rows(tokenizer, words: list[str], count: int, shape: dict) -> list[dict]:
    """`count` chat rows of exactly shape['tokens'] tokens, shape['prompt_tokens'] of them the prompt, as
    distill tokenizes them (the same tokens TRL gets)."""
    from distill.lm.data import IGNORE_INDEX, tokenize

    def split(messages):
        example = tokenize([{"messages": messages}], tokenizer, max_length=10**9, too_long="refuse",
                           completion_only=True, append_eos=True, field="data.train")[0]
        prompt = sum(label == IGNORE_INDEX for label in example.labels)
        return prompt, len(example.input_ids) - prompt

    def fit(measure, stream, target):
        """The longest prefix of `stream` whose text measures <= target tokens, topped up with digits
        (one token each) to exactly target."""
        low, high = 0, len(stream)
        while low < high:
            middle = (low + high + 1) // 2
            if measure(" ".join(stream[:middle])) <= target:
                low = middle
            else:
                high = middle - 1
        text = " ".join(stream[:low])
        if measure(text) < target:
            text += " "
        while measure(text) < target:
            text += "7"
        if measure(text) != target:
            raise RuntimeError(f"could not fit a text to {target} tokens")
        return text

    prompt_tokens, completion_tokens = shape["prompt_tokens"], shape["tokens"] - shape["prompt_tokens"]
    head = [{"role": "system", "content": SYSTEM}] if shape["system"] else []
    rows, position = [], 0
    for index in range(count):
        stream = [words[(position + i) % len(words)] for i in range(2 * shape["tokens"])]
        position += 2 * shape["tokens"]
        ask = shape["ask"]
        user = fit(lambda text: split(head + [{"role": "user", "content": ask + text},
                                              {"role": "assistant", "content": "x"}])[0],
                   stream[:shape["tokens"]], prompt_tokens)
        messages = head + [{"role": "user", "content": ask + user}]
        answer = fit(lambda text: split(messages + [{"role": "assistant", "content": text}])[1],
                     stream[shape["tokens"]:], completion_tokens)
        messages = messages + [{"role": "assistant", "content": answer}]
        assert split(messages) == (prompt_tokens, completion_tokens), split(messages)
        rows.append({"id": f"row{index}", "messages": messages})
    return rows


def prepare(directory: Path, shape: dict, rows: int) -> dict:
    """Tokenizer, teacher, 6-layer student, full-depth student (LoRA row) and train/eval jsonl."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    started = time.perf_counter()
    texts = docstrings(shape["corpus_chars"])
    tokenizer, trained = train_tokenizer(texts, shape["vocab"])
    tokenizer.save_pretrained(directory / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(directory / "tokenizer")  # what every row loads
    assert len(tokenizer) == shape["vocab"], (len(tokenizer), shape["vocab"])
    for name, layers, seed in (("teacher", shape["teacher_layers"], 0), ("student", shape["student_layers"], 1),
                               ("student-full", shape["teacher_layers"], 2)):
        config = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["hidden"], num_hidden_layers=layers,
                             num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                             intermediate_size=shape["intermediate"], max_position_embeddings=2048,
                             tie_word_embeddings=True, rms_norm_eps=1e-5, rope_theta=10000.0,
                             bos_token_id=1, eos_token_id=2, pad_token_id=0)
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        model.save_pretrained(directory / name)
        tokenizer.save_pretrained(directory / name)
        del model
    words = " ".join(texts).split()
    data = chat_rows(tokenizer, words, rows + 1, shape)
    (directory / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data[:rows]))
    (directory / "eval.jsonl").write_text(json.dumps(data[rows]) + "\n")  # one row: the run's own eval, kept small
    return {"bpe_trained_tokens": trained, "corpus_docstrings": len(texts), "train_rows": rows,
            "prepare_seconds": round(time.perf_counter() - started, 1)}


# ---- a distill row: `distill run RECIPE` in this process, with memory read around training ------------

def recipe(directory: Path, row: dict, shape: dict, steps: int, threads: int) -> dict:
    processes = row.get("processes", 1)
    student = {"path": str(directory / ("student-full" if row.get("lora") else "student"))}
    if row.get("lora"):
        student["lora"] = LORA
    return {
        "name": f"scale-{row['name']}",
        "teacher": {"path": str(directory / "teacher")},
        "student": student,
        "data": {"train": str(directory / "train.jsonl"), "eval": str(directory / "eval.jsonl"),
                 "max_length": shape["tokens"], "too_long": "refuse", "completion_only": True},
        "objective": {"loss": "jsd", "beta": BETA, "temperature": TEMPERATURE},
        "regime": {"kind": "off_policy"},
        "train": {"steps": steps, "batch_size": shape["batch"] // processes, "grad_accum": 1, "lr": LR,
                  "weight_decay": 0.0, "warmup_steps": 0, "schedule": "constant", "max_grad_norm": MAX_GRAD_NORM,
                  "seed": SEED, "baseline": False, "threads": threads, "log_every": 1, "checkpoint_every": 10**6,
                  **row.get("train", {})},
        "eval": {"every": 10**6, "batch_size": 1, "generate_size": 0, "throughput_tokens": 1},
        "output": str(directory / "runs" / row["name"]),
    }


def distill_worker(recipe_path: str, figures_prefix: str) -> None:
    """Run `distill run RECIPE --overwrite` through the CLI's main; write this rank's memory figures."""
    rank = int(os.environ.get("RANK", "0"))
    figures: dict = {"rank": rank, "steps": []}
    try:  # hooks on the trainer: where the models are loaded, and each logged step (before eval/checkpoint)
        from distill.core.rundir import RunDirectory
        from distill.lm.trainer import LMTrainer

        build, log = LMTrainer.__init__, RunDirectory.log_losses

        def built(self, *args, **kwargs):
            build(self, *args, **kwargs)  # after it: models loaded (and sharded), optimizer built (no state yet)
            if "rss_after_load_bytes" not in figures:
                touch_weights()
                figures["rss_after_load_bytes"] = rss_now()
                figures["peak_rss_loading_bytes"] = peak_rss()
                figures["peak_reset"] = reset_peak()

        def logged(self, record):
            figures["steps"].append({"step": record.get("step"), "loss": record.get("loss"),
                                     "step_seconds": record.get("step_seconds"), "peak_rss_bytes": peak_rss()})
            log(self, record)

        LMTrainer.__init__, RunDirectory.log_losses = built, logged
    except (ImportError, AttributeError) as error:
        figures["hooks"] = f"not attached: {error!r}"
    from distill.cli import main

    sys.argv = ["distill", "run", recipe_path, "--overwrite"]
    code = 0
    try:
        main()
    except SystemExit as stop:
        code = stop.code if isinstance(stop.code, int) else 1
    finally:
        figures["peak_rss_exit_bytes"] = peak_rss()
        figures["exit_code"] = code
        Path(f"{figures_prefix}.rank{rank}.json").write_text(json.dumps(figures))
    sys.exit(code)


# ---- a TRL row ----------------------------------------------------------------------------------------

def trl_worker(directory: Path, shape: dict, steps: int, threads: int, bf16: bool, checkpointing: bool,
               autocast: bool, figures_file: str) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.trainer import distillation_trainer
    from trl.trainer.distillation_config import DistillationConfig
    from trl.trainer.distillation_trainer import DistillationTrainer

    from distill.lm.data import IGNORE_INDEX, BatchOrder, read_records, tokenize

    torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(directory / "teacher")
    examples = tokenize(read_records(str(directory / "train.jsonl"), "data"), tokenizer, max_length=shape["tokens"],
                        too_long="refuse", completion_only=True, append_eos=True, field="data")
    # distill's batch order (seed 0), read sequentially by TRL: the same first batch.
    ordered = [examples[i] for i in BatchOrder(len(examples), SEED).take(0, len(examples))]
    split = [(e.input_ids[:sum(x == IGNORE_INDEX for x in e.labels)],
              e.input_ids[sum(x == IGNORE_INDEX for x in e.labels):]) for e in ordered]
    dataset = Dataset.from_list([{"prompt": str(i)} for i in range(len(split))])

    figures: dict = {"steps": [], "losses": [], "compute_dtypes": {}}
    chunked = distillation_trainer._chunked_divergence_loss

    def probe(*args, **kwargs):  # is autocast on where TRL runs both models and the loss?
        figures.setdefault("autocast_in_loss", torch.is_autocast_enabled("cpu"))
        return chunked(*args, **kwargs)

    distillation_trainer._chunked_divergence_loss = probe

    def record_dtype(role):  # the output dtype of the model's first linear layer: what its matmuls ran in
        def hook(module, inputs, output):
            figures["compute_dtypes"].setdefault(role, str(output.dtype))
        return hook

    class OffPolicy(DistillationTrainer):
        """The data's completions instead of the student's samples (GKD's lmbda=0); nothing else changed."""

        def _generate(self, prompts):
            rows = [split[int(p)] for p in prompts]
            return [r[0] for r in rows], [r[1] for r in rows], None, None, []

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            with torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext():
                loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            figures["losses"].append(float((loss[0] if return_outputs else loss).detach()))
            return loss

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *args, **kwargs):
            self.started = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            figures["steps"].append({"step_seconds": time.perf_counter() - self.started, "peak_rss_bytes": peak_rss()})

    student = AutoModelForCausalLM.from_pretrained(directory / "student", dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(directory / "teacher", dtype=torch.float32)
    for role, model in (("student", student), ("teacher", teacher)):
        next(m for m in model.modules() if isinstance(m, torch.nn.Linear)).register_forward_hook(record_dtype(role))
    touch_weights()
    figures["rss_after_load_bytes"] = rss_now()
    figures["peak_rss_loading_bytes"] = peak_rss()
    figures["peak_reset"] = reset_peak()
    args = DistillationConfig(
        output_dir=str(directory / "runs" / "trl"), per_device_train_batch_size=shape["batch"],
        gradient_accumulation_steps=1, max_steps=steps, beta=BETA, temperature=TEMPERATURE, learning_rate=LR,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=MAX_GRAD_NORM,
        optim="adamw_torch", bf16=bf16, gradient_checkpointing=checkpointing, shuffle_dataset=False,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[], use_cpu=True,
        dataloader_num_workers=0, seed=SEED, disable_tqdm=True)
    trainer = OffPolicy(model=student, teacher_model=teacher, args=args, train_dataset=dataset,
                        processing_class=tokenizer, callbacks=[StepTimer()])
    trainer.train()
    figures.update(bf16=trainer.args.bf16, gradient_checkpointing=trainer.args.gradient_checkpointing,
                   optim=str(trainer.args.optim), peak_rss_exit_bytes=peak_rss(),
                   accelerate_mixed_precision=str(trainer.accelerator.mixed_precision),
                   accelerate_native_amp=bool(getattr(trainer.accelerator, "native_amp", False)))
    Path(figures_file).write_text(json.dumps(figures))


# ---- the parent: one process per row, then the table -----------------------------------------------------

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def last_error(stderr: str, returncode: int) -> str:
    """The line that says what went wrong: distill's `error ...` (with its detail line), else the last Python
    exception that is not the launcher's own, else the last line."""
    lines = stderr.splitlines()
    for index in reversed(range(len(lines))):
        if lines[index].startswith("error "):
            detail = [line.strip() for line in lines[index + 1:index + 3]
                      if line.startswith("  ") and not line.strip().startswith("fix:")]
            return " ".join([lines[index].strip(), *detail])[:300]
    raised = [line.strip() for line in lines if re.match(r"^[\w.]*(Error|Exception)\b", line.strip())
              and "ChildFailedError" not in line]
    if raised:
        return raised[-1][:300]
    if returncode < 0:
        return f"killed by signal {-returncode}" + (" (out of memory?)" if returncode == -9 else "")
    return ([line.strip() for line in lines if line.strip()] or ["(no output)"])[-1][:300]


def run_row(name: str, row: dict, directory: Path, shape: dict, args) -> dict:
    row = {**row, "name": name}
    processes = row.get("processes", 1)
    threads = max(1, args.threads // processes)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
    logs = directory / "logs"
    logs.mkdir(exist_ok=True)
    prefix = str(logs / name)
    common = ["--dir", str(directory), "--steps", str(args.steps), "--threads", str(threads)] + (
        ["--tiny"] if args.tiny else [])
    if row["kind"] == "distill":
        recipe_file = directory / f"recipe-{name}.yaml"
        import yaml

        recipe_file.write_text(yaml.safe_dump(recipe(directory, row, shape, args.steps, threads), sort_keys=False))
        worker = [os.path.abspath(__file__), "--worker", "distill", "--recipe", str(recipe_file), "--figures", prefix]
        if processes == 1:
            command = [sys.executable, *worker]
        else:
            command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                       str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                       "--main_process_port", str(free_port()), *worker]
    else:
        command = [sys.executable, os.path.abspath(__file__), "--worker", "trl", "--figures", prefix + ".rank0.json",
                   *(["--bf16"] if row["bf16"] else []), *(["--checkpointing"] if row["checkpointing"] else []),
                   *(["--autocast"] if row.get("autocast") else []),
                   *common]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    Path(prefix + ".stdout").write_text(done.stdout)
    Path(prefix + ".stderr").write_text(done.stderr)
    result = {"label": row["label"], "kind": row["kind"], "processes": processes, "threads_per_process": threads,
              "wall_seconds": round(time.perf_counter() - started, 1), "settings": {
                  k: row[k] for k in ("train", "lora", "bf16", "checkpointing", "autocast", "match") if k in row}}
    ranks = [json.loads(Path(f"{prefix}.rank{r}.json").read_text()) for r in range(processes)
             if Path(f"{prefix}.rank{r}.json").is_file()]
    if done.returncode != 0 or len(ranks) != processes:
        return {**result, "status": "failed", "error": last_error(done.stderr, done.returncode), "returncode": done.returncode}
    if row["kind"] == "distill":
        losses = directory / "runs" / name / "losses.jsonl"
        records = [json.loads(line) for line in losses.read_text().splitlines() if line.strip()]
        seconds, first_loss = [r["step_seconds"] for r in records], records[0]["loss"]
        shutil.rmtree(directory / "runs" / name, ignore_errors=True)  # checkpoints and saved students: GBs at full size
    else:
        seconds, first_loss = [s["step_seconds"] for s in ranks[0]["steps"]], ranks[0]["losses"][0]
        result["trl"] = {k: ranks[0].get(k) for k in ("bf16", "gradient_checkpointing", "optim", "compute_dtypes",
                                                        "autocast_in_loss", "accelerate_mixed_precision",
                                                        "accelerate_native_amp")}
    per_rank = []
    for figures in ranks:
        peak = figures["steps"][-1]["peak_rss_bytes"] if figures.get("steps") else figures["peak_rss_exit_bytes"]
        per_rank.append({"rank": figures.get("rank", 0), "peak_rss_bytes": peak,
                         "rss_after_load_bytes": figures.get("rss_after_load_bytes"),
                         "peak_rss_loading_bytes": figures.get("peak_rss_loading_bytes"),
                         "peak_reset": figures.get("peak_reset"), "peak_rss_exit_bytes": figures["peak_rss_exit_bytes"]})
    top = max(per_rank, key=lambda r: r["peak_rss_bytes"])
    steady = seconds[1:] or seconds
    return {**result, "status": "ok", "step_seconds": seconds, "median_step_seconds": statistics.median(steady),
            "first_loss": first_loss, "peak_rss_bytes": top["peak_rss_bytes"],
            "rss_after_load_bytes": top["rss_after_load_bytes"],
            "peak_rss_loading_bytes": max((r["peak_rss_loading_bytes"] or 0 for r in per_rank), default=None) or None,
            "peak_above_load_bytes": (top["peak_rss_bytes"] - top["rss_after_load_bytes"]
                                      if top["rss_after_load_bytes"] is not None else None),
            "per_rank": per_rank}


def targets(rows: dict) -> list[dict]:
    """The issue's three targets (and the step-1 loss agreement) from whatever rows ran."""
    ok = {name: row for name, row in rows.items() if row.get("status") == "ok"}
    found = []

    def add(name, value, limit, met, text):
        found.append({"target": name, "value": value, "limit": limit, "met": met, "text": text})

    if "fp32" in ok and "bf16-ckpt" in ok and ok["fp32"]["peak_above_load_bytes"]:
        ratio = ok["bf16-ckpt"]["peak_above_load_bytes"] / ok["fp32"]["peak_above_load_bytes"]
        add("bf16+ckpt memory above the weights vs fp32", ratio, 0.5, ratio <= 0.5,
            f"bf16 + checkpointing peak above the weights = {ratio:.2f}x fp32's (target <= 0.5x)")
    else:
        add("bf16+ckpt memory above the weights vs fp32", None, 0.5, None,
            "bf16 + checkpointing vs fp32 memory above the weights: not measured (a row failed or was skipped)")
    for ddp, fsdp in (("ddp", "fsdp"), ("ddp-bf16-ckpt", "fsdp-bf16-ckpt")):
        if ddp not in ok or fsdp not in ok:
            continue
        ratio = ok[fsdp]["peak_rss_bytes"] / ok[ddp]["peak_rss_bytes"]
        loading = (ok[fsdp]["peak_rss_loading_bytes"] / ok[ddp]["peak_rss_loading_bytes"]
                   if ok[fsdp].get("peak_rss_loading_bytes") and ok[ddp].get("peak_rss_loading_bytes") else None)
        above = ok[fsdp]["peak_above_load_bytes"] / ok[ddp]["peak_above_load_bytes"]
        add(f"FSDP vs DDP per-rank peak ({fsdp})", ratio, 0.6, ratio <= 0.6,
            f"{fsdp} per-rank peak RSS over the training steps = {ratio:.2f}x {ddp}'s (target <= 0.6x); while "
            f"loading: {f'{loading:.2f}x' if loading else '-'}; after load: "
            f"{ok[fsdp]['rss_after_load_bytes'] / ok[ddp]['rss_after_load_bytes']:.2f}x; above it: {above:.2f}x")
    if not any(t["target"].startswith("FSDP") for t in found):
        add("FSDP vs DDP per-rank peak", None, 0.6, None,
            "FSDP vs DDP per-rank peak: not measured (a row failed or was skipped)")
    for name, row in ROWS.items():
        if row["kind"] != "trl":
            continue
        pair = f"{row['match']} vs {name}"
        if name not in rows and not row.get("default", True):
            continue
        if name not in ok or row["match"] not in ok:
            add(f"speed at no more memory: {pair}", None, 1.3, None,
                f"speed and memory, {pair}: not measured (a row failed or was skipped)")
            continue
        ours, theirs = ok[row["match"]], ok[name]
        speedup = theirs["median_step_seconds"] / ours["median_step_seconds"]
        memory = ours["peak_rss_bytes"] / theirs["peak_rss_bytes"]
        above = (ours["peak_above_load_bytes"] / theirs["peak_above_load_bytes"]
                 if (ours["peak_above_load_bytes"] or 0) > 0 and (theirs["peak_above_load_bytes"] or 0) > 0 else None)
        add(f"speed at no more memory: {pair}", speedup, 1.3, speedup >= 1.3 and memory <= 1.0,
            f"distill {row['match']} is {speedup:.2f}x as fast as {name} (target >= 1.3x) at {memory:.2f}x its "
            f"peak RSS (target <= 1.0x; above the loaded models: "
            f"{f'{above:.2f}x' if above is not None else '-'})")
        difference = abs(ours["first_loss"] - theirs["first_loss"]) / max(abs(theirs["first_loss"]), 1e-12)
        tolerance = 1e-4 if not row["bf16"] else 2e-2
        add(f"step-1 loss: {pair}", difference, tolerance, difference <= tolerance,
            f"step-1 loss distill {ours['first_loss']:.6f} vs TRL {theirs['first_loss']:.6f}: relative difference "
            f"{difference:.1e} (tolerance {tolerance:g}{', bf16' if row['bf16'] else ''})")
    return found


def table(rows: dict) -> str:
    gib = lambda b: f"{b / 2**30:.2f}" if b is not None else "-"  # noqa: E731
    lines = ["| row | procs | s/step | peak RSS/rank (GiB) | after load (GiB) | peak above load (GiB) | "
             "loading peak (GiB) | step-1 loss |", "|---|---|---|---|---|---|---|---|"]
    for row in rows.values():
        if row["status"] != "ok":
            lines.append(f"| {row['label']} | {row['processes']} | failed: {row['error'].replace('|', '/')} | | | | | |")
            continue
        lines.append(f"| {row['label']} | {row['processes']} | {row['median_step_seconds']:.3f} | "
                     f"{gib(row['peak_rss_bytes'])} | {gib(row['rss_after_load_bytes'])} | "
                     f"{gib(row['peak_above_load_bytes'])} | {gib(row.get('peak_rss_loading_bytes'))} | "
                     f"{row['first_loss']:.6f} |")
    return "\n".join(lines)


def write_docs(file: Path, command: str, header: str, body: str) -> None:
    """Replace (or append) this benchmark's section of an experiments page."""
    title = "## Scale: a 135M-shaped teacher, precision, checkpointing, LoRA, FSDP, and TRL"
    section = f"{title} ({datetime.date.today()})\n```bash\n{command}\n```\n{header}\n\n{body}\n"
    text = file.read_text() if file.is_file() else "# Experiments\n"
    start = text.find(title)
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + len(title))
        text = text[:start] + section + (text[end + 1:] if end >= 0 else "")
    file.write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per row (s/step: median of 2..N)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads in all (two-process rows: half each)")
    parser.add_argument("--tiny", action="store_true", help="the same shapes in miniature, for a smoke test")
    parser.add_argument("--rows", default=",".join(n for n, r in ROWS.items() if r.get("default", True)),
                        help=f"comma-separated, from: {', '.join(ROWS)} (default: all but the last)")
    parser.add_argument("--json", help="write every figure here")
    parser.add_argument("--docs", help="write the table and command into this markdown file (docs/experiments.md)")
    parser.add_argument("--workdir", help="build and keep everything here (default: a temporary directory)")
    parser.add_argument("--worker", choices=["distill", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--recipe", help=argparse.SUPPRESS)
    parser.add_argument("--figures", help=argparse.SUPPRESS)
    parser.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--checkpointing", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--autocast", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    shape = TINY if args.tiny else FULL
    if args.worker == "distill":
        return distill_worker(args.recipe, args.figures)
    if args.worker == "trl":
        return trl_worker(Path(args.dir), shape, args.steps, args.threads, args.bf16, args.checkpointing, args.autocast,
                          args.figures)
    if args.steps < 2:
        parser.error("--steps must be >= 2 (step 1 is the warm-up)")
    names = [n.strip() for n in args.rows.split(",") if n.strip()]
    unknown = [n for n in names if n not in ROWS]
    if unknown:
        parser.error(f"unknown rows {unknown}; choose from {', '.join(ROWS)}")
    command = "python benchmarks/scale.py " + shlex.join(sys.argv[1:])
    directory = Path(args.workdir or tempfile.mkdtemp(prefix="distill-scale-"))
    directory.mkdir(parents=True, exist_ok=True)
    try:
        print(f"preparing tokenizer, models and data in {directory} ...", flush=True)
        prepared = prepare(directory, shape, args.steps * shape["batch"])
        rows = {}
        for name in names:
            print(f"{name} ...", end=" ", flush=True)
            rows[name] = run_row(name, ROWS[name], directory, shape, args)
            row = rows[name]
            print(f"{row['median_step_seconds']:.3f} s/step, peak {row['peak_rss_bytes'] / 2**30:.2f} GiB"
                  if row["status"] == "ok" else f"failed: {row['error']}", flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(directory, ignore_errors=True)
    header = (f"{'Tiny' if args.tiny else 'Full'} shapes: teacher Llama hidden {shape['hidden']} x "
              f"{shape['teacher_layers']} layers ({shape['heads']} heads / {shape['kv_heads']} KV, intermediate "
              f"{shape['intermediate']}, tied embeddings), student {shape['hidden']} x {shape['student_layers']}, "
              f"V={shape['vocab']}; batch {shape['batch']} x {shape['tokens']} tokens ({shape['prompt_tokens']} prompt, "
              f"masked); JSD beta={BETA}, T={TEMPERATURE}, off-policy, lr {LR}, max_grad_norm {MAX_GRAD_NORM}; "
              f"{args.steps} steps, {args.threads} threads in all (two-process rows: {max(1, args.threads // 2)} each, "
              f"{shape['batch'] // 2} sequences per rank). s/step: median of steps 2..{args.steps}. Peak RSS: over the "
              "training steps, per rank for two-process rows (the larger rank); 'after load': RSS once the models are "
              "loaded.")
    targets_found = targets(rows)
    body = table(rows) + "\n\n" + "\n".join(
        f"- {'met' if t['met'] else 'NOT met' if t['met'] is not None else '-'}: {t['text']}" for t in targets_found)
    print("\n" + header + "\n\n" + body)
    if args.json:
        Path(args.json).write_text(json.dumps({"command": command, "shape": shape, "steps": args.steps,
                                               "threads": args.threads, "prepared": prepared, "rows": rows,
                                               "targets": targets_found}, indent=1))
    if args.docs:
        write_docs(Path(args.docs), command, header, body)


if __name__ == "__main__":
    main()
