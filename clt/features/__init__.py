"""Feature cards: what every CLT feature means (docs/DESIGN.md §8).

accumulate.py   the streaming pass's exact, mergeable statistics (top-k, histogram, samples)
weights.py      logit effects, decoder norms, virtual-weight neighbours (no data needed)
pipeline.py     sources (cache / online), the resumable pass, array tasks, building the cards
store.py        circuit-tracer's binary feature layout + manifest; FeatureStore, FeatureCard
render.py       a card as a PNG
"""

from .store import FeatureCard, FeatureError, FeatureStore

__all__ = ["FeatureCard", "FeatureError", "FeatureStore"]
