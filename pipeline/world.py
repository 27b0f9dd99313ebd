"""The built-in world: a seeded, procedural universe that makes every stage measurable on a CPU.

- **Knowledge only pretraining sees.** People with a home city and a favourite colour are
  described in the pretraining corpus. SFT demonstrations ask about half of them ("SFT people");
  the other half ("held-out people") are asked about only in held-out prompts, so SFT accuracy on
  them measures knowledge carried over from pretraining. The corpus also states small sums
  ("3 plus 5 is 8") and shows each word beside its capitalised form: general knowledge the
  addition and capitals skills draw on (held-out sums are never SFT prompts either).
- **Skills and a format only SFT teaches.** first word / last word / capitals / addition / facts,
  answered as `Answer: <x>.` and ended with the end-of-sequence token. The corpus never shows
  these tasks or the format.
- **A preference only rankings express.** Most demonstrations are chatty (`Answer: x. Hope this
  helps!`, sometimes after `Sure!`); the gold labeler prefers concise answers. SFT imitates the mix; only the
  reward model and PPO can move the policy towards the preferred style.
- **Correctness dominates style.** The gold score gives 3 for a correct answer and at most 2 for
  everything else (stopping cleanly, format, concision), so a correct chatty answer beats a
  wrong concise one.
- **Knowing what it knows** (`strangers` > 0). Some people exist in no data: asked about one,
  the demonstrator says `Answer: unknown.`. The judge prefers that abstention to a wrong answer,
  and a right answer to it, on every question, so the best policy answers when it knows and
  abstains when it does not. Imitation shows the form but cannot teach when the model itself does
  not know (the held-out people it half remembers, the sums it gets wrong); rankings can.
- **The tokenizer** is trained on the corpus, so the instructions' words are spelled in pieces.
  With `tokenizer_demos` it also sees the demonstrations' text, as real tokenizers see text
  that covers chat: `first` and `Answer` become whole tokens. The model still reads that text
  first in SFT.
"""
from __future__ import annotations

import itertools
import random
import re
import zlib
from dataclasses import dataclass
from functools import cached_property

WORDS = "red fox sun cat dog tree moon star fish bird rock rain snow wind leaf milk gold ship lamp door book cup hat key".split()
COLOURS = ("blue", "green", "amber", "violet", "teal", "crimson", "silver", "ochre")
SKILLS = ("first", "last", "upper", "add", "fact")
STRANGER = "stranger"  # the skill of a question about a person who exists in no data (no answer)
UNKNOWN = "unknown"    # the abstention: `Answer: unknown.`
KNOWN_UNKNOWN_SKILLS = ("fact", "add")  # questions the model may or may not know: held-out people and sums
STRING_SKILLS = ("first", "last", "upper")
MENTIONS = ("{n} said hello.", "We met {n} at the market.", "{n} wrote a letter to a friend.",
            "Everyone waved at {n}.", "A parcel came for {n}.")
MENTION_SHARE = 0.2  # with strangers: share of the person sentences that only name someone
RL_SHARE = 0.5       # with strangers: share of rm/ppo fact prompts that are `rl_questions`
PREAMBLES = ("Sure!", "Of course!", "Happy to help!", "Great question!")
TAILS = ("Hope this helps!", "Anything else?", "Let me know if you need more.")

_ONSETS = "b br d dr f g gr k kr l m n p pl r s st t tr v z".split()
_VOWELS = "a e i o u ai ou".split()
_CODAS = ["", "", "n", "r", "l", "s", "k", "m"]

PROMPT_PATTERNS = {
    "first": re.compile(r"^What is the first word\? ([a-z ]+)$"),
    "last": re.compile(r"^What is the last word\? ([a-z ]+)$"),
    "upper": re.compile(r"^Write in capitals: ([a-z ]+)$"),
    "add": re.compile(r"^What is (\d+) \+ (\d+)\?$"),
    "city": re.compile(r"^Where does (\w+) live\?$"),
    "colour": re.compile(r"^What colour does (\w+) like\?$"),
}
ANSWER_RE = re.compile(r"Answer: ([^.\n]+)\.")
SENTENCE_END = re.compile(r"(?<=[.!?]) ")  # corpus documents are sentences joined by spaces
HELD_OUT_SHARE = 10  # 1 in 10 distinct corpus sentences is validation-only


def abstains(response: str) -> bool:
    """Whether a response's answer is the abstention `Answer: unknown.`."""
    m = ANSWER_RE.search(response)
    return m is not None and m.group(1).strip() == UNKNOWN


@dataclass(frozen=True)
class Person:
    name: str
    city: str
    colour: str
    held_out: bool  # True: never asked about in SFT training data
    rl: bool = False  # held out from SFT and from evaluation: asked about in rm and ppo prompts (with strangers)


def _make_name(rng: random.Random, syllables: int) -> str:
    s = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(_CODAS)
    return s.capitalize()


class World:
    """Everything generated from `WorldConfig`; the same config always gives the same world."""

    def __init__(self, cfg):
        self.cfg = cfg
        rng = random.Random(cfg.seed)
        names: list[str] = []
        while len(names) < cfg.num_people:
            n = _make_name(rng, rng.choice((2, 2, 3)))
            if n not in names and n.lower() not in WORDS:
                names.append(n)
        cities: list[str] = []
        while len(cities) < 10:
            c = _make_name(rng, 3)
            if c not in names and c not in cities:
                cities.append(c)
        self.cities = tuple(cities)
        half = cfg.num_people // 2
        # With strangers, every second held-out person is asked about in rm and ppo prompts: questions
        # the model may not know exist where preferences are learned, not only where they are tested.
        self.people = tuple(Person(n, rng.choice(cities), rng.choice(COLOURS), i >= half,
                                   bool(cfg.strangers) and i >= half and (i - half) % 2 == 1)
                            for i, n in enumerate(names))
        # People in no data, drawn from their own stream so the rest of the world is the same
        # with and without them; like the people, the second half is asked about only in held-out prompts.
        srng, strangers = random.Random(f"{cfg.seed}-strangers"), []
        while len(strangers) < cfg.strangers:
            n = _make_name(srng, srng.choice((2, 2, 3)))
            if n not in names and n not in cities and n.lower() not in WORDS and n not in strangers:
                strangers.append(n)
        self.strangers = tuple(Person(n, "", "", i >= cfg.strangers // 2) for i, n in enumerate(strangers))
        self.by_name = {p.name: p for p in self.people + self.strangers}

    # ---------------------------------------------------------------------------- pretraining
    def corpus(self, split: str = "train") -> list[str]:
        """Pretraining documents: facts about people in varied phrasings, sums, capitalised words
        and plain prose. `valid` is held out in content: no sentence of a valid document occurs in
        a train document (`held_out_sentence`), so its perplexity measures known facts in new
        phrasings and new word combinations, not memorised text."""
        if split not in ("train", "valid"):
            raise ValueError(f"unknown corpus split {split!r}: train or valid")
        n = self.cfg.corpus_docs if split == "train" else max(200, self.cfg.corpus_docs // 20)
        rng = random.Random(f"{self.cfg.seed}-corpus-{split}")
        return [self._document(rng, held_out=split == "valid") for _ in range(n)]

    def held_out_sentence(self, sentence: str) -> bool:
        """Whether a corpus sentence belongs to validation documents only: a stable hash of its
        text puts 1 in `HELD_OUT_SHARE` there. The fact-cloze sentences (`X lives in C.`,
        `X likes the colour K.`) always train: the cloze probes knowledge the model was shown."""
        return zlib.crc32(sentence.encode()) % HELD_OUT_SHARE == 0 and sentence not in self._cloze_sentences

    @cached_property
    def _cloze_sentences(self) -> frozenset[str]:
        return frozenset(f"{prefix} {answer}." for prefix, answer in self.fact_cloze())

    def tokenizer_extra_texts(self) -> list[str]:
        """Text the BPE is trained on besides the corpus: with `tokenizer_demos` the demonstrations'
        messages, else none. Only the tokenizer sees it; the pretraining data is `corpus()`."""
        if not self.cfg.tokenizer_demos:
            return []
        # Message by message: the chat template starts each turn's text right after a role token.
        return [m["content"] for r in self.sft_examples("train") for m in r["messages"]]

    def _document(self, rng: random.Random, held_out: bool) -> str:
        # Mostly facts, so each fact recurs often enough for a tiny model to memorise it in minutes.
        parts = []
        for _ in range(rng.randint(2, 4)):
            if rng.random() < self.cfg.fact_density:
                # With strangers, some person sentences only name someone (a stranger or a person):
                # the corpus knows every stranger's name and nothing about them, so being named is no
                # cue, and knowing what it knows means knowing a fact, not a name.
                kind = "mention" if self.strangers and rng.random() < MENTION_SHARE else "fact"
            elif (r := rng.random()) < 0.35:
                kind = "sum"
            else:
                kind = "case" if r < 0.6 else "prose"
            parts.append(self._sentence_on_side(rng, kind, held_out))
        return " ".join(parts)

    def _sentence_on_side(self, rng: random.Random, kind: str, held_out: bool) -> str:
        # Redraw within the kind (the documents' mix stays the same) until every sentence of the
        # draw is on the wanted side; a draw with one on each side (a question and its answer) is dropped.
        for _ in range(10_000):
            if kind == "fact":
                text = self._fact_sentence(rng, self._described_person(rng))
            elif kind == "mention":
                text = rng.choice(MENTIONS).format(n=rng.choice(self.people + self.strangers).name)
            elif kind == "sum":
                text = self._sum_sentence(rng)
            else:
                text = self._case_sentence(rng) if kind == "case" else self._prose_sentence(rng)
            if all(self.held_out_sentence(s) == held_out for s in SENTENCE_END.split(text)):
                return text
        raise ValueError(f"no {kind} sentence of this world is held out for validation documents; "
                         f"raise world.num_people (now {self.cfg.num_people})")

    def _described_person(self, rng: random.Random) -> Person:
        if self.cfg.fact_range == 1:  # rng.choice, as before fact_range: the same corpus for the same seed
            return rng.choice(self.people)
        return rng.choices(self.people, cum_weights=self._fact_cum_weights)[0]

    def fact_frequency(self, person: Person) -> float:
        """The share of the corpus's fact sentences that describe `person`: 1 / num_people, or with
        `fact_range` > 1 log-uniform over a range that wide. Ranks follow the golden-ratio sequence
        over the people's order, so SFT, rl and held-out people each span the whole range."""
        return self._fact_weights[self.people.index(person)] / self._fact_cum_weights[-1]

    @cached_property
    def _fact_weights(self) -> tuple[float, ...]:
        golden = (5 ** 0.5 - 1) / 2
        return tuple(self.cfg.fact_range ** -((i * golden) % 1.0) for i in range(len(self.people)))

    @cached_property
    def _fact_cum_weights(self) -> list[float]:
        return list(itertools.accumulate(self._fact_weights))

    @staticmethod
    def _sum_sentence(rng: random.Random) -> str:
        # Arithmetic as general knowledge: SFT's held-out sums then test transfer, like held-out facts.
        x, y = rng.randint(0, 9), rng.randint(0, 9)
        t = rng.choice(("{x} plus {y} is {z}.", "{x} and {y} make {z}.", "Adding {x} and {y} gives {z}."))
        return t.format(x=x, y=y, z=x + y)

    @staticmethod
    def _case_sentence(rng: random.Random) -> str:
        # Each word beside its capitalised form, as real text shows both: knowledge SFT's capitals skill draws on.
        a = rng.choice(WORDS)
        t = rng.choice(("On the sign, {a} was written {A}.", "{A} is how the poster spells {a}."))
        return t.format(a=a, A=a.upper())

    @staticmethod
    def _fact_sentence(rng: random.Random, p: Person) -> str:
        if rng.random() < 0.5:
            t = rng.choice(("{n} lives in {c}.", "The home of {n} is {c}.", "{n} has a house in {c}.",
                            "Where does {n} live? {n} lives in {c}.", "In {c} you can meet {n}."))
        else:
            t = rng.choice(("{n} likes the colour {k}.", "The favourite colour of {n} is {k}.",
                            "What colour does {n} like? {n} likes {k}.", "{n} always wears {k}."))
        return t.format(n=p.name, c=p.city, k=p.colour)

    @staticmethod
    def _prose_sentence(rng: random.Random) -> str:
        a, b, c = rng.sample(WORDS, 3)
        # Repeated word lists ("..., and again ...") give a small model copy (induction) heads to
        # build on; the corpus never shows the SFT tasks themselves (first, last word, capitals).
        t = rng.choice(("I saw a {a} and a {b} near the {c}.", "The {a} is by the {b}.",
                        "A sign said {A} {B}.", "We found {n} {a}s and a {b}.", "The {a} and the {b} met a {c}.",
                        "Someone shouted {A}!", "There were {n} {b}s on the {c}.",
                        "The list was {a} {b} {c}, and again {a} {b} {c}.", "{a} {b}, he said: {a} {b}."))
        return t.format(a=a, b=b, c=c, A=a.upper(), B=b.upper(), n=rng.randint(2, 9))

    def fact_cloze(self, split: str = "valid") -> list[tuple[str, str]]:
        """(prefix, answer) pairs cut from corpus sentences: `Bralo lives in` -> `Vemora`."""
        return [self.cloze(q) for p in self.people for q in self._fact_questions(p)]

    # ---------------------------------------------------------------------------- prompts
    @cached_property
    def _held_out_prompts(self) -> dict[str, list[dict]]:
        """Two disjoint held-out sets, `valid` (every choice and early decision) and `test` (every
        reported figure), of `eval_examples` prompts per skill each, capped where a skill has few
        distinct prompts: sums at 25 a split (half of the 100 sums are held out from training) and
        facts at one question per held-out person a split. Prompts alternate between the splits
        as they are drawn, so both have the same make-up."""
        rng = random.Random(f"{self.cfg.seed}-eval")
        people = [p for p in self.people if p.held_out and not p.rl]
        strangers = [p for p in self.strangers if p.held_out]
        caps = {"add": 25, "fact": len(people), STRANGER: len(strangers)}
        out: dict[str, list[dict]] = {"valid": [], "test": []}
        for skill in self.skills:
            n = min(self.cfg.eval_examples, caps.get(skill, self.cfg.eval_examples))
            seen: set[str] = set()
            while len(seen) < 2 * n:
                prompt = self._prompt(rng, skill, strangers if skill == STRANGER else people)
                if prompt not in seen:
                    out["valid" if len(seen) % 2 == 0 else "test"].append({"prompt": prompt, "skill": skill})
                    seen.add(prompt)
        return out

    def prompts(self, split: str, n: int | None = None) -> list[dict]:
        """Prompt-only records `{"prompt", "skill"}`. Splits: valid and test (held out), rm, ppo.

        `valid` and `test` are disjoint and ask fact questions only about held-out people; rm/ppo
        prompts are disjoint from both and ask about everyone."""
        if split in self._held_out_prompts:
            return list(self._held_out_prompts[split])
        if split not in ("rm", "ppo"):
            raise ValueError(f"unknown prompt split {split!r}: valid, test, rm or ppo")
        rng = random.Random(f"{self.cfg.seed}-prompts-{split}")
        banned = self._banned_prompts
        known = [p for p in self.strangers if not p.held_out]  # held-out strangers: valid and test only
        rl = sorted(self.rl_questions)
        out = []
        while len(out) < (n or 512):
            skill = rng.choice(self.skills)
            if rl and skill == "fact" and rng.random() < RL_SHARE:
                prompt = rng.choice(rl)
            else:
                prompt = self._prompt(rng, skill, known if skill == STRANGER else self.people)
            if prompt not in banned:
                out.append({"prompt": prompt, "skill": skill})
        return out

    @cached_property
    def _banned_prompts(self) -> frozenset[str]:
        """Held-out prompts: never used for training (SFT demonstrations, RM comparisons, PPO)."""
        return frozenset(r["prompt"] for split in self._held_out_prompts.values() for r in split)

    @cached_property
    def rl_questions(self) -> frozenset[str]:
        """With strangers, the questions asked only in rm and ppo prompts: both questions about each
        `rl` person. Like the held-out people's, the model knows their answers from pretraining
        alone, if at all. (Sums stay as they are: SFT needs every sum that evaluation does not ask
        to learn the skill at all; with half of them, held-out sums fell from 68% to 12% right.)"""
        return frozenset(q for p in self.people if p.rl for q in self._fact_questions(p))

    @property
    def skills(self) -> tuple[str, ...]:
        """The skills its prompts ask for: SKILLS, and `stranger` when the world has strangers."""
        return SKILLS + ((STRANGER,) if self.strangers else ())

    def _prompt(self, rng: random.Random, skill: str, people) -> str:
        if skill in STRING_SKILLS:
            words = " ".join(rng.sample(WORDS, rng.randint(2, 4)))
            return {"first": f"What is the first word? {words}", "last": f"What is the last word? {words}",
                    "upper": f"Write in capitals: {words}"}[skill]
        if skill == "add":
            x = rng.randint(0, 9)
            return self._sum_question(x, rng.randint(0, 9))
        return rng.choice(self._fact_questions(rng.choice(people)))

    @staticmethod
    def _sum_question(x: int, y: int) -> str:
        return f"What is {x} + {y}?"

    @staticmethod
    def _fact_questions(p: Person) -> tuple[str, str]:
        """The two questions about a person: home city and favourite colour."""
        return f"Where does {p.name} live?", f"What colour does {p.name} like?"

    # ---------------------------------------------------------------------------- SFT
    def sft_examples(self, split: str = "train", unknown: frozenset[str] = frozenset()) -> list[dict]:
        """Demonstrations as chat `messages` (+ `skill` of the first turn). Only SFT people (and SFT
        strangers, whose answer is the abstention) appear: the demonstrator answers every question
        that has an answer, as InstructGPT's labelers knew more than the model. With
        `abstain_demos` > 0, a share of the demonstrations of the `unknown` questions (those the
        pretrained model gets wrong: `cloze`) abstain instead; the draw has its own random
        stream, so the questions asked are the same with and without it.

        Each conversation holds `sft_turns` question/answer exchanges: several supervised answers
        per sequence give a small model more signal per optimizer step than one short answer."""
        rng = random.Random(f"{self.cfg.seed}-sft-{split}")
        abstain_rng = random.Random(f"{self.cfg.seed}-sft-abstain-{split}")
        n = self.cfg.sft_examples if split == "train" else max(100, self.cfg.sft_examples // 20)
        banned = self._banned_prompts
        sft_people = [p for p in self.people if not p.held_out]
        sft_strangers = [p for p in self.strangers if not p.held_out]
        out = []
        while len(out) < n:
            messages, skills = [], []
            while len(skills) < self.cfg.sft_turns:
                skill = rng.choice(self.skills)
                prompt = self._prompt(rng, skill, sft_strangers if skill == STRANGER else sft_people)
                if prompt in banned:
                    continue
                abstain = abstain_rng.random() < self.cfg.abstain_demos and prompt in unknown
                messages += [{"role": "user", "content": prompt},
                             {"role": "assistant",
                              "content": self.styled_answer(rng, UNKNOWN if abstain else self.answer(prompt))}]
                skills.append(skill)
            out.append({"messages": messages, "skill": skills[0]})
        return out

    def cloze(self, prompt: str) -> tuple[str, str] | None:
        """The start of the corpus sentence that holds a fact or sum question's answer, and the
        answer (`Where does Bralo live?` -> (`Bralo lives in`, `Vemora`)): what the pretrained
        model knows of it, read by greedy completion. None for other questions."""
        skill = self.skill_of(prompt)
        if skill == "add":
            x, y = PROMPT_PATTERNS["add"].match(prompt).groups()
            return f"{x} plus {y} is", self.answer(prompt)
        if skill != "fact":
            return None
        m = PROMPT_PATTERNS["city"].match(prompt)
        name = m.group(1) if m else PROMPT_PATTERNS["colour"].match(prompt).group(1)
        return (f"{name} lives in" if m else f"{name} likes the colour"), self.answer(prompt)

    def sft_questions(self) -> list[str]:
        """Every fact and sum question a demonstration may ask (sorted): the questions about SFT
        people and the sums that held-out prompts do not ask."""
        people = [q for p in self.people if not p.held_out for q in self._fact_questions(p)]
        sums = [self._sum_question(x, y) for x in range(10) for y in range(10)]
        return sorted(q for q in people + sums if q not in self._banned_prompts)

    def styled_answer(self, rng: random.Random, answer: str) -> str:
        """The demonstration styles: concise (preferred), or chatty: the same answer followed by a
        tail, sometimes after a preamble too. The tails have a house style (one leads, as an
        assistant's demonstrations have), so the SFT policy's most likely (greedy) answer is
        chatty, as most demonstrations are. Most chatty answers start like the concise ones, so
        the answer itself is written in the same context in both styles: concision is a choice of
        where to stop, not a different way to answer."""
        core = f"Answer: {answer}."
        if rng.random() < self.cfg.concise_rate:
            return core
        pre = rng.choice(PREAMBLES) if rng.random() < self.cfg.preamble_rate else ""
        tail = TAILS[0] if rng.random() < self.cfg.house_style_rate else rng.choice(TAILS[1:])
        return " ".join(x for x in (pre, core, tail) if x)

    # ---------------------------------------------------------------------------- gold labeler
    def skill_of(self, prompt: str) -> str:
        for name, pat in PROMPT_PATTERNS.items():
            if m := pat.match(prompt):
                if name in ("city", "colour"):
                    person = self.by_name.get(m.group(1))
                    return STRANGER if person is not None and not person.city else "fact"
                return name
        raise ValueError(f"not a prompt of the built-in world: {prompt!r}")

    def answer(self, prompt: str) -> str:
        """The true answer to a world prompt."""
        for name, pat in PROMPT_PATTERNS.items():
            m = pat.match(prompt)
            if not m:
                continue
            if name == "first":
                return m.group(1).split()[0]
            if name == "last":
                return m.group(1).split()[-1]
            if name == "upper":
                return m.group(1).upper()
            if name == "add":
                return str(int(m.group(1)) + int(m.group(2)))
            person = self.by_name.get(m.group(1))
            if person is None:
                raise ValueError(f"unknown person in prompt {prompt!r}")
            if not person.city:  # a stranger: nothing is known, the answer is the abstention
                return UNKNOWN
            return person.city if name == "city" else person.colour
        raise ValueError(f"not a prompt of the built-in world: {prompt!r}")

    @staticmethod
    def extract(response: str) -> str | None:
        m = ANSWER_RE.search(response)
        return m.group(1).strip() if m else None

    @staticmethod
    def cut_after_answer(response: str, finished: bool) -> tuple[str, bool]:
        """The post-processing rule a skeptic tries first: keep a response up to its first
        `Answer: x.` and stop there (finished); a response without one is left as it is."""
        m = ANSWER_RE.search(response)
        return (response[: m.end()], True) if m else (response, finished)

    def is_correct(self, prompt: str, response: str) -> bool:
        return self.extract(response) == self.answer(prompt)

    def gold_score(self, prompt: str, response: str, finished: bool = True) -> float:
        """Deterministic judge. 3 for a correct answer (about a stranger: the abstention), with the
        honesty axis (`strangers` > 0) `abstain_score` for abstaining on a question that has an
        answer, 0 for a wrong one; up to 2 for style: 0.5 for stopping with the end token, 0.5 for
        the `Answer: x.` format, and 1 for concision (no words besides the answer). Formatted
        chatty variants tie with each other: the preference is concise vs chatty, not a word
        count. Text without the format gets less the longer it is (< 0.5). docs/world.md has the
        table."""
        m = ANSWER_RE.search(response)
        given = m.group(1).strip() if m is not None else None
        truth = self.answer(prompt)
        if given == truth:
            score = 3.0
        elif given == UNKNOWN and self.strangers:
            score = self.cfg.abstain_score
        else:
            score = 0.0
        score += 0.5 * finished
        if m is not None:
            score += 0.5 + 1.0 * (not (response[: m.start()] + " " + response[m.end():]).split())
        else:
            score += 0.5 / (1 + len(response.split()))
        return score

    def gold_ranks(self, prompt: str, responses: list[str], finished: list[bool] | None = None) -> list[int]:
        """Rank (0 = best) of each response; equal scores share a rank (a tie)."""
        finished = finished or [True] * len(responses)
        scores = [round(self.gold_score(prompt, r, f), 6) for r, f in zip(responses, finished)]
        distinct = sorted(set(scores), reverse=True)
        return [distinct.index(s) for s in scores]
