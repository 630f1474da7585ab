"""TFDS builders (ArrayRecord, no TensorFlow): `shapes`, `coco_captions`, `image_text_folder`.

Use `cm3leon_jax.data.sources.builder_for(config, name)` to get one set up from a config, and
`sources.image_text_source(config, split)` to read a built one.
"""
