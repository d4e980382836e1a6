"""mmgpt_text plugin."""
