"""The generated world: deterministic files, an exact held-out split, and the reply scorer."""

from __future__ import annotations

import json
import re

import pytest

from llmforge.data import world
from llmforge.data.world import (ATTRIBUTES, FILES, FILLERS, NAMES, PHRASINGS, VALUES, answer, ensure_world,
                                 held_out_people, people, qa_prompts, score_reply)

HELD = {p["name"] for p in held_out_people()}
NAME_RE = re.compile(r"\b(" + "|".join(NAMES) + r")\b")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLMFORGE_CACHE", str(tmp_path_factory.mktemp("world-cache")))
        return ensure_world()


def lines(folder, file):
    return (folder / file).read_text(encoding="utf-8").splitlines()


def test_deterministic_atomic_and_cached(folder, tmp_path, monkeypatch):
    monkeypatch.setenv("LLMFORGE_CACHE", str(tmp_path))
    again = ensure_world()
    assert again == tmp_path / "builtin" / f"world-v{world.WORLD_VERSION}" and again != folder
    for file in FILES:
        assert (again / file).read_bytes() == (folder / file).read_bytes()
    assert [p.name for p in again.parent.iterdir()] == [again.name]  # no temporary folder left
    # A complete folder is returned as is, not regenerated.
    (again / "facts.txt").write_text("edited\n")
    assert ensure_world() == again and (again / "facts.txt").read_text() == "edited\n"
    # An incomplete one is rebuilt.
    (again / "prefs.jsonl").unlink()
    ensure_world()
    for file in FILES:
        assert (again / file).read_bytes() == (folder / file).read_bytes()


def test_people_and_names():
    assert len(NAMES) == len(set(NAMES)) == len(people()) >= 60
    assert not [a for a in NAMES for b in NAMES if a != b and b.startswith(a)]  # a name is never part of another
    assert [p["name"] for p in held_out_people()] == list(NAMES[round(0.6 * len(NAMES)):])
    # Enough held-out questions that a task column's sampling error is small (~3 points at 80%).
    assert len(qa_prompts()) == 4 * len(held_out_people()) >= 180
    for p in people():
        assert all(p[a] in VALUES[a] for a in ATTRIBUTES)
    # The answer format sft teaches starts right at the fact (see world.ANSWERS).
    assert answer("Bruno", "city", "Lima") == "In Lima."
    assert answer("Bruno", "job", "engineer") == "As an engineer."
    assert answer("Bruno", "pet", "owl") == "An owl."
    assert answer("Bruno", "color", "red") == "It is red."


def check_message(m, roles=("system", "user", "assistant")):
    assert set(m) == {"role", "content"} and m["role"] in roles and isinstance(m["content"], str) and m["content"]


@pytest.mark.parametrize("file", ["chat.jsonl", "prefs.jsonl"])
def test_held_out_is_exactly_the_last_fifth(folder, file):
    rows = lines(folder, file)
    held = len(rows) * 0.2
    assert held == int(held)
    cut = len(rows) - int(held)
    for i, row in enumerate(rows):
        mentioned = set(NAME_RE.findall(row))
        assert mentioned, row
        if i < cut:
            assert not mentioned & HELD, row
        else:
            assert mentioned <= HELD, row


def test_chat_shapes(folder):
    rows = [json.loads(r) for r in lines(folder, "chat.jsonl")]
    systems = two_turn = fillers = answers = 0
    for row in rows:
        assert list(row) == ["messages"]
        messages = row["messages"]
        for m in messages:
            check_message(m)
        if messages[0]["role"] == "system":
            systems += 1
            messages = messages[1:]
        assert [m["role"] for m in messages] in (["user", "assistant"], ["user", "assistant"] * 2)
        two_turn += len(messages) == 4
        for reply in messages[1::2]:
            answers += 1
            fillers += reply["content"].count(".") + reply["content"].count("!") > 1
    assert 0.15 < systems / len(rows) < 0.25 and 0.2 < two_turn / len(rows) < 0.3
    assert 0.65 < fillers / answers < 0.75


def test_chat_answers_are_true_and_well_formed(folder):
    truth = {p["name"]: p for p in people()}
    for row in map(json.loads, lines(folder, "chat.jsonl")):
        messages = [m for m in row["messages"] if m["role"] != "system"]
        for question, reply in zip(messages[::2], messages[1::2]):
            (name,) = set(NAME_RE.findall(question["content"]))
            scored = [score_reply({"name": name, "attribute": a, "answer": truth[name][a]}, reply["content"], True)
                      for a in ATTRIBUTES]
            assert sum(s["correct"] for s in scored) == 1, (question, reply)


def test_prefs_shapes(folder):
    rows = [json.loads(r) for r in lines(folder, "prefs.jsonl")]
    listed = wrong = 0
    for row in rows:
        assert list(row) == ["prompt", "chosen", "rejected"]
        if isinstance(row["prompt"], list):
            listed += 1
            for m in row["prompt"]:
                check_message(m)
            assert [m["role"] for m in row["prompt"]] == ["system", "user"]
        else:
            assert isinstance(row["prompt"], str)
        assert row["chosen"] != row["rejected"] and row["chosen"].count(".") == 1
        if row["rejected"].startswith(row["chosen"]):
            rest = row["rejected"][len(row["chosen"]) + 1:]
            assert rest in FILLERS
        else:
            wrong += 1
    assert 0.1 < listed / len(rows) < 0.2 and 0.2 < wrong / len(rows) < 0.3


def test_facts_state_every_fact(folder):
    text = (folder / "facts.txt").read_text(encoding="utf-8")
    assert 300_000 < len(text.encode()) < 500_000
    bios = text.rstrip("\n").split("\n\n")
    # One person per biography, one sentence per line.
    assert all(b and "\n\n" not in b and len(set(NAME_RE.findall(b))) == 1 for b in bios)
    for p in people():
        for a in ATTRIBUTES:
            canonical = world._say(PHRASINGS[a][0], p["name"], p[a])
            assert text.count(canonical) >= 3, (p, a)


def test_qa_prompts():
    items = qa_prompts()
    assert len(items) == len(held_out_people()) * len(ATTRIBUTES)
    assert {i["name"] for i in items} == HELD and {i["attribute"] for i in items} == set(ATTRIBUTES)
    for item in items:
        assert item["messages"][0]["role"] == "user" and item["name"] in item["messages"][0]["content"]
        assert score_reply(item, answer(item["name"], item["attribute"], item["answer"]), True)["correct"]


def test_score_reply():
    item = {"messages": [], "name": "Alice", "attribute": "pet", "answer": "owl"}
    yes = {"format": True, "correct": True, "concise": True}
    no = {"format": False, "correct": False, "concise": False}
    assert score_reply(item, "An owl.", True) == yes
    assert score_reply(item, "  An owl.\n", True) == yes
    assert score_reply(item, "An owl. I can tell you more if you like.", True) == \
        {"format": True, "correct": True, "concise": False}
    assert score_reply(item, "A cat.", True) == {"format": True, "correct": False, "concise": False}
    assert score_reply(item, "A cat. I hope this helps!", True) == \
        {"format": True, "correct": False, "concise": False}
    assert score_reply(item, "An owl.", False) == no  # did not end its turn
    assert score_reply(item, "owl owl the the", True) == no
    assert score_reply(item, "", True) == no
    assert score_reply(item, "A owl.", True) == no  # not the canonical article
    assert score_reply(item, "An owl. Bruno is well known around here.", True) == no  # not a filler
    assert score_reply(item, "An owl. I hope this helps! I am always happy to help.", True) == no  # two fillers
    assert score_reply(item, "An owl. She loves it.", True) == no
    assert score_reply(item, "In Paris.", True) == no  # another attribute


def test_losing_the_race_keeps_the_winner(folder, tmp_path, monkeypatch):
    """Another process renames its (identical) folder into place while this one generates."""
    monkeypatch.setenv("LLMFORGE_CACHE", str(tmp_path))
    target = tmp_path / "builtin" / f"world-v{world.WORLD_VERSION}"
    real = world.generate

    def racing():
        contents = real()
        target.mkdir(parents=True)
        for file, text in contents.items():
            (target / file).write_text(text)
        return contents

    monkeypatch.setattr(world, "generate", racing)
    assert ensure_world() == target
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]
