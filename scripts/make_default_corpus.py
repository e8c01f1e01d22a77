#!/usr/bin/env python3
"""Writes data/default/{train,valid}.jsonl: the small corpus the embedded
model trains on. Plain sentences about a village and its seasons, written
for this project (no outside text), composed from the lists below with a
fixed seed so the files are reproducible: `python3 scripts/make_default_corpus.py`."""
import json, random

random.seed(7)
people = ["the miller", "the baker", "the old shepherd", "the young weaver", "the blacksmith",
          "the ferryman", "the schoolteacher", "the farmer's daughter", "the carpenter", "the potter"]
places = ["by the river", "at the edge of the wood", "in the market square", "on the hill road",
          "near the stone bridge", "behind the mill", "in the orchard", "at the harbour"]
seasons = {
    "spring": ["the fields turned green", "lambs were born in the high pasture", "the river ran fast with melted snow", "the apple trees came into blossom"],
    "summer": ["the days were long and warm", "the hay was cut and stacked", "children swam in the shallow pool", "bees worked among the clover"],
    "autumn": ["the leaves turned red and gold", "the grain was carried to the mill", "the orchard was heavy with apples", "geese flew south over the valley"],
    "winter": ["snow lay deep on the roofs", "the pond froze from bank to bank", "smoke rose from every chimney", "the nights were long and still"],
}
actions = ["mended the nets", "baked bread before dawn", "counted the sheep twice", "carried water from the well",
           "sharpened the tools", "sang an old song", "told a story to the children", "planted a row of beans",
           "swept the floor of the workshop", "lit a lantern against the dark"]
feelings = ["was content", "felt tired but glad", "hoped for a good harvest", "remembered earlier years",
            "watched the sky for rain", "smiled at the neighbours"]

def sentence():
    s = random.choice(list(seasons))
    p, a, pl, f = random.choice(people), random.choice(actions), random.choice(places), random.choice(feelings)
    fact = random.choice(seasons[s])
    forms = [
        f"In {s}, {fact}, and {p} {a} {pl}.",
        f"When {fact}, {p} {a} and {f}.",
        f"Every morning in {s}, {p} {a} {pl}.",
        f"{p.capitalize()} {a} {pl} while {fact}.",
        f"It was {s}. {fact.capitalize()}. {p.capitalize()} {f}.",
    ]
    return random.choice(forms)

def paragraph():
    return " ".join(sentence() for _ in range(random.randint(2, 4)))

with open("data/default/train.jsonl", "w") as f:
    for _ in range(360):
        f.write(json.dumps({"text": paragraph()}) + "\n")
with open("data/default/valid.jsonl", "w") as f:
    for _ in range(40):
        f.write(json.dumps({"text": paragraph()}) + "\n")
