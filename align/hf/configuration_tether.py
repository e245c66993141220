"""Configuration of a tether aligned model exported for Hugging Face transformers (``align export --hf``).

This file is copied next to the weights and loaded with ``trust_remote_code=True``; it needs only transformers.
"""

from transformers import PretrainedConfig


class TetherAlignedConfig(PretrainedConfig):
    """Two frozen encoders (referenced by hub id or path, not stored here) and the trained projection heads.

    ``vision``: name, layer (-1 = final output), pooling (cls / mean / cls+mean), dim, num_prefix_tokens, dtype.
    ``text``: name, max_length, pooling (mean / cls / max), dim, dtype. ``projector``: ``image`` / ``text`` head
    settings (kind, out_dim, hidden_dim, dropout, text_head, image_pooling). ``softmax_temperature``: the trained softmax
    temperature (``logit_scale`` = 1 / temperature). ``vision_name`` / ``text_name`` override where the encoders
    are loaded from (e.g. a local copy): ``AutoModel.from_pretrained(folder, trust_remote_code=True,
    vision_name="/models/dinov2-large")``.
    """

    model_type = "tether_aligned"

    def __init__(self, vision=None, text=None, projector=None, embed_dim=512, softmax_temperature=None, vision_name=None,
                 text_name=None, tether_format=None, **kwargs):
        self.vision = dict(vision or {})
        self.text = dict(text or {})
        self.projector = dict(projector or {})
        self.embed_dim = int(embed_dim)
        self.softmax_temperature = softmax_temperature
        self.vision_name = vision_name
        self.text_name = text_name
        self.tether_format = tether_format
        super().__init__(**kwargs)
