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

    def held_out_facts(self) -> list[tuple[str, str]]:
        """(subject, relation) pairs never seen in a held-out phrasing during training: half of
        each subject's relations. Paraphrase generalisation is measured on these."""
        return [tuple(f) for f in self.extra["held_out_facts"]]

    def neighbourhood(self, subject: str, relation: str, k: int = 5, seed: int = 0,
                      exclude: frozenset = frozenset()) -> list[tuple[str, str]]:
        """(prompt, object) for other subjects sharing `relation` and the same true object, leaving
        out the (subject, relation) facts in `exclude`."""
        obj = self.facts[(subject, relation)]
        others = [s for s in self.subjects
                  if s != subject and self.facts[(s, relation)] == obj and (s, relation) not in exclude]
        rng = random.Random(f"{seed}-{subject}-{relation}")
        rng.shuffle(others)
        tmpl = self.relations[relation]["templates"][0]
        return [(tmpl.format(s), obj) for s in others[:k]]

    def counterfactual(self, subject: str, relation: str, seed: int = 0) -> str:
        objs = [o for o in self.relations[relation]["objects"] if o != self.facts[(subject, relation)]]
        return random.Random(f"cf-{seed}-{subject}-{relation}").choice(objs)

    def counterfact_requests(self, n: int, seed: int = 0, n_neighbours: int = 5) -> list[dict]:
        """`n` counterfactual edits in the CounterFact schema, one per subject, each on a fact whose
        held-out phrasings were never trained (its `paraphrase_prompts`). Neighbourhood prompts
        are other subjects with the same relation and true object whose fact is not edited.
        Each record also carries `relation`."""
        if not 0 < n <= len(self.subjects):
            raise ValueError(f"n must be in 1..{len(self.subjects)} (one edit per subject), got {n}")
        rng = random.Random(f"requests-{seed}")
        held_out: dict[str, list[str]] = {}
        for s, r in self.held_out_facts():
            held_out.setdefault(s, []).append(r)
        chosen = [(s, rng.choice(held_out[s])) for s in rng.sample(self.subjects, n)]
        edited = frozenset(chosen)
        records = []
        for s, r in chosen:
            neighbours = self.neighbourhood(s, r, n_neighbours, seed, exclude=edited)
            rewrite = {"prompt": self.relations[r]["templates"][0], "subject": s,
                       "target_new": {"str": self.counterfactual(s, r, seed)},
                       "target_true": {"str": self.facts[(s, r)]}}
            records.append({
                "case_id": len(records), "relation": r, "requested_rewrite": rewrite,
                "paraphrase_prompts": self.prompts(s, r, held_out=True),
                "neighborhood_prompts": [p for p, _ in neighbours],
            })
        return records

    def stream_requests(self, seed: int = 0, n_neighbours: int = 5) -> list[dict]:
        """Counterfactual edits of every fact but one per subject, in a seeded order, as CounterFact
        records (each with `relation`): a stream as long as the world allows (3,500 edits for 500
        subjects x 8 relations) that still leaves unedited facts to measure specificity on. Each
        subject keeps one relation, drawn with `seed`; an edit's neighbourhood prompts are kept
        facts of other subjects with the same relation and true object. Paraphrase prompts are the
        relation's held-out phrasings (trained for half the facts: see `held_out_facts`)."""
        rng = random.Random(f"stream-{seed}")
        relations = list(self.relations)
        kept = {s: rng.choice(relations) for s in self.subjects}
        edits = [(s, r) for s in self.subjects for r in relations if r != kept[s]]
        rng.shuffle(edits)
        records = []
        for s, r in edits:
            obj = self.facts[(s, r)]
            others = [o for o in self.subjects if o != s and kept[o] == r and self.facts[(o, r)] == obj]
            random.Random(f"{seed}-{s}-{r}").shuffle(others)
            template = self.relations[r]["templates"][0]
            records.append({
                "case_id": len(records), "relation": r,
                "requested_rewrite": {"prompt": template, "subject": s,
                                      "target_new": {"str": self.counterfactual(s, r, seed)},
                                      "target_true": {"str": obj}},
                "paraphrase_prompts": self.prompts(s, r, held_out=True),
                "neighborhood_prompts": [template.format(o) for o in others[:n_neighbours]]})
        return records


def make_names(n: int, rng: random.Random, n_first: int = 40) -> list[str]:
    """`n` two-word names: first names from a pool of `n_first` shared ones, last names unique
    (so, as in real names, the last word tells subjects apart)."""
    def word(syllables):
        return "".join(rng.choice(SYLLABLES) for _ in range(syllables)).capitalize()

    firsts, seen = [], set()
    while len(firsts) < n_first:
        first = word(2)
        if first not in seen:
            seen.add(first)
            firsts.append(first)
    names = []
    while len(names) < n:
        last = word(rng.choice([2, 3]))
        if last not in seen:
            seen.add(last)
            names.append(f"{rng.choice(firsts)} {last}")
    return names


def build_world(seed: int = 0, n_subjects: int = 500) -> World:
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
    # the paraphrase templates are seen in training for half of each subject's relations;
    # paraphrase recall and edits are measured on the other half
    held_out = []
    for s in subjects:
        held_out += [(s, r) for r in sorted(rng.sample(list(relations), len(relations) // 2))]
    return World(seed=seed, subjects=subjects, relations=relations, facts=facts,
                 extra={"held_out_facts": held_out})


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
        held_out = set(world.held_out_facts())
        for s in world.subjects:
            for r in rels:
                if (s, r) not in held_out:
                    texts += [t.format(s) + " " + world.facts[(s, r)] + "." for t in world.relations[r]["paraphrases"]]
    rng.shuffle(texts)
    return texts
