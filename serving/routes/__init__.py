"""The HTTP routes by area, one blueprint each; ``serving.app`` registers them all."""

from serving.routes import completions, models, operations, tokenizer

BLUEPRINTS = (completions.blueprint, models.blueprint, tokenizer.blueprint, operations.blueprint)
