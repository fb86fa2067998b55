"""Procedural text-image data with exactly known attributes (the embedded model's training set).

- :mod:`~rfmpc.data.scene`: :class:`Object`, :class:`Scene`, palette, shapes, sizes, positions.
- :mod:`~rfmpc.data.render`: anti-aliased numpy renderer, ``render(scene) -> (H, W, 3)``.
- :mod:`~rfmpc.data.grammar`: ``sample_scene``, ``to_prompt`` (paraphrase templates),
  ``parse_prompt``.
- :mod:`~rfmpc.data.analyze`: ``analyze(image) -> Scene`` and ``attribute_accuracy``.
- :mod:`~rfmpc.data.dataset`: deterministic ``make_batch``, held-out split, ``heldout_prompts``.
- :mod:`~rfmpc.data.edits`: one-attribute edits of a scene (``edit_scene``, ``EDIT_KINDS``).
- :mod:`~rfmpc.data.tokenizer`: the grammar's word-level tokenizer.
- :mod:`~rfmpc.data.train_text`: training of the text encoder (imported lazily: it needs flax).
"""

from rfmpc.data.analyze import ATTRIBUTES, Detection, analyze, attribute_accuracy, detect
from rfmpc.data.dataset import (
    HELDOUT_PERMILLE,
    heldout_prompts,
    is_heldout,
    make_batch,
    sample_split_scene,
)
from rfmpc.data.edits import EDIT_KINDS, benchmark_split, edit_prompt, edit_scene
from rfmpc.data.grammar import (
    STYLES,
    VOCABULARY,
    parse_prompt,
    parse_prompt_roles,
    random_prompt,
    sample_scene,
    split_words,
    to_prompt,
)
from rfmpc.data.render import background_image, coverage, grid_coverage, render, render_batch
from rfmpc.data.scene import (
    COLOURS,
    DEFAULT_SHAPES,
    DEFAULT_SIZE,
    PALETTE,
    POSITION_CENTERS,
    POSITIONS,
    SHAPES,
    SIZES,
    Object,
    Scene,
    visible_colours,
)
from rfmpc.data.tokenizer import MAX_LENGTH, PromptTokenizer, train_tokenizer

__all__ = [
    "ATTRIBUTES",
    "COLOURS",
    "DEFAULT_SHAPES",
    "DEFAULT_SIZE",
    "EDIT_KINDS",
    "HELDOUT_PERMILLE",
    "MAX_LENGTH",
    "PALETTE",
    "POSITIONS",
    "POSITION_CENTERS",
    "SHAPES",
    "SIZES",
    "STYLES",
    "VOCABULARY",
    "Detection",
    "Object",
    "PromptTokenizer",
    "Scene",
    "analyze",
    "attribute_accuracy",
    "background_image",
    "benchmark_split",
    "coverage",
    "detect",
    "edit_prompt",
    "edit_scene",
    "grid_coverage",
    "heldout_prompts",
    "is_heldout",
    "make_batch",
    "parse_prompt",
    "parse_prompt_roles",
    "random_prompt",
    "render",
    "render_batch",
    "sample_scene",
    "sample_split_scene",
    "split_words",
    "to_prompt",
    "train_tokenizer",
    "visible_colours",
]
