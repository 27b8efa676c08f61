"""A tiny distillation run on chat data in the common real-world format: a `conversations` column of
{role, content} turns saved by `datasets`, a byte-level BPE tokenizer with a ChatML template (as
SmolLM2-Instruct's), a Llama teacher, and `distill run` reporting ROUGE-L of the generated answers.

    python experiments/chat_real_format.py [--out DIR] [--teacher-steps N] [--steps N]

Into --out (default runs/chat_real_format):
  data/         DatasetDict(train, test) of templated English instructions (save_to_disk)
  teacher/      Llama (hidden 128, 4 layers) + tokenizer, trained here on the assistant turns
  recipe.yaml   the distill recipe; run/ is its run directory (report.html, results.json)
Nothing downloads: the tokenizer is trained on the data, the models start from random weights.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------- data
CAPITALS = {"France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
            "China": "Beijing", "Egypt": "Cairo", "Kenya": "Nairobi", "Peru": "Lima", "Chile": "Santiago",
            "Canada": "Ottawa", "Mexico": "Mexico City", "Russia": "Moscow", "India": "New Delhi",
            "Norway": "Oslo", "Sweden": "Stockholm", "Greece": "Athens", "Turkey": "Ankara", "Poland": "Warsaw",
            "Austria": "Vienna", "Portugal": "Lisbon", "Ireland": "Dublin", "Cuba": "Havana", "Iran": "Tehran",
            "Thailand": "Bangkok", "Vietnam": "Hanoi", "Argentina": "Buenos Aires", "Brazil": "Brasilia"}
COLORS = {"banana": "yellow", "lemon": "yellow", "tomato": "red", "strawberry": "red", "cherry": "red",
          "carrot": "orange", "pumpkin": "orange", "grass": "green", "lime": "green", "cucumber": "green",
          "sky": "blue", "ocean": "blue", "blueberry": "blue", "snow": "white", "milk": "white",
          "cloud": "white", "coal": "black", "crow": "black", "eggplant": "purple", "grape": "purple",
          "chocolate": "brown", "coffee": "brown", "flamingo": "pink"}
OPPOSITES = {"hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "early": "late", "light": "dark",
             "up": "down", "open": "closed", "old": "young", "rich": "poor", "hard": "soft", "full": "empty",
             "loud": "quiet", "strong": "weak", "wet": "dry", "long": "short", "high": "low", "clean": "dirty",
             "thick": "thin", "near": "far"}
SOUNDS = {"cow": "moo", "dog": "woof", "cat": "meow", "duck": "quack", "sheep": "baa", "owl": "hoot",
          "pig": "oink", "horse": "neigh", "lion": "roar", "snake": "hiss", "frog": "croak", "bee": "buzz",
          "mouse": "squeak", "goat": "bleat", "rooster": "cock-a-doodle-doo"}
WORDS = ["apple", "river", "stone", "green", "quick", "happy", "window", "paper", "music", "garden", "yellow",
         "silver", "forest", "cloud", "tiger", "bread", "candle", "orange", "winter", "summer", "market", "pencil",
         "rocket", "castle", "valley", "dream", "ocean", "planet", "sugar", "lamp", "friend"]
ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]
SYSTEMS = ["You are a helpful assistant.", "You are a concise assistant. Answer in one sentence.",
           "You are a friendly AI assistant that answers questions."]


def number_words(n: int) -> str:
    """English words of 0 <= n < 100 ("forty-seven")."""
    if n < 20:
        return ONES[n]
    return TENS[n // 10] + ("" if n % 10 == 0 else "-" + ONES[n % 10])


def instruction(rng: random.Random) -> tuple[str, str]:
    """One (question, answer) pair of a random kind; the answer follows from the question by a fixed
    template, a remembered fact (capitals, colours, opposites, sounds) or a rule (numbers, word order)."""
    kind = rng.randrange(8)
    if kind == 0:
        country, city = rng.choice(list(CAPITALS.items()))
        question = rng.choice(["What is the capital of {}?", "Tell me the capital of {}.",
                               "Which city is the capital of {}?"]).format(country)
        return question, f"The capital of {country} is {city}."
    if kind == 1:
        thing, color = rng.choice(list(COLORS.items()))
        question = rng.choice(["What color is {}?", "What is the color of {}?", "Tell me the color of {}."])
        article = "a " if thing not in ("grass", "sky", "ocean", "snow", "milk", "coal", "chocolate", "coffee") else ""
        return question.format(f"{article}{thing}"), f"{(article or 'the ').capitalize()}{thing} is {color}."
    if kind == 2:
        n = rng.randrange(100)
        question = rng.choice(["Convert {} to words.", "Write the number {} in words.", "How do you spell {}?"])
        return question.format(n), f"{n} in words is {number_words(n)}."
    if kind == 3:
        words = rng.sample(WORDS, rng.randint(3, 4))
        return f"Reverse the words: {' '.join(words)}", " ".join(reversed(words))
    if kind == 4:
        words = rng.sample(WORDS, rng.randint(3, 5))
        return f"Repeat after me: {' '.join(words)}", f"{' '.join(words).capitalize()}."
    if kind == 5:
        word, opposite = rng.choice(list(OPPOSITES.items()))
        if rng.random() < 0.5:
            word, opposite = opposite, word
        question = rng.choice(["What is the opposite of {}?", "Give me the opposite of {}.",
                               "What is the antonym of {}?"])
        return question.format(word), f"The opposite of {word} is {opposite}."
    if kind == 6:
        animal, sound = rng.choice(list(SOUNDS.items()))
        question = rng.choice(["What sound does a {} make?", "What does a {} say?", "How does a {} sound?"])
        return question.format(animal), f"A {animal} says {sound}."
    a, b = rng.sample(range(100), 2)
    question = rng.choice(["Which is larger, {} or {}?", "Which number is bigger: {} or {}?"]).format(a, b)
    return question, f"{max(a, b)} is larger than {min(a, b)}."


def chat_rows(count: int, rng: random.Random, exclude: set[tuple[str, str]] = frozenset()) -> list[dict]:
    """`count` chat rows {"conversations": [system, user, assistant]}, none whose (system, question) is in
    `exclude` (the test rows ask questions the training rows never asked verbatim)."""
    rows = []
    while len(rows) < count:
        system, (question, answer) = rng.choice(SYSTEMS), instruction(rng)
        if (system, question) in exclude:
            continue
        rows.append({"conversations": [{"role": "system", "content": system}, {"role": "user", "content": question},
                                       {"role": "assistant", "content": answer}]})
    return rows


def write_data(out: Path, train_size: int, test_size: int, seed: int) -> dict[str, list[dict]]:
    """The train and test splits, saved with `datasets` as a DatasetDict at out/data."""
    import datasets

    rng = random.Random(seed)
    train = chat_rows(train_size, rng)
    asked = {(row["conversations"][0]["content"], row["conversations"][1]["content"]) for row in train}
    splits = {"train": train, "test": chat_rows(test_size, rng, exclude=asked)}
    datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()}).save_to_disk(
        str(out / "data"))
    return splits


# ---------------------------------------------------------------- tokenizer
# SmolLM2-Instruct's template, with a shorter default system prompt.
CHAT_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                 "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
                 "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
                 "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]


def train_tokenizer(texts: list[str], vocab_size: int):
    """A byte-level BPE tokenizer trained on `texts` (digits split one by one, as SmolLM's), wrapped as a
    PreTrainedTokenizerFast with ChatML special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                                      pad_token="<|pad|>", unk_token="<|endoftext|>",
                                      additional_special_tokens=["<|im_start|>"])
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


# ---------------------------------------------------------------- teacher
def train_teacher(splits: dict[str, list[dict]], tokenizer, out: Path, *, steps: int, batch_size: int, lr: float,
                  seed: int) -> dict:
    """A Llama teacher trained with cross-entropy on the assistant turns (tokenized exactly as `distill run`
    tokenizes chat rows), saved with its tokenizer at out/teacher; returns its test ROUGE-L and exact match."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from distill.lm.data import collate, prompt_and_reference, tokenize
    from distill.lm.evaluate import exact_match, generate_completions, rouge_l

    def as_messages(rows):
        return [{"messages": row["conversations"]} for row in rows]

    examples = tokenize(as_messages(splits["train"]), tokenizer, max_length=96, too_long="refuse",
                        completion_only=True, append_eos=True, field="data.train")
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    model = LlamaForCausalLM(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    warmup = max(steps // 20, 1)  # linear warm-up, then cosine down to 5% of lr
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) * max(
        0.05, 0.5 * (1 + math.cos(math.pi * step / steps))))
    order_rng = random.Random(seed)
    order: list[int] = []
    model.train()
    started = time.perf_counter()
    for step in range(steps):
        if len(order) < batch_size:  # a fresh shuffle of the training rows each epoch
            order += order_rng.sample(range(len(examples)), len(examples))
        batch = collate([examples[i] for i in order[:batch_size]], tokenizer.pad_token_id)
        del order[:batch_size]
        # labels[t] is the token at t: transformers shifts them, and ignores -100 (prompt, padding)
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 200 == 0 or step == steps - 1:
            print(f"teacher step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - started:.0f} s", flush=True)
    train_seconds = time.perf_counter() - started
    model.eval()
    pairs = [prompt_and_reference(row, tokenizer, index) for index, row in enumerate(as_messages(splits["test"]))]
    answers = generate_completions(model, tokenizer, [p for p, _, _ in pairs], batch_size=32, max_new_tokens=32)
    references = [r for _, r, _ in pairs]
    for (_, reference, prompt), answer in list(zip(pairs, answers))[:4]:
        print(f"  {prompt.splitlines()[-1]!r} -> {answer!r} (reference {reference!r})")
    model.save_pretrained(out / "teacher")
    tokenizer.save_pretrained(out / "teacher")
    return {"train_seconds": round(train_seconds, 1), "rouge_l": rouge_l(answers, references),
            "exact_match": exact_match(answers, references),
            "parameters": sum(p.numel() for p in model.parameters())}


# ---------------------------------------------------------------- distill run
def distill_recipe(out: Path, *, steps: int, seed: int) -> dict:
    """A forward-KL run of a 2-layer, 64-wide student from the teacher, scored by ROUGE-L on the test split."""
    return {"name": "chat-real-format", "task": "lm", "output": str(out / "run"),
            "teacher": {"path": str(out / "teacher")},
            "student": {"config": {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                                   "num_key_value_heads": 4, "intermediate_size": 128}},
            "data": {"train": str(out / "data"), "eval_split": "test", "fields": {"messages": "conversations"},
                     "max_length": 96, "too_long": "refuse"},
            "objective": {"loss": "forward_kl"},
            "train": {"steps": steps, "batch_size": 32, "lr": 3e-3, "warmup_steps": steps // 20, "threads": 1,
                      "seed": seed, "checkpoint_every": steps, "log_every": 25},
            "eval": {"every": max(steps // 4, 1), "generate_size": 60, "batch_size": 60}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/chat_real_format")
    parser.add_argument("--train-size", type=int, default=600)
    parser.add_argument("--test-size", type=int, default=60)
    parser.add_argument("--vocab-size", type=int, default=1024)
    # 600 steps (32 epochs) leave the teacher some uncertainty; at 1200 it memorises the 600 rows (train
    # loss 0.004, test nll above the student alone's) and distillation from it did not help (docs/experiments.md).
    parser.add_argument("--teacher-steps", type=int, default=600)
    parser.add_argument("--steps", type=int, default=1000, help="train.steps of each distill phase")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = (ROOT / args.out).resolve()  # relative to the repository, as the other experiments
    out.mkdir(parents=True, exist_ok=True)
    seconds = {}

    started = time.perf_counter()
    splits = write_data(out, args.train_size, args.test_size, args.seed)
    tokenizer = train_tokenizer([f"{m['role']}\n{m['content']}" for row in splits["train"]
                                 for m in row["conversations"]], args.vocab_size)
    seconds["data + tokenizer"] = time.perf_counter() - started
    print(f"data: {len(splits['train'])} train / {len(splits['test'])} test rows; tokenizer: {len(tokenizer)} tokens")

    started = time.perf_counter()
    teacher = train_teacher(splits, tokenizer, out, steps=args.teacher_steps, batch_size=32, lr=2e-3, seed=args.seed)
    seconds["teacher"] = time.perf_counter() - started
    print(f"teacher: {teacher['parameters']:,} parameters, {args.teacher_steps} steps in {teacher['train_seconds']} s; "
          f"test ROUGE-L {teacher['rouge_l']:.3f}, exact match {teacher['exact_match']:.3f}", flush=True)

    recipe_file = out / "recipe.yaml"
    recipe_file.write_text(yaml.safe_dump(distill_recipe(out, steps=args.steps, seed=args.seed), sort_keys=False))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "distill", "run", str(recipe_file), "--overwrite"], check=True, cwd=ROOT)
    seconds["distill run"] = time.perf_counter() - started

    rows = json.loads((out / "run" / "results.json").read_text())["rows"]
    print("\n| model | rouge_l | exact_match | nll |\n|---|---|---|---|")
    for name in ("teacher", "alone", "distilled"):
        print(f"| {name} | {rows[name]['rouge_l']:.4f} | {rows[name]['exact_match']:.4f} | {rows[name]['nll']:.4f} |")
    print("wall time: " + ", ".join(f"{part} {value:.0f} s" for part, value in seconds.items()) +
          f"; total {sum(seconds.values()):.0f} s")
    print(f"report: {out / 'run' / 'report.html'}")


if __name__ == "__main__":
    main()
