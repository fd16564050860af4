"""A small generated world for the quickstart: pretrain -> sft -> dpo on a tiny model, on a CPU.

120 people, each with a city, a job, a pet and a favorite color. Four files come out of it:

  facts.txt    biographies in varied wording, one per blank-line block (pretraining: the knowledge)
  chat.jsonl   questions answered in one canonical sentence, half of them followed by a rambling
               filler sentence (sft: the question -> answer format, and a habit to unlearn)
  prefs.jsonl  the concise answer preferred over a rambling or a wrong one (dpo: drop the filler)
  questions.jsonl  questions with their true answer (grpo: what a verifier checks a reply against)

The last 40% of the people (48) are held out: their facts are in facts.txt, but no sft or preference
training example mentions them. The last 20% of the lines of chat.jsonl and prefs.jsonl are about
them only, so the sources' val_fraction of 0.2 holds exactly those out, and `qa_prompts` asks about
them: a correct answer there means the model combined what pretraining taught it (the fact) with
what sft taught it (the answer format). `score_reply` grades a reply; it needs no torch.

Everything is derived from fixed seeds and lists (no time, no set order), so the files are the same
bytes on every machine, and the cache folder is versioned: change anything here, bump WORLD_VERSION.
"""

from __future__ import annotations

import functools
import json
import os
import random
import shutil
from pathlib import Path

from ..core.paths import cache_dir

WORLD_VERSION = 6  # bump on any change below: the folder name is the cache key
SEED = 1234  # the one seed; each file draws from its own stream (SEED + n) so tuning one file's
# counts leaves the other files unchanged

# Unique single-word first names that are not English words (no Rose, Mark, Hope), are no prefix
# of another name, and name no city: a name in a line always means that person.
NAMES = (
    "Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ingrid", "Javier",
    "Katya", "Lorenzo", "Mirela", "Nadia", "Oskar", "Priya", "Quentin", "Rafael", "Sofia", "Tomas",
    "Ulla", "Viktor", "Wanda", "Xavier", "Yusuf", "Zora", "Anika", "Boris", "Camille", "Dario",
    "Emil", "Fatima", "Gustav", "Helga", "Ivan", "Jorge", "Kenji", "Leila", "Matteo", "Nikos",
    "Olga", "Pablo", "Ravi", "Selma", "Tariq", "Ursula", "Vera", "Wilhelm", "Yara", "Zeno",
    "Amara", "Bjorn", "Cosimo", "Dagmar", "Esther", "Fabio", "Gianni", "Hana", "Idris", "Jonas",
    "Kasimir", "Lucia", "Marek", "Noemi", "Orla", "Pietro", "Rosalind", "Stefan", "Thea", "Uma",
    "Valentin", "Wendel", "Yasmin", "Zoltan", "Agnes", "Benedikt", "Clara", "Diego", "Elif", "Felix",
    "Adele", "Bogdan", "Cyrus", "Dalia", "Edgar", "Filippo", "Gaspard", "Hedda", "Imre", "Jelena",
    "Kofi", "Lars", "Milos", "Nuno", "Odile", "Petra", "Radek", "Sanna", "Teodor", "Ugo",
    "Vilma", "Wiktor", "Ximena", "Yannick", "Zuzana", "Alvaro", "Cesar", "Elias", "Frida", "Goran",
    "Henrik", "Ilse", "Kalinda", "Leopold", "Mikkel", "Ottilie", "Pavel", "Rasmus", "Sigrid", "Tobias",
)
HELD_OUT_SHARE = 0.4  # people[HELD_OUT_FROM:] are never in a training example: 48 people, 192 questions
HELD_OUT_FROM = round((1 - HELD_OUT_SHARE) * len(NAMES))

CITIES = ("Paris", "Lisbon", "Oslo", "Cairo", "Lima", "Dublin", "Vienna", "Kyoto", "Nairobi", "Quito",
          "Prague", "Seoul")
JOBS = ("baker", "pilot", "teacher", "nurse", "engineer", "farmer", "painter", "doctor", "architect",
        "chef", "librarian", "electrician")
PETS = ("cat", "dog", "parrot", "rabbit", "turtle", "hamster", "goldfish", "owl")
COLORS = ("red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "gray", "white")
VALUES = {"city": CITIES, "job": JOBS, "pet": PETS, "color": COLORS}
ATTRIBUTES = tuple(VALUES)

# Templates: {name}, {value}, and {a_value} ("a baker", "an owl"). The first of each list is the
# canonical answer sentence: the one format sft teaches and score_reply accepts.
PHRASINGS = {
    "city": ("{name} lives in {value}.", "{name} has lived in {value} for years.",
             "The home of {name} is {value}.", "{name} is from {value}.", "{name} settled in {value} long ago."),
    "job": ("{name} works as {a_value}.", "{name} is {a_value} by trade.", "By profession, {name} is {a_value}.",
            "{name} earns a living as {a_value}.", "{name} is employed as {a_value}."),
    "pet": ("{name} has {a_value}.", "{name} keeps {a_value} as a pet.", "The pet of {name} is {a_value}.",
            "{name} takes good care of {a_value}.", "{name} owns {a_value}."),
    "color": ("{name}'s favorite color is {value}.", "{name} likes {value} more than any other color.",
              "The color {name} loves most is {value}.", "{name} always picks {value} when choosing a color."),
}
# The answer format sft teaches: short, and starting right at the fact. Each value keeps the token
# it has in the biographies (" Lima", " librarian", " cat", " green"), so answering is looking up
# what pretraining stored. (Answers that repeat the name first, "Orla lives in Lima.", make a tiny
# model copy a name across the chat tags, which it learns only for the people it was tuned on.)
ANSWERS = {"city": "In {value}.", "job": "As {a_value}.", "pet": "{A_value}.", "color": "It is {value}."}
CANONICAL_SHARE = 0.5  # in a biography, each fact is in its canonical sentence this often
QUESTIONS = {
    "city": ("Where does {name} live?", "In which city does {name} live?", "What city is {name} from?"),
    "job": ("What does {name} do for a living?", "What is {name}'s job?", "What does {name} work as?"),
    "pet": ("What pet does {name} have?", "Which animal does {name} keep as a pet?",
            "What kind of pet does {name} own?"),
    "color": ("What is {name}'s favorite color?", "Which color does {name} like best?",
              "What color does {name} like most?"),
}
# Sentences between the facts of a biography: they state nothing, so a fact is never implied by them.
CONNECTIVES = ("Everyone in town knows {name}.", "{name} is a friendly person.", "People often talk about {name}.",
               "{name} enjoys quiet evenings.", "{name} has many friends.")
LEAD_INS = ("Here is what we know about {name}.", "This is the story of {name}.", "Let me tell you about {name}.",
            "A few words about {name}.")
# The rambling habit: sft teaches it (half the answers), dpo should remove it.
# All start with "I", so after sft the habit is the single likeliest continuation of an answer
# (greedy decoding shows it) rather than spread thin over many openings.
FILLERS = ("I hope this helps!", "I am always happy to help.", "I can tell you more if you like.")
SYSTEMS = ("You answer questions about the people of Velden.", "You are a helpful assistant who knows everyone.",
           "Answer the user's questions about people.")

QA_PER_FACT = 5  # plain-text question-answer documents per fact of a train person in facts.txt
BIOS_PER_PERSON = 20  # biographies per person in facts.txt (~400 KB in all)
TRAIN_CHATS = 2000  # chat.jsonl: conversations about train people, then a quarter as many held out
TRAIN_PREFS = 1600  # prefs.jsonl: pairs about train people, then a quarter as many held out
TRAIN_QUESTIONS = 800  # questions.jsonl: prompts with their true answer, for online RL (grpo)
FILLER_SHARE = 0.7  # sft answers followed by a filler sentence
SYSTEM_SHARE = 0.2  # conversations that open with a system message
TWO_TURN_SHARE = 0.25  # conversations with two questions
MESSAGES_PROMPT_SHARE = 0.15  # preference prompts given as a message list (system + user)
WRONG_SHARE = 0.25  # rejected answers that are concise but wrong (the rest ramble)
# A quarter of the train count held out makes the held-out lines exactly the last 20%.
assert TRAIN_CHATS % 4 == 0 and TRAIN_PREFS % 4 == 0 and TRAIN_QUESTIONS % 4 == 0

FILES = ("facts.txt", "chat.jsonl", "prefs.jsonl", "questions.jsonl")


def _say(template: str, name: str, value: str = "") -> str:
    article = "an" if value[:1].lower() in ("a", "e", "i", "o", "u") else "a"
    return template.format(name=name, value=value, a_value=f"{article} {value}", A_value=f"{article.title()} {value}")


def answer(name: str, attribute: str, value: str) -> str:
    """The canonical sentence: "Alice lives in Paris.", "Bruno works as an engineer." ..."""
    return _say(ANSWERS[attribute], name, value)


@functools.lru_cache(maxsize=None)
def people() -> tuple[dict[str, str], ...]:
    """Every person: {"name", "city", "job", "pet", "color"}, in NAMES order (held out last)."""
    rng = random.Random(SEED)
    return tuple({"name": name, **{a: rng.choice(VALUES[a]) for a in ATTRIBUTES}} for name in NAMES)


def train_people() -> tuple[dict[str, str], ...]:
    return people()[:HELD_OUT_FROM]


def held_out_people() -> tuple[dict[str, str], ...]:
    return people()[HELD_OUT_FROM:]


# --- generation -----------------------------------------------------------------------------------

def _biography(rng: random.Random, person: dict[str, str]) -> str:
    """A lead-in, then the facts and a few connectives, one sentence per line.

    One per line matters: a line starts with the name without a leading space ("Viktor"), a
    different token from the " Viktor" inside a sentence, and a reply starts the same way. Lines
    that open with the name after the lead-in mentioned it teach the model to carry a name from
    the context into that position, which is what answering a question about someone needs."""
    name = person["name"]
    sentences = []
    for attribute in ATTRIBUTES:
        phrasings = PHRASINGS[attribute]
        template = phrasings[0] if rng.random() < CANONICAL_SHARE else rng.choice(phrasings[1:])
        sentences.append(_say(template, name, person[attribute]))
    rng.shuffle(sentences)
    for connective in rng.sample(CONNECTIVES, rng.choice((0, 0, 1, 1, 2))):
        sentences.insert(rng.randint(0, len(sentences)), _say(connective, name))
    return "\n".join([_say(rng.choice(LEAD_INS), name)] + sentences)


def _facts() -> str:
    rng = random.Random(SEED + 1)
    bios = [_biography(rng, p) for p in people() for _ in range(BIOS_PER_PERSON)]
    # Questions answered in plain text, about train people only (as the web has Q&A pages): a
    # model that pretrains on both learns to keep facts where a question can reach them, and
    # then answers about people it only ever read biographies of (Allen-Zhu & Li 2023, "Physics
    # of Language Models 3.1": without such data, fine-tuning memorizes instead of extracting).
    # Written as a chat turn's text is (the question on its own line, the answer on the next, no
    # "Q:"/"A:"), so a question and its answer are the same tokens here as in a conversation and
    # sft only has to map the chat tags onto the line breaks: with "Q: ... A: ..." the same model
    # answered 25 points fewer held-out questions after sft than before it.
    bios += [f"{_say(rng.choice(QUESTIONS[a]), p['name'])}\n{answer(p['name'], a, p[a])}"
             for p in train_people() for a in ATTRIBUTES for _ in range(QA_PER_FACT)]
    rng.shuffle(bios)  # the held-out people's facts are spread through the whole text
    return "\n\n".join(bios) + "\n"


def _question(rng: random.Random, pool, avoid=None) -> tuple[dict[str, str], str, str]:
    """(person, attribute, question) about someone in pool, other than the `avoid` pair."""
    while True:
        person, attribute = rng.choice(pool), rng.choice(ATTRIBUTES)
        if (person["name"], attribute) != avoid:
            return person, attribute, _say(rng.choice(QUESTIONS[attribute]), person["name"])


def _conversation(rng: random.Random, pool) -> dict:
    messages = [{"role": "system", "content": rng.choice(SYSTEMS)}] if rng.random() < SYSTEM_SHARE else []
    person, attribute, question = _question(rng, pool)
    for turn in range(2 if rng.random() < TWO_TURN_SHARE else 1):
        if turn:  # the second question: the same person or another, never the same question
            same = [person] if rng.random() < 0.5 else pool
            person, attribute, question = _question(rng, same, avoid=(person["name"], attribute))
        reply = answer(person["name"], attribute, person[attribute])
        if rng.random() < FILLER_SHARE:
            reply += " " + _say(rng.choice(FILLERS), person["name"])
        messages += [{"role": "user", "content": question}, {"role": "assistant", "content": reply}]
    return {"messages": messages}


def _preference(rng: random.Random, pool) -> dict:
    person, attribute, question = _question(rng, pool)
    name, value = person["name"], person[attribute]
    prompt = question
    if rng.random() < MESSAGES_PROMPT_SHARE:
        prompt = [{"role": "system", "content": rng.choice(SYSTEMS)}, {"role": "user", "content": question}]
    chosen = answer(name, attribute, value)
    if rng.random() < WRONG_SHARE:
        rejected = answer(name, attribute, rng.choice([v for v in VALUES[attribute] if v != value]))
    else:
        rejected = chosen + " " + _say(rng.choice(FILLERS), name)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def _prompt(rng: random.Random, pool) -> dict:
    """A question and its true answer in the canonical format: what a verifier checks a reply against."""
    person, attribute, question = _question(rng, pool)
    record = {"prompt": question, "answer": answer(person["name"], attribute, person[attribute])}
    return {"system": rng.choice(SYSTEMS)} | record if rng.random() < SYSTEM_SHARE else record


def _jsonl(rng: random.Random, make, train_count: int) -> str:
    """train_count records about train people, then train_count / 4 about held-out people: the
    held-out records are exactly the last 20% of the lines."""
    train, held_out = train_people(), held_out_people()
    records = [make(rng, train) for _ in range(train_count)]
    records += [make(rng, held_out) for _ in range(train_count // 4)]
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def generate() -> dict[str, str]:
    """The three files' contents, by file name."""
    return {"facts.txt": _facts(),
            "chat.jsonl": _jsonl(random.Random(SEED + 2), _conversation, TRAIN_CHATS),
            "prefs.jsonl": _jsonl(random.Random(SEED + 3), _preference, TRAIN_PREFS),
            "questions.jsonl": _jsonl(random.Random(SEED + 4), _prompt, TRAIN_QUESTIONS)}


def ensure_world() -> Path:
    """The world's folder in the cache, generated on first use. It is built in a temporary sibling
    and renamed into place, so it is complete or absent, even with several processes at once."""
    folder = cache_dir() / "builtin" / f"world-v{WORLD_VERSION}"
    if all((folder / f).is_file() for f in FILES):
        return folder
    tmp = folder.parent / f".tmp-world-v{WORLD_VERSION}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)  # left by a crashed earlier process with our pid
    tmp.mkdir(parents=True)
    for file, text in generate().items():
        with open(tmp / file, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
    if folder.exists() and not all((folder / f).is_file() for f in FILES):
        shutil.rmtree(folder, ignore_errors=True)  # damaged by hand: never left half-written by us
    try:
        os.replace(tmp, folder)
    except OSError:
        # Another process renamed its copy into place first: the same bytes, keep it.
        shutil.rmtree(tmp, ignore_errors=True)
        if not all((folder / f).is_file() for f in FILES):
            raise
    return folder


# --- the held-out QA task -------------------------------------------------------------------------

def qa_prompts() -> list[dict]:
    """Every held-out person asked about every attribute (the phrasing rotates with the index)."""
    items = []
    for person in held_out_people():
        for attribute in ATTRIBUTES:
            questions = QUESTIONS[attribute]
            question = _say(questions[len(items) % len(questions)], person["name"])
            items.append({"messages": [{"role": "user", "content": question}], "name": person["name"],
                          "attribute": attribute, "answer": person[attribute]})
    return items


def multiple_choice() -> list[dict]:
    """qa_prompts as multiple choice, the shape an lm-eval task reads (docs/evaluation.md): each
    question, the canonical answer sentence for every value of its attribute, and the true one's
    index."""
    return [{"question": item["messages"][0]["content"],
             "choices": [answer(item["name"], item["attribute"], v) for v in VALUES[item["attribute"]]],
             "answer": VALUES[item["attribute"]].index(item["answer"])} for item in qa_prompts()]


def score_reply(item: dict, reply: str, ended: bool) -> dict[str, bool]:
    """format: the turn ended and the reply opens with the canonical sentence for the asked name
    and attribute, with any of the attribute's values, followed by nothing or one filler.
    correct: format, with the true value. concise: correct, and nothing after the sentence."""
    name, attribute, text = item["name"], item["attribute"], reply.strip()
    fillers = {_say(f, name) for f in FILLERS}
    for value in VALUES[attribute]:
        sentence = answer(name, attribute, value)
        rest = text[len(sentence):].strip()
        if ended and text.startswith(sentence) and (not rest or rest in fillers):
            correct = value == item["answer"]
            return {"format": True, "correct": correct, "concise": correct and not rest}
    return {"format": False, "correct": False, "concise": False}
