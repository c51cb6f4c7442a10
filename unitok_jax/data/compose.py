"""Thousands of distinct English sentences, composed offline from templates and word lists (deterministic).

    from unitok_jax.data.compose import compose_sentences
    compose_sentences(3600, seed=0)  # -> 3600 distinct sentences, the same list on every machine

The handwritten ``sentences.txt`` (400 lines) is too small a corpus for the LM: it memorises the training sentences
faster than it learns to listen. These templates cover statements, questions and requests over everyday words (no
digits, no abbreviations: eSpeak NG reads every word the way it is written, and a transcript can be compared word
for word). Sentences are drawn with a seeded numpy RNG (template, then one word per slot) until ``n`` distinct ones
are found; the list depends only on ``(n, seed)`` and on the word lists below, and each call with a larger ``n``
extends the smaller call's list (a prefix), so adding sentences never reshuffles the ones already drawn.
"""
from __future__ import annotations

import re

import numpy as np

WORDS: dict[str, tuple[str, ...]] = {
    "name": ("Anna", "Ben", "Clara", "David", "Emma", "Frank", "Grace", "Henry", "Isabel", "Jack", "Kate", "Leo",
             "Maria", "Nathan", "Olivia", "Peter", "Rachel", "Simon", "Tessa", "Victor", "Wendy", "Oscar", "Lucy",
             "Martin", "Helen", "Daniel", "Sophie", "Thomas", "Julia", "Adam", "Nora", "Robert", "Alice", "George",
             "Ellen", "Samuel", "Laura", "Edward", "Molly", "Arthur"),
    "person": ("teacher", "farmer", "doctor", "baker", "driver", "painter", "nurse", "pilot", "gardener", "student",
               "neighbour", "captain", "writer", "singer", "fisherman", "waiter", "tailor", "builder", "judge",
               "librarian", "shopkeeper", "carpenter", "dancer", "soldier", "sailor", "engineer", "manager",
               "musician", "postman", "stranger", "child", "visitor", "old man", "young woman", "little boy",
               "little girl", "guide", "cook", "guard", "farmer's wife"),
    "relative": ("mother", "father", "sister", "brother", "uncle", "aunt", "cousin", "grandmother", "grandfather",
                 "friend", "son", "daughter"),
    "adj": ("small", "large", "old", "new", "red", "blue", "green", "yellow", "brown", "white", "black", "heavy",
            "light", "bright", "dark", "quiet", "noisy", "clean", "dirty", "warm", "cold", "soft", "broken", "shiny",
            "wooden", "round", "narrow", "empty", "strange", "lovely", "tiny", "huge", "plain", "golden", "silver",
            "dusty", "fresh", "simple", "famous", "secret", "careful", "gentle", "lonely", "busy", "sleepy",
            "hungry", "clever", "proud", "tired", "happy"),
    "thing": ("book", "lamp", "basket", "letter", "bottle", "blanket", "candle", "mirror", "ladder", "kettle",
              "bucket", "umbrella", "wallet", "ticket", "jacket", "map", "clock", "radio", "hammer", "plate", "cup",
              "box", "key", "coat", "hat", "bag", "rope", "bell", "chair", "drum", "kite", "sweater", "camera",
              "pencil", "notebook", "parcel", "pillow", "spoon", "bicycle", "suitcase", "painting", "violin",
              "shovel", "apron", "necklace", "scarf", "envelope", "jar", "flag", "telescope"),
    "animal": ("cat", "dog", "horse", "rabbit", "fox", "owl", "goat", "duck", "mouse", "sheep", "cow", "pigeon",
               "squirrel", "frog", "parrot", "donkey", "goose", "turtle", "kitten", "puppy", "crow", "deer",
               "hedgehog", "swan"),
    "place": ("kitchen", "garden", "station", "market", "library", "harbour", "village", "forest", "bakery",
              "office", "museum", "hospital", "school", "church", "bridge", "river", "beach", "farm", "hotel",
              "theatre", "park", "castle", "valley", "cottage", "factory", "island", "airport", "playground",
              "cellar", "attic", "hallway", "barn", "square", "shop", "hill", "lake", "meadow", "orchard", "tower",
              "garage"),
    "furniture": ("table", "shelf", "bed", "sofa", "desk", "cupboard", "bench", "stool", "counter", "windowsill",
                  "piano", "wardrobe", "fireplace", "doorstep", "staircase"),
    "past": ("this morning", "last night", "after lunch", "before dinner", "on Monday", "on Tuesday",
             "on Wednesday", "on Thursday", "on Friday", "on Saturday", "on Sunday", "at midnight", "at noon",
             "in the afternoon", "earlier this week", "yesterday", "last summer", "last winter", "in the spring",
             "in the autumn", "at dawn", "at sunset", "a week ago", "long ago"),
    "future": ("tomorrow", "next week", "later today", "on Monday", "on Friday", "on Sunday", "next winter",
               "next summer", "after lunch", "before dinner", "at noon", "this evening", "tonight", "soon",
               "in the morning", "at sunrise"),
    "event": ("breakfast", "the meeting", "the storm", "the holiday", "the party", "the concert", "the wedding",
              "the game", "the lesson", "the market opens", "the train arrives", "the sun goes down", "the guests leave",
              "the shop closes", "the bell rings", "the rain stops", "the film starts", "supper", "the race",
              "the trip"),
    # past tense, takes an object
    "did": ("found", "painted", "carried", "dropped", "repaired", "washed", "borrowed", "bought", "sold", "hid",
            "opened", "closed", "wrapped", "cleaned", "moved", "lifted", "lost", "forgot", "noticed", "brought",
            "packed", "delivered", "returned", "measured", "polished", "pushed", "pulled", "shared", "tied",
            "counted"),
    # base form, takes an object
    "do": ("find", "paint", "carry", "drop", "repair", "wash", "borrow", "buy", "sell", "hide", "open", "close",
           "wrap", "clean", "move", "lift", "lose", "forget", "notice", "bring", "pack", "deliver", "return",
           "measure", "polish", "push", "pull", "share", "tie", "count"),
    # past tense, no object
    "went": ("waited", "slept", "laughed", "sang", "danced", "shouted", "whistled", "rested", "worked", "played",
             "stayed", "cried", "smiled", "listened", "wandered", "arrived", "stopped", "hurried", "knocked",
             "painted"),
    # base form, no object
    "go": ("wait", "sleep", "laugh", "sing", "dance", "shout", "whistle", "rest", "work", "play", "stay", "smile",
           "listen", "wander", "arrive", "stop", "hurry", "knock", "swim", "climb"),
    "prep": ("under", "behind", "beside", "near", "on", "inside", "next to", "in front of", "above", "below"),
    "quality": ("too heavy", "very old", "quite new", "too small", "far too big", "rather dusty", "almost empty",
                "surprisingly warm", "perfectly clean", "a little broken", "very expensive", "quite cheap",
                "not ready", "still wet", "completely full"),
    "feeling": ("happy", "surprised", "glad", "excited", "sorry", "proud", "pleased", "delighted", "sad",
                "relieved", "amazed", "thrilled", "worried", "nervous", "curious"),
}

TEMPLATES: tuple[str, ...] = (
    "The {adj} {person} {did} the {thing} in the {place} {past}.",
    "{name} {did} a {adj} {thing} {past}.",
    "Did the {person} {do} the {thing} {past}?",
    "We will {do} the {adj} {thing} {future}.",
    "My {relative} {went} in the {place} {past}.",
    "{name} and {name} walked to the {place} {past}.",
    "Please {do} the {thing} before {event}.",
    "There is a {adj} {animal} {prep} the {furniture}.",
    "Why did the {animal} {go} near the {place}?",
    "The {person} said that the {thing} was {quality}.",
    "{name} has never seen such a {adj} {place}.",
    "I think the {animal} is hiding {prep} the {furniture}.",
    "After {event}, {name} {went} for a while.",
    "Have you seen my {adj} {thing} anywhere?",
    "The {thing} {prep} the {furniture} belongs to my {relative}.",
    "{name} felt {feeling} when the {person} {did} the {thing}.",
    "Could you {do} the {thing} for the {person}?",
    "Our {relative} keeps a {adj} {animal} at the {place}.",
    "The {animal} {went} {prep} the {adj} {furniture} {past}.",
    "Nobody knew why the {person} {did} the {thing}.",
    "{name} asked the {person} to {do} the {adj} {thing}.",
    "The {place} was {adj} and {adj} {past}.",
    "Let us {go} by the {place} until {event}.",
    "Where did you {do} the {thing}, {name}?",
    "The {adj} {thing} is {prep} the {furniture} in the {place}.",
    "My {relative} was {feeling} to see the {animal} {past}.",
    "Every {person} in the {place} {went} {past}.",
    "{name} gave the {person} a {adj} {thing}.",
    "It is {quality}, said the {person} with a smile.",
    "I left the {thing} {prep} the {furniture} {past}.",
    "Will the {person} {do} the {adj} {thing} {future}?",
    "{name} is going to {go} at the {place} {future}.",
    "The {person} and the {animal} {went} by the {place}.",
    "Do not {do} the {thing} until {event}.",
    "Is the {thing} still {prep} the {furniture}?",
)


def _fill(template: str, rng: np.random.Generator) -> str:
    used: dict[str, set] = {}

    def pick(m: re.Match) -> str:
        slot = m.group(1)
        choices = WORDS[slot]
        while True:  # two slots of one kind in a sentence get different words ("Anna and Ben")
            w = choices[int(rng.integers(len(choices)))]
            if w not in used.setdefault(slot, set()):
                used[slot].add(w)
                return w

    s = re.sub(r"\{(\w+)\}", pick, template)
    s = re.sub(r"\ba ([aeiou])", r"an \1", s)
    s = re.sub(r"\bA ([aeiou])", r"An \1", s)
    return s[0].upper() + s[1:]


def compose_sentences(n: int, seed: int = 0, exclude=()) -> list[str]:
    """``n`` distinct composed sentences (none of them in ``exclude``), deterministic in ``(n, seed)``; a list for a
    larger ``n`` starts with the list for a smaller one."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    seen, out = set(exclude), []
    tries = 0
    while len(out) < n:
        s = _fill(TEMPLATES[int(rng.integers(len(TEMPLATES)))], rng)
        tries += 1
        if tries > 50 * n + 1000:
            raise ValueError(f"cannot compose {n} distinct sentences (found {len(out)})")
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out
