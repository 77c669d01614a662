"""Specification of sft.py: the loss, the example sources and the teacher client."""
import dataclasses
import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import reasoning_gym as rg
import torch
import torch.nn.functional as F

import grpo
import reward
import sft
from conftest import EOS, hf_twin, padded_sequences, tiny_model
from flags import BadInput


def test_prompt_tokens_carry_no_loss():
    model = tiny_model("llama")
    samples = [grpo.Sample([1, 5, 9, 17], [40, 41, EOS]), grpo.Sample([1, 3], [7, 8, 9, 10, EOS])]
    weights = torch.cat(grpo.token_weights(samples, "token", 0))
    ours = sft.sft_loss(model, samples, weights, EOS)
    # reference: cross-entropy over the padded batch with prompt and padding labels ignored (-100)
    ids, mask, _, _ = padded_sequences(samples)
    labels = torch.full_like(ids, -100)
    for i, s in enumerate(samples):
        p = len(s.prompt)
        labels[i, p:p + len(s.completion)] = torch.tensor(s.completion)
    logits = hf_twin(model)(input_ids=ids, attention_mask=mask).logits
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                          ignore_index=-100)
    assert torch.allclose(ours, ref, atol=1e-12)


def test_metadata_examples_are_well_formed_and_verified():
    ds = rg.create_dataset("syllogism", size=50, seed=3)
    for e in ds:
        response = sft.metadata_response(e)
        s = reward.score_completion(response, e, ds.score_answer)
        assert s["format"] == 1.0 and s["correct"]


def test_a_malformed_jsonl_line_is_reported_with_its_line_number(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"question": "q", "response": "r"}\n\n{"question": "q2", "response": \n')
    with pytest.raises(BadInput, match="data.jsonl:3: not valid JSON"):
        sft.read_jsonl(str(path))


def test_jsonl_reads_question_response_and_chat_messages(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"question": "q1", "response": "r1"},
            {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q2"},
                          {"role": "assistant", "content": "r2"}]}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    got = sft.read_jsonl(str(path))
    assert [(r["question"], r["response"]) for r in got] == [("q1", "r1"), ("q2", "r2")]


class FlakyTeacher(BaseHTTPRequestHandler):
    """A stand-in OpenAI-compatible endpoint: each question is first refused with 429, then fails
    with 503, then answered with a well-formed response that gives the reference answer."""
    seen: dict = {}
    requests: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        FlakyTeacher.requests.append(prompt)
        n = FlakyTeacher.seen[prompt] = FlakyTeacher.seen.get(prompt, 0) + 1
        if n < 3:
            self.send_response(429 if n == 1 else 503)
            self.end_headers()
            return
        answer = prompt.split("The correct answer is: ")[1].split("\n")[0]
        content = f"<think>ok</think><answer>{answer}</answer>"
        reply = {"choices": [{"message": {"role": "assistant", "content": content}}]}
        data = json.dumps(reply).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_teacher_client_retries_and_caches(tmp_path, monkeypatch):
    server = HTTPServer(("127.0.0.1", 0), FlakyTeacher)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sleeps = []
    monkeypatch.setattr(sft.time, "sleep", sleeps.append)
    try:
        entries = list(rg.create_dataset("syllogism", size=3, seed=5))
        cfg = dataclasses.replace(sft.SFTConfig(),
                                  teacher=f"http://127.0.0.1:{server.server_port}/v1",
                                  teacher_model="stand-in", teacher_concurrency=2)
        cache = str(tmp_path / "examples.jsonl")
        got = sft.teacher_examples(entries, cfg, cache)
        assert len(FlakyTeacher.requests) == 9  # 3 questions x (429, 503, 200)
        # per question: wait 1 s, then 2 s (exponential backoff)
        assert sorted(sleeps) == [1.0] * 3 + [2.0] * 3
        assert len(sft.verified(got, rg.create_dataset("syllogism", size=3,
                                                       seed=5).score_answer)) == 3
        # a rerun asks nothing: every answer is in the cache
        again = sft.teacher_examples(entries, cfg, cache)
        assert len(FlakyTeacher.requests) == 9
        assert sorted(e["question"] for e in again) == sorted(e["question"] for e in entries)
    finally:
        server.shutdown()


@pytest.mark.parametrize("task, settings", [
    ("chain_sum", dict(min_terms=2, max_terms=4, min_digits=1, max_digits=2)),
    ("simple_equations", dict(min_terms=2, max_terms=2, min_value=1, max_value=20)),
    ("spell_backward", dict(min_word_len=3, max_word_len=6)),
    ("word_sequence_reversal", dict(min_words=3, max_words=5)),
    ("letter_counting", dict(min_words=3, max_words=6)),
])
def test_worked_solutions_from_metadata_show_the_procedure_and_are_verified(task, settings):
    ds = rg.create_dataset(task, size=100, seed=3, **settings)
    for e in ds:
        response = sft.metadata_response(e)
        s = reward.score_completion(response, e, ds.score_answer)
        assert s["format"] == 1.0 and s["correct"], response
        assert "working it out" not in response  # the procedure, not the one-sentence fallback
    think = sft.metadata_response(ds[0]).split("</think>")[0]
    assert think.count("\n") >= 2  # at least one line of work


def test_worked_equation_steps_are_the_inverse_operations():
    entry = {"answer": "13", "metadata": {"source_dataset": "simple_equations",
                                          "equation": "9 - 15*e = -186", "variable": "e"}}
    assert sft.equation_response(entry) == ("The 9 is added, so subtract 9 from both sides: "
                                            "-15*e = -186 - 9 = -195\nDivide both sides by -15: "
                                            "e = -195 / -15 = 13")
    minus = {"answer": "7", "metadata": {"source_dataset": "simple_equations",
                                         "equation": "3*y - 4 = 17", "variable": "y"}}
    assert sft.equation_response(minus) == ("The 4 is subtracted, so add 4 to both sides: "
                                            "3*y = 17 + 4 = 21\nDivide both sides by 3: "
                                            "y = 21 / 3 = 7")
    chain = {"answer": "14", "metadata": {"source_dataset": "chain_sum",
                                          "expression": "12 + 7 - 5"}}
    assert sft.chain_response(chain) == "12 + 7 = 19\n19 - 5 = 14"
