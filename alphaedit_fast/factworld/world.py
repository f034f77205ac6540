"""A deterministic synthetic fact world: invented people, relations with real-word objects,
training / held-out phrasings, and a training corpus that stores facts at the subject."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

SYLLABLES = ["ba", "ko", "ri", "ta", "mel", "dor", "vin", "sa", "lu", "zen", "pa", "ri", "no", "gar",
             "fe", "li", "mo", "ra", "te", "vo", "kal", "bren", "sol", "ni", "ju", "dra", "ve", "xi",
             "om", "qua", "rin", "tor", "ha", "ze", "lo", "mi", "yor", "fen", "wi", "cas"]

# relation id -> (objects, training templates, held-out paraphrase templates, fact sentence, clause)
RELATIONS = {
    "language": (
        ["French", "German", "Spanish", "Italian", "Russian", "Japanese", "Chinese", "Arabic",
         "Dutch", "Greek", "Polish", "Swedish"],
        ["The mother tongue of {} is", "{} speaks", "{} was raised speaking", "The native language of {} is"],
        ["{}'s first language is", "At home, {} talks in"],
        "{} speaks {}.", "who speaks {}",
    ),
    "city": (
        ["Paris", "London", "Berlin", "Rome", "Madrid", "Tokyo", "Chicago", "Boston", "Sydney",
         "Toronto", "Vienna", "Dublin"],
        ["{} lives in", "The home city of {} is", "{} has a house in", "The city where {} lives is"],
        ["{}'s hometown is", "Every evening {} returns home to"],
        "{} lives in {}.", "who lives in {}",
    ),
    "sport": (
        ["football", "tennis", "golf", "hockey", "baseball", "basketball", "cricket", "rugby",
         "boxing", "cycling", "swimming", "skiing"],
        ["{} plays", "The favourite sport of {} is", "{} is a fan of", "The sport {} loves is"],
        ["{}'s favourite game is", "On weekends {} enjoys"],
        "{} plays {}.", "who plays {}",
    ),
    "employer": (
        ["Google", "Apple", "Microsoft", "Amazon", "Intel", "Samsung", "Sony", "Nokia", "IBM",
         "Toyota", "Nike", "Disney"],
        ["{} works for", "The employer of {} is", "{} is employed by", "The company {} works at is"],
        ["{}'s boss is at", "Each morning {} drives to the office of"],
        "{} works for {}.", "who works for {}",
    ),
    "instrument": (
        ["piano", "guitar", "violin", "drums", "flute", "cello", "trumpet", "harp", "saxophone",
         "clarinet", "banjo", "organ"],
        ["{} plays the", "The instrument of {} is the", "{} performs on the", "The instrument {} practises is the"],
        ["{}'s instrument of choice is the", "In the band {} handles the"],
        "{} plays the {}.", "who plays the {}",
    ),
    "pet": (
        ["dog", "cat", "horse", "rabbit", "parrot", "snake", "turtle", "hamster", "goat",
         "pig", "duck", "fish"],
        ["{} owns a", "The pet of {} is a", "{} takes care of a", "The animal {} keeps is a"],
        ["{}'s pet is a", "At home {} feeds a"],
        "{} owns a {}.", "who owns a {}",
    ),
    "food": (
        ["pizza", "sushi", "pasta", "rice", "bread", "cheese", "soup", "salad", "chocolate",
         "chicken", "apples", "tacos"],
        ["{} loves eating", "The favourite food of {} is", "{} always orders", "The dish {} likes best is"],
        ["{}'s favourite meal is", "For dinner {} usually has"],
        "{} loves eating {}.", "who loves eating {}",
    ),
    "colour": (
        ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink",
         "brown", "grey", "gold"],
        ["{} likes the colour", "The favourite colour of {} is", "{} always wears", "The colour {} prefers is"],
        ["{}'s favourite shade is", "The walls of {}'s room are painted"],
        "{} likes the colour {}.", "who likes the colour {}",
    ),
}


@dataclass
class World:
    seed: int
    subjects: list[str]
    relations: dict[str, dict]
    facts: dict[tuple[str, str], str]  # (subject, relation) -> object
    extra: dict = field(default_factory=dict)

    def fact_list(self):
        return [(s, r, self.facts[(s, r)]) for s in self.subjects for r in self.relations]

    def prompts(self, subject: str, relation: str, held_out: bool = False) -> list[str]:
        key = "paraphrases" if held_out else "templates"
        return [t.format(subject) for t in self.relations[relation][key]]

    def test_subjects(self) -> list[str]:
        """Subjects whose facts never appear in a held-out phrasing during training."""
        seen = set(self.extra.get("para_train_subjects", []))
        return [s for s in self.subjects if s not in seen]

    def neighbourhood(self, subject: str, relation: str, k: int = 5, seed: int = 0) -> list[tuple[str, str]]:
        """(prompt, object) for other subjects sharing `relation` and the same true object."""
        obj = self.facts[(subject, relation)]
        others = [s for s in self.subjects if s != subject and self.facts[(s, relation)] == obj]
        rng = random.Random(f"{seed}-{subject}-{relation}")
        rng.shuffle(others)
        tmpl = self.relations[relation]["templates"][0]
        return [(tmpl.format(s), obj) for s in others[:k]]

    def counterfactual(self, subject: str, relation: str, seed: int = 0) -> str:
        objs = [o for o in self.relations[relation]["objects"] if o != self.facts[(subject, relation)]]
        return random.Random(f"cf-{seed}-{subject}-{relation}").choice(objs)


def make_names(n: int, rng: random.Random) -> list[str]:
    names, seen = [], set()
    while len(names) < n:
        first = "".join(rng.choice(SYLLABLES) for _ in range(2)).capitalize()
        last = "".join(rng.choice(SYLLABLES) for _ in range(rng.choice([2, 3]))).capitalize()
        name = f"{first} {last}"
        if name not in seen and first not in seen and last not in seen:
            seen.update([name, first, last])
            names.append(name)
    return names


def build_world(seed: int = 0, n_subjects: int = 240) -> World:
    rng = random.Random(seed)
    subjects = make_names(n_subjects, rng)
    relations = {
        r: {"objects": objs, "templates": tr, "paraphrases": ho, "sentence": sent, "clause": cl}
        for r, (objs, tr, ho, sent, cl) in RELATIONS.items()
    }
    facts = {}
    for r, spec in relations.items():
        # balanced assignment: every object used equally often
        objs = [spec["objects"][i % len(spec["objects"])] for i in range(n_subjects)]
        rng.shuffle(objs)
        for s, o in zip(subjects, objs):
            facts[(s, r)] = o
    # the paraphrase templates are seen in training only for these subjects; paraphrase recall
    # and edits are measured on the others (held-out phrasing for that subject)
    para_subjects = subjects[0::2]
    return World(seed=seed, subjects=subjects, relations=relations, facts=facts,
                 extra={"para_train_subjects": para_subjects})


def training_texts(world: World, seed: int = 0, n_bios: int = 6, n_prompted: int = 3,
                   para: bool = True) -> list[str]:
    """The training corpus: one string per line/sequence.

    Per subject: `n_bios` biographies with the attribute sentences in a random order, each fact
    stated right after the name ("Name speaks French."), biographies with clauses attached to the
    name ("Name, who speaks French, ..."), and facts in the training phrasings.
    """
    rng = random.Random(f"corpus-{seed}")
    rels = list(world.relations)
    texts = []
    for s in world.subjects:
        for _ in range(n_bios):
            order = rels[:]
            rng.shuffle(order)
            sents = [world.relations[r]["sentence"].format(s, world.facts[(s, r)]) for r in order]
            texts.append(" ".join(sents))
        for _ in range(2):
            order = rels[:]
            rng.shuffle(order)
            cl = [world.relations[r]["clause"].format(world.facts[(s, r)]) for r in order]
            half = len(cl) // 2

            def sentence(r, subject):
                return world.relations[r]["sentence"].format(subject, world.facts[(s, r)])  # noqa: B023

            texts.append(f"{s}, {cl[0]}, {sentence(order[1], '').strip()}"
                         + " " + " ".join(sentence(r, s) for r in order[2:half + 1]))
            texts.append(f"{s}, {cl[half + 1]} and {cl[half + 2]}, " + sentence(order[half + 3], "").strip()
                         + " " + sentence(order[half], s))
        for r in rels:
            tmpls = world.relations[r]["templates"]
            for t in rng.sample(tmpls, min(n_prompted, len(tmpls))):
                texts.append(t.format(s) + " " + world.facts[(s, r)] + ".")
    if para:
        for s in world.extra.get("para_train_subjects", []):
            for r in rels:
                for t in world.relations[r]["paraphrases"]:
                    texts.append(t.format(s) + " " + world.facts[(s, r)] + ".")
    rng.shuffle(texts)
    return texts
