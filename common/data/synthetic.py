"""Seeded synthetic e-commerce behaviour: the embedded default data set.

What it models, and why each part is there:
- a catalog of items in categories, each item with a brand, with Zipf-like popularity (head and long tail);
- merchants that differ in category mix (Dirichlet), users belonging to one merchant and preferring a few of its
  categories — so a merchant split is naturally non-IID;
- sequential structure: each item has a few "next" items (mostly in its category, one in a complementary
  category), which users follow with high probability — the signal a sequential model can learn and a
  popularity model cannot;
- a view -> click -> cart -> purchase funnel per event (the deepest stage reached is the event type), and the
  type says what comes next: after a cart the user mostly goes on to the item's strongest successor, after a
  purchase to the complementary category — signal for behaviour vectors;
- timestamps with session-like gaps and a daily cycle: a gap longer than ``session_gap`` starts a new session
  (no successor is followed), and items picked by preference favour categories whose peak hour is near the
  moment's hour — signal for context vectors; context per event: hour of day, weekday and device.
Same parameters and seed give identical data.
"""

from __future__ import annotations

import numpy as np

from fedaug.common.config import SyntheticSection
from fedaug.common.data import EVENT_TYPES, BehaviorData, ItemCatalog, from_sequences
from fedaug.common.data.loaders import with_texts

DEVICES = ("mobile-web", "desktop", "app")
START_TIME = 1_704_067_200  # 2024-01-01 00:00 UTC

# The generator's shape, fixed (the settings a user may change are [synthetic]: fedaug.common.config.SyntheticSection).
BRANDS_PER_CATEGORY = 8
MAX_LENGTH = 60
FOLLOW_TRANSITION = 0.65
"""Probability that the next item is one of the current item's successors."""
ZIPF = 1.0
MERCHANT_SKEW = 0.4
"""Dirichlet concentration of merchants' category mixes (smaller = more distinct merchants)."""
DAILY_CYCLE = 3.0
"""Strength κ of the daily cycle: a category's weight is multiplied by exp(κ·cos(2π(hour − peak) / 24))."""
SESSION_GAP = 6 * 3600
"""Seconds after which the next event starts a new session (it follows no successor)."""


CATEGORY_WORDS = ("lipstick", "shampoo", "perfume", "moisturiser", "mascara", "nail polish", "conditioner",
                  "sunscreen", "eyeliner", "face mask", "body lotion", "hair oil", "foundation", "blush",
                  "toothpaste", "razor")
FINISHES = ("matte", "glossy", "hydrating", "organic", "travel size", "long lasting", "sensitive", "classic")
BRAND_WORDS = ("Aurora", "Belle", "Cedar", "Dune", "Ember", "Flora", "Gala", "Halo", "Iris", "Jade", "Kiko",
               "Luna", "Mira", "Nova", "Opal", "Pearl")


def item_titles(spec: SyntheticSection, category: np.ndarray, brand: np.ndarray) -> dict[str, str]:
    """Each item's title by its raw id: its brand's name, a finish and its category's product word (categories
    past the word list get a numbered word), drawn from their own seed so the behaviour is unchanged."""
    rng = np.random.default_rng([spec.seed, 1])
    titles = {}
    for item in range(1, len(category)):
        c, b = int(category[item]), int(brand[item])
        word = CATEGORY_WORDS[c % len(CATEGORY_WORDS)] + (f" {c // len(CATEGORY_WORDS) + 1}"
                                                          if c >= len(CATEGORY_WORDS) else "")
        maker = f"{BRAND_WORDS[b % len(BRAND_WORDS)]}{'' if b < len(BRAND_WORDS) else b // len(BRAND_WORDS)}"
        titles[str(item)] = f"{maker} {FINISHES[int(rng.integers(len(FINISHES)))]} {word}"
    return titles


def generate(spec: SyntheticSection = SyntheticSection()) -> BehaviorData:
    """The data set ``spec`` ([synthetic]) describes; the same spec gives the same data."""
    rng = np.random.default_rng(spec.seed)
    n_items, n_cat = spec.items, spec.categories

    # Catalog: categories, brands and Zipf popularity (ids 1..n_items; 0 is padding).
    category = np.concatenate([[0], rng.integers(0, n_cat, n_items)])
    brand = np.concatenate([[0], category[1:] * BRANDS_PER_CATEGORY
                            + rng.integers(0, BRANDS_PER_CATEGORY, n_items)])
    popularity = np.concatenate([[0.0], 1.0 / rng.permutation(np.arange(1, n_items + 1)) ** ZIPF])
    by_category = [np.flatnonzero(category[1:] == c) + 1 for c in range(n_cat)]
    cat_probs = [popularity[items] / popularity[items].sum() for items in by_category]
    complement = rng.permutation(n_cat)  # category c leads on to category complement[c]

    # Successors: two in the same category, one in the complementary category, chosen by popularity.
    successors = np.zeros((n_items + 1, 3), dtype=np.int64)
    for item in range(1, n_items + 1):
        c = category[item]
        successors[item, :2] = rng.choice(by_category[c], 2, p=cat_probs[c])
        d = complement[c]
        successors[item, 2] = rng.choice(by_category[d], p=cat_probs[d])
    successor_weights = np.array([0.5, 0.3, 0.2])
    peak_hour = rng.integers(0, 24, n_cat)
    by_hour = np.exp(DAILY_CYCLE * np.cos(2 * np.pi * (np.arange(24)[:, None] - peak_hour[None, :]) / 24))

    merchant_mix = rng.dirichlet(np.full(n_cat, MERCHANT_SKEW), spec.merchants)
    merchant = rng.integers(0, spec.merchants, spec.users)

    sequences, stamps, events, hours, weekdays, devices = [], [], [], [], [], []
    for user in range(spec.users):
        prefs = rng.dirichlet(np.full(n_cat, 0.3)) * 0.5 + merchant_mix[merchant[user]] * 0.5
        length = int(np.clip(5 + rng.geometric(1.0 / max(spec.mean_length - 4, 1.0)), 5, MAX_LENGTH))
        device = rng.choice(len(DEVICES), p=[0.5, 0.3, 0.2])
        t = START_TIME + int(rng.integers(0, 90 * 86400))
        seq, seen, ev, ts, dev = [], set(), [], [], []
        current, last_event = 0, 0
        for _ in range(length):
            gap = int(rng.lognormal(mean=7.0, sigma=2.0))  # seconds to days between events
            t += gap
            follows = current and gap <= SESSION_GAP
            moment_prefs = prefs * by_hour[(t // 3600) % 24]
            moment_prefs /= moment_prefs.sum()
            item = 0
            for _attempt in range(10):
                if follows and rng.random() < FOLLOW_TRANSITION:
                    pick = {2: 0, 3: 2}.get(last_event) if rng.random() < 0.9 else None  # cart, purchase
                    pick = rng.choice(3, p=successor_weights) if pick is None else pick
                    item = int(successors[current, pick])
                else:
                    c = rng.choice(n_cat, p=moment_prefs)
                    item = int(rng.choice(by_category[c], p=cat_probs[c]))
                if item not in seen:
                    break
            if item in seen:
                continue
            seen.add(item)
            seq.append(item)
            last_event = _funnel_stage(rng)
            ev.append(FUNNEL[last_event])
            ts.append(t)
            if rng.random() < 0.1:
                device = rng.choice(len(DEVICES))
            dev.append(device)
            current = item
        sequences.append(seq)
        stamps.extend(ts)
        events.extend(ev)
        devices.extend(dev)
    stamps = np.asarray(stamps, dtype=np.int64)
    hours = (stamps // 3600) % 24
    weekdays = (stamps // 86400 + 3) % 7  # 1970-01-01 was a Thursday (3 with Monday = 0)

    n_brands = n_cat * BRANDS_PER_CATEGORY
    catalog = ItemCatalog(
        raw_ids=np.arange(n_items + 1),
        attributes=[np.zeros(0, np.int64)] + [np.array([category[i] + 1, n_cat + 1 + brand[i]])
                                              for i in range(1, n_items + 1)],
        attribute_names=[""] + [f"category-{c}" for c in range(n_cat)] + [f"brand-{b}" for b in range(n_brands)],
        category=np.where(np.arange(n_items + 1) > 0, category + 1, 0),
        category_names=[""] + [f"category-{c}" for c in range(n_cat)],
    )
    if spec.titles:
        catalog = with_texts(catalog, item_titles(spec, category, brand))
    return from_sequences(
        sequences,
        catalog,
        user_ids=np.arange(1, spec.users + 1),
        timestamps=stamps,
        event_type=np.asarray(events, dtype=np.int8),
        merchant=merchant.astype(np.int64),
        merchant_names=[f"merchant-{m}" for m in range(spec.merchants)],
        context={"hour": hours.astype(np.float32), "weekday": weekdays.astype(np.float32),
                 "device": np.asarray(devices, dtype=np.float32)},
    )


FUNNEL = tuple(EVENT_TYPES.index(stage) for stage in ("view", "click", "cart", "purchase"))
"""The funnel a synthetic event goes down, as EVENT_TYPES indices."""


def _funnel_stage(rng) -> int:
    """Deepest funnel stage of one event: view 100%, click 50%, cart 15%, purchase 7.5%."""
    stage = 0
    for p in (0.5, 0.3, 0.5):
        if rng.random() >= p:
            break
        stage += 1
    return stage
