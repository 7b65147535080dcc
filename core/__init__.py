"""The bottom layer: what every other layer (cache, stages, pipeline, cli) may import. Nothing here imports them."""
