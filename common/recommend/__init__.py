"""A model handed out and put to use: bundles (``bundle``: any evaluated scorer as safetensors + a JSON card + the
catalog's shop ids, written atomically, hash- and format-checked on load), the ``Recommender`` over one
(``recommender``: shop ids in and out, histories in the shop's own event names and times, new visitors, exclusions,
explanations, personalised search), which serving/ and ``fedaug recommend`` front, and a bundle checked on
someone's own data beside the text prior and popularity (``check``: ``fedaug evaluate``, a merchant's check)."""
