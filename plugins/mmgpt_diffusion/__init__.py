"""mmgpt_diffusion plugin."""
