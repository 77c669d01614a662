"""
SFT warmup: teach the model the <think> ... </think> <answer> ... </answer> format with a LoRA
adapter before GRPO. A 135M model almost never writes the tags by itself, and with no well-formed
answer every reward is equal and RL learns nothing.

    python sft.py --config recipes/quickstart.toml  # offline: linear equations -> out-sft/ckpt.pt
    python grpo.py --config recipes/quickstart.toml # then RL from the warmed-up adapter
    python sft.py                                   # the defaults: balanced syllogism, as grpo.py's

Where the worked examples come from (all routes write the same examples.jsonl: question, response,
and the reference answer and metadata the verifier needs):
- `--data FILE.jsonl`: examples you already have, {"question", "response"} or chat
  {"messages": [...]}.
- `--teacher URL --teacher_model NAME`: an OpenAI-compatible chat endpoint is shown each question
  with its reference answer and asked to reason towards it; answers are cached in the JSONL, so a
  rerun asks nothing twice.
- `--source self`: the model itself as the teacher, shown the reference answer and a worked example
  of the format; only well-formed samples that the verifier scores 1 are kept.
- `--source metadata` (default): worked examples assembled from what reasoning-gym's metadata states
  about each question (for syllogism: the premises, the conclusion and whether it follows).
Only examples that are well-formed and verified correct are kept (user data without answers is
trusted). The loss covers the response tokens only (and the EOS that ends it).
"""
import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from tqdm import tqdm

import flags
import grpo
import report
import reward
import rundir
import tasks
import weights
from flags import fail, opt
from packed import frozen_linears


@dataclass
class SFTConfig:
    model: str = opt("SmolLM-135M", "hub id or folder; SmolLM-135M: SmolLM2-135M-Instruct, bundled")
    task: str = opt("syllogism:invalid_ratio=0.5",
                    "reasoning-gym task (name:key=value settings); the default is "
                    "syllogism with as many valid as invalid arguments, so that the warmup teaches "
                    "no Yes/No prior")
    out_dir: str = opt("out-sft", "where examples.jsonl, log.jsonl and ckpt.pt go")
    overwrite: bool = opt(False,
                          "warm up again where out_dir holds a finished warmup (it is moved aside, "
                          "not deleted)")
    device: str = opt("auto", "cpu, cuda, or auto", choices=("auto", "cpu", "cuda"))
    dtype: str = opt("auto", "float32, bfloat16, float16, or auto (as grpo.py)",
                     choices=("auto", "float32", "bfloat16", "float16"))
    seed: int = opt(0, "seed for questions, sampling and shuffling", at_least=0)
    # worked examples
    source: str = opt("metadata",
                      "metadata (built from reasoning-gym's metadata) or self (the model as "
                      "teacher)", choices=("metadata", "self"))
    data: str = opt("", "a JSONL file of worked examples to train on instead")
    teacher: str = opt("",
                       "OpenAI-compatible base URL (e.g. http://localhost:8000/v1) of a teacher "
                       "model")
    teacher_model: str = opt("", "model name to ask the teacher endpoint for")
    teacher_concurrency: int = opt(4, "teacher requests in flight at once", at_least=1)
    n_examples: int = opt(200, "worked examples to train on", at_least=1)
    self_samples: int = opt(4, "--source self: samples per question", at_least=1)
    # training
    epochs: int = opt(2, "passes over the examples", at_least=1)
    learning_rate: float = opt(2e-4, "AdamW learning rate", at_least=0)
    batch_size: int = opt(8, "sequences per minibatch", at_least=1)
    gradient_accumulation_steps: int = opt(1, "minibatches per optimizer step", at_least=1)
    lora_r: int = opt(32, "LoRA rank (0: full model); grpo.py --init_from needs the same",
                      at_least=0)
    lora_alpha: float = opt(64.0, "LoRA scale numerator", above=0)
    lora_targets: str = opt("q_proj,k_proj,v_proj,o_proj,up_proj,down_proj,gate_proj",
                            "linear layers given LoRA")
    # eval
    eval_size: int = opt(500,
                         "held-out questions (as grpo.py's: never trained on, evaluated after)",
                         at_least=1)
    eval_before: bool = opt(True,
                            "evaluate the model before the warmup too (a base model that never "
                            "writes the tags "
                                  "scores 0 and often rambles to max_new_tokens: slow on a CPU)")
    eval_after: bool = opt(True,
                           "evaluate the warmed-up model (grpo.py --init_from does at its step 0 "
                           "as well)")
    eval_samples: int = opt(0,
                            "after training, also sample this many answers per eval question: "
                            "mean@k, pass@k and "
                               "the share of questions whose answers disagree, which GRPO learns "
                               "from (0: greedy only)",
                            at_least=0)
    eval_temperature: float = opt(0.7, "temperature of those samples: use grpo.py's --temperature",
                                  above=0)
    eval_top_p: float = opt(0.95, "top-p of those samples: use grpo.py's --top_p", above=0,
                            at_most=1)
    max_new_tokens: int = opt(300, "longest eval answer", at_least=1)


# --------------------------------------------------------------------------------------------------
# Worked examples

def example(entry: dict, response: str) -> dict:
    return {"question": entry["question"], "response": response, "answer": entry.get("answer"),
            "metadata": entry.get("metadata", {})}


def syllogism_response(entry: dict) -> str:
    m = entry["metadata"]
    follows = m["is_valid"]
    if follows:
        verdict = "Whenever both premises are true, the conclusion is true as well, so it follows."
    else:
        verdict = ("The premises can both be true while the conclusion is false, so it does not "
                   "follow.")
    return (f"<think>\nPremise 1: {m['premise1']}.\nPremise 2: {m['premise2']}.\n"
            f"Conclusion to check: {m['conclusion']}.\n{verdict}\n</think>\n"
            f"<answer>{'Yes' if follows else 'No'}</answer>")


def chain_response(entry: dict) -> str | None:
    """chain_sum (and basic_arithmetic with + and - only): the running total, one operation a
    line."""
    tokens = entry["metadata"]["expression"].split()
    if not all(t.lstrip("-").isdigit() for t in tokens[::2]) or not set(tokens[1::2]) <= {"+", "-"}:
        return None
    total, lines = int(tokens[0]), []
    for op, term in zip(tokens[1::2], tokens[2::2]):
        new = total + int(term) if op == "+" else total - int(term)
        lines.append(f"{total} {op} {term} = {new}")
        total = new
    return "\n".join(lines)


def equation_response(entry: dict) -> str | None:
    """simple_equations with one variable term: each constant undone on both sides, then both sides
    divided by the coefficient. Each line says how the constant stands before the step it calls for
    ("The 4 is subtracted, so add 4"): the choice between adding and subtracting then follows the
    words just written."""
    m = entry["metadata"]
    lhs, rhs = m["equation"].split(" = ")
    x, terms = m["variable"], lhs.replace(" - ", " + -").split(" + ")
    var = [t for t in terms if t.lstrip("-").endswith(x)]
    consts = [int(t) for t in terms if t not in var]
    if len(var) != 1 or not all(c.lstrip("-").isdigit() for c in [rhs] + [t for t in terms
                                                                          if t not in var]):
        return None
    coef = var[0][:-len(x)].rstrip("*")
    coef = -1 if coef == "-" else int(coef or 1)
    value, lines, side = int(rhs), [], var[0]
    for c in consts:
        new = value - c
        if c > 0:
            step = f"The {c} is added, so subtract {c} from both sides"
            sign = "-"
        else:
            step = f"The {-c} is subtracted, so add {-c} to both sides"
            sign = "+"
        lines.append(f"{step}: {side} = {value} {sign} {abs(c)} = {new}")
        value = new
    if coef != 1:
        lines.append(f"Divide both sides by {coef}: {x} = {value} / {coef} = {value // coef}")
        value //= coef
    return "\n".join(lines) if str(value) == str(entry["answer"]) else None


def letters(word: str) -> str:
    return ", ".join(word)


# task -> a function writing the think block from the entry's metadata (None: not this entry)
WORKED = {
    "chain_sum": chain_response, "basic_arithmetic": chain_response,
    "simple_equations": equation_response,
    "spell_backward": lambda e: f"The letters of {e['metadata']['word']}: "
                                f"{letters(e['metadata']['word'])}\nFrom last to first: "
                                f"{letters(e['metadata']['word'][::-1])}",
    "word_sequence_reversal": lambda e: f"The words: {', '.join(e['metadata']['words'])}\nFrom "
                                        f"last to first: {', '.join(e['metadata']['words'][::-1])}",
    "letter_counting": lambda e: "\n".join(f"{w}: {w.count(e['metadata']['target_letter'])}"
                                           for w in e["metadata"]["span"])
                                + f"\nTotal: {e['answer']}",
}


def metadata_response(entry: dict) -> str:
    """A worked example written from what reasoning-gym's metadata states about the question: the
    procedure that solves it where WORKED has one (the running total of a sum, the inverse steps of
    an equation, the letters of a word), else one sentence that names the answer."""
    task = entry["metadata"].get("source_dataset")
    if task == "syllogism":
        return syllogism_response(entry)
    if entry.get("answer") is None:
        fail(f"--source metadata needs reference answers; task {task} has none: use --source self, "
             f"--teacher or --data")
    think = WORKED[task](entry) if task in WORKED else None
    if think is None:
        think = f"The question asks for one answer; working it out gives {entry['answer']}."
    return f"<think>\n{think}\n</think>\n<answer>{entry['answer']}</answer>"


TEACHER_PROMPT = ("{question}\n\nThe correct answer is: {answer}\nReason step by step towards this "
                  "answer inside <think> </think>, then give only the answer inside <answer> "
                  "</answer>, for example:\n<think>\nshort "
                  "reasoning\n</think>\n<answer>{answer}</answer>")


def self_examples(model, tok, entries: list[dict], cfg: SFTConfig, score_fn) -> list[dict]:
    """The model as its own teacher: shown the reference answer, sampled self_samples times per
    question; the first well-formed, verified sample of each question is kept."""
    kept = []
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(cfg.seed)
    for i in tqdm(range(0, len(entries), 8), desc="self-teacher", dynamic_ncols=True):
        chunk = entries[i:i + 8]
        asks = [TEACHER_PROMPT.format(question=e["question"], answer=e["answer"]) for e in chunk]
        prompts = [reward.encode_prompt(tok, ask) for ask in asks]
        completions, _ = grpo.generate(model, prompts, cfg.self_samples, max_new_tokens=200,
                                       temperature=0.7, top_p=0.95, eos_id=tok.eos_token_id,
                                       generator=generator)
        for j, e in enumerate(chunk):
            for c in completions[j * cfg.self_samples:(j + 1) * cfg.self_samples]:
                text = tok.decode(c, skip_special_tokens=True).strip()
                s = reward.score_completion(text, e, score_fn)
                if s["format"] and s["correct"]:
                    kept.append(example(e, text))
                    break
    print(f"self-teacher yield: {len(kept)}/{len(entries)} questions got a well-formed, correct "
          f"sample")
    return kept


def post_json(url: str, body: dict, headers: dict, tries: int = 6, backoff: float = 1.0) -> dict:
    """POST with retries: rate limits (429), server errors (5xx) and dropped connections wait and
    try again."""
    for attempt in range(tries):
        try:
            req = urllib.request.Request(url, json.dumps(body).encode(),
                                         {"Content-Type": "application/json", **headers})
            with urllib.request.urlopen(req, timeout=120) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:
            if e.code != 429 and e.code < 500 or attempt == tries - 1:
                raise
        except (urllib.error.URLError, TimeoutError, ConnectionError):
            if attempt == tries - 1:
                raise
        time.sleep(backoff * 2 ** attempt)


def teacher_examples(entries: list[dict], cfg: SFTConfig, cache_path: str) -> list[dict]:
    """Ask the teacher endpoint about every question not yet in the cache; each answer is appended
    to the cache file as soon as it arrives, so an interrupted run loses nothing."""
    cached = {}
    if os.path.exists(cache_path):
        cached = {ex["question"]: ex for ex in read_jsonl(cache_path)}
    todo = [e for e in entries if e["question"] not in cached]
    headers = {}
    if os.environ.get("OPENAI_API_KEY"):
        headers = {"Authorization": f"Bearer {os.environ['OPENAI_API_KEY']}"}
    lock = threading.Lock()

    def ask(entry):
        body = {"model": cfg.teacher_model, "temperature": 0.7, "messages": [
            {"role": "system", "content": reward.SYSTEM_PROMPT},
            {"role": "user", "content": TEACHER_PROMPT.format(question=entry["question"],
                                                              answer=entry["answer"])}]}
        reply = post_json(cfg.teacher.rstrip("/") + "/chat/completions", body, headers)
        ex = example(entry, reply["choices"][0]["message"]["content"].strip())
        with lock, open(cache_path, "a") as f:
            f.write(json.dumps(ex) + "\n")
        return ex

    with ThreadPoolExecutor(cfg.teacher_concurrency) as pool:
        new = list(tqdm(pool.map(ask, todo), total=len(todo), desc="teacher", dynamic_ncols=True))
    print(f"teacher: {len(new)} new answers, {len(cached)} from the cache {cache_path}")
    return list(cached.values()) + new


def read_jsonl(path: str) -> list[dict]:
    """Worked examples from a JSONL file: {"question", "response"} or {"messages": [...]} per
    line."""
    if not os.path.exists(path):
        fail(f"{path}: no such file")
    rows = []
    for n, line in enumerate(open(path, encoding="utf-8"), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            fail(f"{path}:{n}: not valid JSON ({e.msg}); each line must be one JSON object")
        if "messages" in row:
            by_role = {m.get("role"): m.get("content") for m in row["messages"]}
            row = {**row, "question": by_role.get("user"), "response": by_role.get("assistant")}
        if not isinstance(row.get("question"), str) or not isinstance(row.get("response"), str):
            fail(f"{path}:{n}: needs \"question\" and \"response\" strings (or chat \"messages\" "
                 f"with user and assistant turns)")
        rows.append(row)
    return rows


def verified(examples: list[dict], score_fn) -> list[dict]:
    """Keep well-formed examples whose answer the verifier scores 1 (examples without a reference
    are kept)."""
    keep = [ex for ex in examples if reward.format_reward(ex["response"]) and
            (ex.get("answer") is None and not ex.get("metadata")
             or reward.score_completion(ex["response"], ex, score_fn)["correct"])]
    print(f"{len(keep)}/{len(examples)} examples are well-formed and verified")
    return keep


# --------------------------------------------------------------------------------------------------
# Training: the GRPO trainer's collate and log-prob code, with loss = -mean log-prob of the response
# tokens

def to_sample(tok, ex: dict) -> grpo.Sample:
    response = tok(ex["response"], add_special_tokens=False).input_ids + [tok.eos_token_id]
    return grpo.Sample(prompt=reward.encode_prompt(tok, ex["question"]), completion=response)


def sft_loss(model, samples: list[grpo.Sample], weights: torch.Tensor,
             pad_id: int) -> torch.Tensor:
    """Weighted negative log-likelihood of the completion tokens only; prompts carry no loss."""
    logp, _ = grpo.completion_logprobs(model, samples, pad_id, temperature=1.0)
    return -(logp * weights.to(logp.device, logp.dtype)).sum()


def train(model, tok, samples: list[grpo.Sample], cfg: SFTConfig):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    per_step = cfg.batch_size * cfg.gradient_accumulation_steps
    total_steps = cfg.epochs * -(-len(samples) // per_step)
    # linear decay to 0
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 - s / total_steps)
    rng, losses = random.Random(cfg.seed), []
    bar = tqdm(total=total_steps, desc="sft", dynamic_ncols=True)
    with frozen_linears(model, rows=1024, training=True):  # LoRA: the base weights stay fixed
        for _ in range(cfg.epochs):
            order = samples[:]
            rng.shuffle(order)
            for i in range(0, len(order), per_step):
                step = order[i:i + per_step]
                # mean over the step's response tokens
                weights = grpo.token_weights(step, "token", 0)
                loss = 0.0
                for j in range(0, len(step), cfg.batch_size):
                    mb = step[j:j + cfg.batch_size]
                    part = sft_loss(model, mb, torch.cat(weights[j:j + len(mb)]), tok.eos_token_id)
                    part.backward()
                    loss += part.item()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss)
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.3f}")
    bar.close()
    return losses, optimizer


def main(cfg: SFTConfig):
    device, dtype, why = weights.resolve_device(cfg.device, cfg.dtype)
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.data:
        given = read_jsonl(cfg.data)
    if cfg.teacher and not cfg.teacher_model:
        fail("--teacher needs --teacher_model (the model name the endpoint serves)")
    # an unfinished one's teacher cache is reused
    rundir.claim(cfg.out_dir, False, cfg.overwrite, markers=("ckpt.pt",))
    train_set = tasks.make_task(cfg.task, tasks.TRAIN_QUESTIONS, cfg.seed)
    eval_set, eval_entries = tasks.held_out(cfg.task, cfg.eval_size)
    questions = tasks.Questions(train_set, held_out={e["question"] for e in eval_entries})
    model, tok = weights.load(cfg.model, device, dtype, why)
    os.makedirs(cfg.out_dir, exist_ok=True)
    # --config repeats the run from it
    with open(os.path.join(cfg.out_dir, "config.toml"), "w") as f:
        f.write(flags.to_toml(cfg, "sft"))
    examples_path = os.path.join(cfg.out_dir, "examples.jsonl")

    entries = [questions.next() for _ in range(cfg.n_examples)]  # none of them an eval question
    if cfg.data:
        examples = verified(given, train_set.score_answer)
    elif cfg.teacher:
        examples = verified(teacher_examples(entries, cfg, examples_path), train_set.score_answer)
    elif cfg.source == "self":
        examples = self_examples(model, tok, entries, cfg, train_set.score_answer)
    else:
        examples = verified([example(e, metadata_response(e)) for e in entries],
                            train_set.score_answer)
    if not examples:
        fail("no usable worked examples: nothing to train on")
    if not cfg.teacher:
        with open(examples_path, "w") as f:
            f.writelines(json.dumps(ex) + "\n" for ex in examples)

    log = open(os.path.join(cfg.out_dir, "log.jsonl"), "w", buffering=1)  # a line at a time
    if cfg.eval_before:
        before, _ = grpo.evaluate(model, tok, eval_entries, eval_set.score_answer,
                                  cfg.max_new_tokens)
        print("before SFT " + report.eval_line(before))
        log.write(json.dumps({"stage": "before", **before}) + "\n")
    grpo.apply_lora(model, cfg.lora_r, cfg.lora_alpha, cfg.lora_targets)
    t0 = time.time()
    losses, optimizer = train(model, tok, [to_sample(tok, ex) for ex in examples], cfg)
    train_s = time.time() - t0
    # saved before the eval: a crash there loses no training
    ckpt = os.path.join(cfg.out_dir, "ckpt.pt")
    rundir.save_checkpoint(ckpt, grpo.trainable_state_dict(model), optimizer, cfg, step=0,
                           data_index=0, generator=torch.Generator().manual_seed(cfg.seed))
    after = {}
    if cfg.eval_after:
        after, rows = grpo.evaluate(model, tok, eval_entries, eval_set.score_answer,
                                    cfg.max_new_tokens, k_sampled=cfg.eval_samples,
                                    temperature=cfg.eval_temperature, top_p=cfg.eval_top_p)
        print("after SFT  " + report.eval_line(after))
        with open(os.path.join(cfg.out_dir, "samples.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows[:20])
    log.write(json.dumps({"stage": "after", "train_s": train_s, "loss_first": losses[0],
                          "loss_last": losses[-1], "examples": len(examples), **after}) + "\n")
    print(f"saved {ckpt}: python grpo.py --init_from {ckpt}")


if __name__ == "__main__":
    flags.run(main, SFTConfig, __doc__, program="sft")
