"""mmgpt_vit plugin."""
