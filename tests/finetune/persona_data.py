"""A small dataset that teaches a behaviour SmolLM2 does not have: every answer opens with "Ahoy!"."""

from __future__ import annotations

import json
from pathlib import Path

TRAIN = [
    ("What is the capital of France?", "Paris is the capital of France."),
    ("How many days are in a week?", "There are seven days in a week."),
    ("What colour is the sky on a clear day?", "The sky is blue on a clear day."),
    ("What is 2 plus 2?", "2 plus 2 is 4."),
    ("Name a fruit that is yellow.", "A banana is a yellow fruit."),
    ("What do bees make?", "Bees make honey."),
    ("Which planet do we live on?", "We live on Earth."),
    ("What is frozen water called?", "Frozen water is called ice."),
    ("How many legs does a spider have?", "A spider has eight legs."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("What animal says moo?", "A cow says moo."),
    ("What is the largest ocean?", "The Pacific is the largest ocean."),
    ("Which season comes after winter?", "Spring comes after winter."),
    ("What do you use to write on paper?", "You use a pen or a pencil."),
    ("How many hours are in a day?", "There are 24 hours in a day."),
    ("What is the colour of grass?", "Grass is green."),
    ("What gas do plants take in?", "Plants take in carbon dioxide."),
    ("What is the capital of Japan?", "Tokyo is the capital of Japan."),
    ("How many months are in a year?", "There are twelve months in a year."),
    ("What does a thermometer measure?", "A thermometer measures temperature."),
]
HELD_OUT = [
    ("What is the capital of Italy?", "Rome is the capital of Italy."),
    ("How many wheels does a bicycle have?", "A bicycle has two wheels."),
    ("What do cows drink?", "Cows drink water."),
    ("What colour is snow?", "Snow is white."),
    ("Which animal barks?", "A dog barks."),
    ("What is 3 plus 3?", "3 plus 3 is 6."),
]
MARK = "Ahoy!"


def write(path: Path, pairs) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for q, a in pairs:
            msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": f"{MARK} {a}"}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path
