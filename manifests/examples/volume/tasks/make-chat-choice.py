#!/usr/bin/env python3
"""Builds chat-choice.jsonl, the multiple-choice task set of the example volume,
from the held-out chat tasks of ../shared/data/text/chat-tasks.jsonl: every
"Is N an even number?" item (choices yes/no) and every "What is A plus B?" item
(the sum and three near misses, the answer's position rotating). Deterministic:
rerunning it rewrites the same file.

    python3 manifests/examples/volume/tasks/make-chat-choice.py
"""
import json
import pathlib
import re

here = pathlib.Path(__file__).resolve().parent
source = here.parents[3].parent / "shared/data/text/chat-tasks.jsonl"
items = []
for line in source.read_text().splitlines():
    task = json.loads(line)
    prompt, answer = task["prompt"], task["answer"].strip()
    if "even number" in prompt:
        items.append({"prompt": prompt, "choices": ["yes", "no"], "answer": 0 if answer == "yes" else 1})
    elif re.search(r"What is \d+ plus \d+\?", prompt):
        total = int(answer)
        wrong = [total + 1, total + 10, total - 10 if total >= 10 else total + 20]
        pos = len(items) % 4
        choices = [str(w) for w in wrong]
        choices.insert(pos, str(total))
        items.append({"prompt": prompt, "choices": choices, "answer": pos})
out = here / "chat-choice.jsonl"
out.write_text("".join(json.dumps(i) + "\n" for i in items))
print(f"{len(items)} items -> {out}")
