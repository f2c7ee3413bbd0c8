"""Model-card templates and the code that fills them."""

from model_cards.card import CHART_FILE, build_model_card, write_model_card

__all__ = ["CHART_FILE", "build_model_card", "write_model_card"]
